"""LoRA adapters folded into their base weights, and an optimized module rebuilt from the merged model.

Training recipes (`rewrite.distill`, `rewrite.routing.train_routers`) put peft adapters on the model
before capture, so the optimized module they train runs every adapter's matmuls. Merging folds
`scaling * B @ A` into each base weight, puts the base layer back under its own name, and optimizes the
merged model again with the same plan, keeping the trained values of every parameter the plan's passes
added (mixer gates and feature maps, routers).
"""

from __future__ import annotations

from typing import Any

import torch

from rewrite.errors import RewriteError


def merge_lora(model: torch.nn.Module) -> list[str]:
    """Fold every LoRA adapter of `model` into its base weight (W += scaling * B @ A, peft's `merge`) in
    place and put each base layer back where its adapted layer was, so parameters carry the model's own
    names again. Returns the names of the merged layers.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in layers:
        if not name:
            raise RewriteError("cannot merge LoRA adapters put on the root module itself")
        try:
            with torch.no_grad():
                layer.merge(safe_merge=True)
        except ValueError as exc:  # peft's safe_merge: the merged weight is not finite
            raise RewriteError(f"cannot merge the LoRA adapter of {name}: {exc}") from exc
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, leaf, layer.get_base_layer())
    return [name for name, _ in layers]


def optimize_merged(om: Any, source: torch.nn.Module, example_args: tuple, example_kwargs: dict[str, Any],
                    *, keep_adapters_hint: str) -> Any:
    """`source` (the model `om` was optimized from, with LoRA adapters) merged in place and optimized again by
    `om`'s plan on the example inputs, holding `om`'s values of the parameters the passes added.

    `om` is stale afterwards (its base weights hold the merged values while it still runs the adapters).
    `keep_adapters_hint` names the setting that skips merging, for the error raised when the merged model's
    added parameters differ from `om`'s.
    """
    import rewrite

    params = dict(om.named_parameters())
    trained = {n: params[n].detach().clone() for n in om.report.added_parameters if n in params}
    merge_lora(source)
    merged = rewrite.optimize(source, om.plan, example_args, example_kwargs=example_kwargs)
    merged.train(om.training)
    fresh = dict(merged.named_parameters())
    added = {n: fresh[n] for n in merged.report.added_parameters if n in fresh}
    if added.keys() != trained.keys():
        raise RewriteError(
            "merging the LoRA adapters changed the parameters the plan's passes add "
            f"({sorted(set(trained) ^ set(added))[:3]}); {keep_adapters_hint}"
        )
    with torch.no_grad():
        for name, p in added.items():
            p.copy_(trained[name])
    return merged


__all__ = ["merge_lora", "optimize_merged"]
