"""Train the routers the `layer_skip` pass inserted (and optionally LoRA adapters of the model).

The loss is quality plus a budget penalty:

    loss = quality + budget_weight * (mean skip weight - target_skip) ** 2

where the skip weight is what the blocks applied: the probability in soft mode, the hard decision
(0 / 1, with the probability's gradient) in straight_through mode, so the penalty sees the skip rate
the model actually runs at. quality is one of:

- `ce`: next-token cross-entropy of the routed model;
- `distill`: KL divergence from the model with nothing skipped;
- `skip_cost`: binary cross-entropy fitting each router to whether its block is among the
  round(target_skip * n) cheapest of the sequence to skip, the cost measured by skipping each block
  alone (one extra forward per routed block, without gradient).
- `set_cost`: as deployed, the routers see only a prompt (the first `prompt_length` tokens, pooled)
  and are fitted (binary cross-entropy) to how likely their block belongs to the set of
  k = round(target_skip * n) blocks whose joint skipping costs the sequence's continuation least:
  every set of k blocks is skipped in turn (one forward per set, without gradient) and the sets are
  weighted by softmax(-cost / label_temperature); a block's label is the weight of the sets holding
  it (they sum to k per sequence). Rank the probabilities per sequence at inference
  (`rewrite.routing.evaluation.top_k_decisions`).

With `ce` and `distill` blocks run on every row during training; their outputs are mixed by the
routers' probabilities (`mode="soft"`) or by hard decisions whose gradient is the soft mixture's
(`mode="straight_through"`). Only router (and LoRA) parameters change.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rewrite.errors import RewriteError
from rewrite.lora import optimize_merged
from rewrite.routing.controls import last_call_probabilities, record_skips, skip_controls
from rewrite.routing.language_model import logits_of, next_token_loss, takes_input_ids

LOSSES = ("ce", "distill", "skip_cost", "set_cost")
TRAINING_MODES = ("straight_through", "soft")
DEFAULT_PLAN = {"passes": [{"layer_skip": {}}]}


@dataclass
class LoraSettings:
    """LoRA adapters (through peft) trained with the routers on the named linear modules."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    merge: bool = True
    """After training, fold the adapters into the base weights and return the merged model optimized again
    (the model's own parameter names, no adapter matmuls; the routers keep their trained values)."""


@dataclass
class RouterTrainingConfig:
    """How to train the routers."""

    steps: int = 200
    lr: float = 1e-2
    target_skip: float = 0.25
    budget_weight: float = 10.0
    loss: str = "ce"
    mode: str = "straight_through"
    lora: LoraSettings | None = None
    lora_lr: float = 1e-3
    prompt_length: int | None = None
    """set_cost: the tokens the routers see (the rest is the scored continuation); None: half."""
    label_temperature: float = 0.01
    """set_cost: softness of the labels, in nats per continuation token (0: the best set only)."""
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    log_every: int = 10
    progress: bool = True
    seed: int = 0

    def check(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if self.steps < 1:
            raise ValueError(f"train_routers: steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.target_skip <= 1.0:
            raise ValueError(f"train_routers: target_skip is a fraction in [0, 1], got {self.target_skip}")
        if self.loss not in LOSSES:
            raise ValueError(f"train_routers: unknown loss {self.loss!r} (allowed: {', '.join(LOSSES)})")
        if self.mode not in TRAINING_MODES:
            raise ValueError(f"train_routers: unknown mode {self.mode!r} (allowed: {', '.join(TRAINING_MODES)})")
        if self.lr <= 0 or self.lora_lr <= 0:
            raise ValueError("train_routers: learning rates must be > 0")
        if self.lora is not None and not isinstance(self.lora.merge, bool):
            raise ValueError(f"train_routers: lora.merge must be true or false, got {self.lora.merge!r}")
        if self.label_temperature < 0:
            raise ValueError(f"train_routers: label_temperature must be >= 0, got {self.label_temperature}")
        if self.prompt_length is not None and self.prompt_length < 1:
            raise ValueError(f"train_routers: prompt_length must be >= 1, got {self.prompt_length}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("train_routers: checkpoint_every needs checkpoint_dir")


@dataclass
class RouterTrainingResult:
    """The trained module, the loss history and the checkpoints written."""

    module: torch.nn.Module
    history: list[dict[str, float]]
    checkpoints: list[Path]
    trained_parameters: list[str]


def _progress(total: int, enabled: bool) -> Any:
    """A tqdm bar when tqdm is installed, else a plain line printer with the same `update`/`set_postfix`."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="routers", leave=True)
    except ImportError:
        return _PlainProgress(total)


class _PlainProgress:
    def __init__(self, total: int):
        self.total, self.n, self.postfix = total, 0, ""

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, values: dict[str, float]) -> None:
        self.postfix = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        print(f"routers {self.n}/{self.total}: {self.postfix}", flush=True)

    def close(self) -> None:
        pass


def _with_lora(model: torch.nn.Module, lora: LoraSettings) -> torch.nn.Module:
    try:
        import peft
    except ImportError as exc:
        raise RewriteError("train_routers: LoRA needs the 'peft' package (pip install peft)") from exc
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in lora.target_modules if t not in names]
    if missing:
        raise RewriteError(
            f"train_routers: LoRA target modules {missing} are not in the model; its module names end in "
            f"{sorted(n for n in names if n and not n.isdigit())[:20]}"
        )
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules), lora_dropout=0.0)
    # peft injects the adapters into the model's own modules; capture the model itself, not the wrapper
    return peft.get_peft_model(model, config).get_base_model()


def _trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if ".router." in f".{n}" or "lora_" in n}


def save_checkpoint(path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, config: RouterTrainingConfig) -> Path:
    """Write the trained parameters, the optimizer state and the step to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().cpu() for n, p in _trainable(module).items()}
    torch.save({"step": step, "parameters": state, "optimizer": optimizer.state_dict(), "config": asdict(config)}, path)
    return path


def load_checkpoint(path: str | Path, module: torch.nn.Module) -> dict[str, Any]:
    """Load a checkpoint's trained parameters into `module`; returns the checkpoint (step, optimizer state)."""
    data = torch.load(str(path), map_location="cpu", weights_only=False)
    params = _trainable(module)
    unknown = [n for n in data["parameters"] if n not in params]
    if unknown:
        raise RewriteError(f"checkpoint {path} holds parameters this module lacks: {unknown[:5]}")
    with torch.no_grad():
        for name, value in data["parameters"].items():
            params[name].copy_(value)
    return data


def _per_sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    losses = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return losses.mean(dim=1)


def _skip_cost_loss(
    om: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, target_skip: float, keyword: bool
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Routers learn, per sequence, which blocks cost least to skip, measured by skipping each one.

    Each routed block is skipped alone (no gradient) and the rise of the sequence's cross-entropy is
    its cost; the round(target_skip * n) cheapest blocks of a sequence are its positives. The routers'
    probabilities on the unskipped model are fitted to these labels (binary cross-entropy).
    """
    with skip_controls(mode="straight_through", threshold=math.inf), record_skips() as report:
        logits = logits_of(om, inputs, keyword=keyword)
        probs = last_call_probabilities()
    batch, n_routed = probs.shape
    with torch.no_grad():
        base = _per_sequence_loss(logits, targets)
        costs = torch.empty(batch, n_routed, device=inputs.device)
        for j in range(n_routed):
            mask = torch.zeros(batch, n_routed, dtype=torch.bool)
            mask[:, j] = True
            with skip_controls(skip_mask=mask):
                costs[:, j] = _per_sequence_loss(logits_of(om, inputs, keyword=keyword), targets) - base
        k = round(target_skip * n_routed)
        labels = torch.zeros_like(costs)
        if k:
            labels.scatter_(1, costs.topk(k, dim=1, largest=False).indices, 1.0)
    return F.binary_cross_entropy(probs.float(), labels), probs, report


def set_cost_labels(costs: torch.Tensor, combos: list[tuple[int, ...]], n_routed: int, temperature: float) -> torch.Tensor:
    """[B, n_routed] per-block labels from the costs [B, C] of skipping each set `combos[c]`.

    The sets are weighted by softmax(-cost / temperature) per sequence (temperature 0: all weight on
    the cheapest set); a block's label is the total weight of the sets that hold it.
    """
    membership = torch.zeros(len(combos), n_routed, device=costs.device)
    for c, combo in enumerate(combos):
        membership[c, list(combo)] = 1.0
    if temperature == 0:
        weights = F.one_hot(costs.argmin(1), len(combos)).to(membership.dtype)
    else:
        weights = torch.softmax(-costs.float() / temperature, dim=1)
    return weights @ membership


def _set_cost_loss(
    om: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, config: RouterTrainingConfig, keyword: bool
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Routers, reading the prompt only, learn which set of k blocks costs the continuation least.

    The probabilities come from the prompt run with nothing skipped; the labels from skipping every set
    of k blocks over the whole window and measuring the continuation's mean cross-entropy.
    """
    prompt = config.prompt_length or inputs.shape[1] // 2
    if not 0 < prompt < inputs.shape[1]:
        raise ValueError(f"train_routers: prompt_length {prompt} leaves no continuation in windows of {inputs.shape[1]} inputs")
    with skip_controls(mode="straight_through", threshold=math.inf), record_skips() as report:
        logits_of(om, inputs[:, :prompt], keyword=keyword)
        probs = last_call_probabilities()
    batch, n_routed = probs.shape
    k = round(config.target_skip * n_routed)
    combos = list(itertools.combinations(range(n_routed), k))
    with torch.no_grad():
        costs = torch.empty(batch, len(combos), device=inputs.device)
        for c, combo in enumerate(combos):
            mask = torch.zeros(batch, n_routed, dtype=torch.bool)
            mask[:, list(combo)] = True
            with skip_controls(skip_mask=mask):
                logits = logits_of(om, inputs, keyword=keyword)
            costs[:, c] = _per_sequence_loss(logits[:, prompt - 1 :], targets[:, prompt - 1 :])
        labels = set_cost_labels(costs, combos, n_routed, config.label_temperature)
    return F.binary_cross_entropy(probs.float(), labels), probs, report


def _batch_source(data: torch.Tensor | Callable[[int], torch.Tensor] | Iterator[torch.Tensor]) -> Callable[[int], torch.Tensor]:
    """Batch of a step from a function of the step, an iterator (its next batch), or one tensor used every step."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise ValueError(f"train_routers: data must be token windows [N, L + 1], got shape {tuple(data.shape)}")
        return lambda step: data
    if callable(data):
        return data
    iterator = iter(data)
    return lambda step: next(iterator)


def train_routers(
    model: torch.nn.Module,
    data: torch.Tensor | Callable[[int], torch.Tensor] | Iterator[torch.Tensor],
    config: RouterTrainingConfig | None = None,
    *,
    plan: Any = None,
    resume_from: str | Path | None = None,
) -> RouterTrainingResult:
    """Train routers of `model` on batches of token windows [B, L + 1] (inputs [:, :-1], targets [:, 1:]).

    `model` is a causal LM (ids -> logits). It is optimized with `plan` (default: `layer_skip` on every
    layer); an already optimized module is trained as it is. `data` is a function of the step returning
    a batch, an iterator of batches, or one tensor used every step. With `config.lora`, peft adds LoRA
    adapters to the model first (the model is changed in place). `resume_from` continues from a
    checkpoint: its parameters, optimizer state and step (a function of the step gives the same batches).
    """
    import rewrite

    config = config or RouterTrainingConfig()
    config.check()
    torch.manual_seed(config.seed)
    batch_of = _batch_source(data)
    start = 0
    if resume_from is not None:
        start = int(torch.load(str(resume_from), map_location="cpu", weights_only=False)["step"])
    first = batch_of(start)
    teacher = None
    example = None
    if hasattr(model, "program"):
        if config.lora is not None:
            raise RewriteError("train_routers: LoRA needs the original model, not an optimized module")
        om = model
        if config.loss == "distill":
            teacher = om
    else:
        if config.loss == "distill":
            teacher = copy.deepcopy(model).eval()
        if config.lora is not None:
            model = _with_lora(model, config.lora)
        model.eval()
        keyword = takes_input_ids(model)
        example = {"input_ids": first[:, :-1]} if keyword else None
        om = rewrite.optimize(model, plan or DEFAULT_PLAN, None if keyword else (first[:, :-1],), example_kwargs=example)
    keyword = takes_input_ids(om)
    trainable = _trainable(om)
    routers = [p for n, p in trainable.items() if "lora_" not in n]
    if not routers:
        raise RewriteError("train_routers: the module has no router parameters; optimize it with the layer_skip pass")
    frozen = {n: p.requires_grad for n, p in om.named_parameters()}
    for n, p in om.named_parameters():
        p.requires_grad_(n in trainable)
    groups = [{"params": routers, "lr": config.lr}]
    lora_params = [p for n, p in trainable.items() if "lora_" in n]
    if lora_params:
        groups.append({"params": lora_params, "lr": config.lora_lr})
    optimizer = torch.optim.Adam(groups)
    if resume_from is not None:
        optimizer.load_state_dict(load_checkpoint(resume_from, om)["optimizer"])
    history: list[dict[str, float]] = []
    checkpoints: list[Path] = []
    bar = _progress(config.steps - start, config.progress)
    device = next(om.parameters()).device
    began = time.perf_counter()
    try:
        batch = first
        for step in range(start, config.steps):
            if step > start:
                batch = batch_of(step)
            batch = batch.to(device)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            if config.loss == "skip_cost":
                quality, probs, report = _skip_cost_loss(om, inputs, targets, config.target_skip, keyword)
                used = probs
            elif config.loss == "set_cost":
                quality, probs, report = _set_cost_loss(om, inputs, targets, config, keyword)
                used = probs
            else:
                with skip_controls(mode=config.mode), record_skips() as report:
                    logits = logits_of(om, inputs, keyword=keyword)
                    probs = last_call_probabilities()
                    used = last_call_probabilities(used=True)
            if config.loss == "ce":
                quality = next_token_loss(logits, targets)
            elif config.loss == "distill":
                with torch.no_grad(), skip_controls(threshold=math.inf):
                    reference = logits_of(teacher, inputs, keyword=takes_input_ids(teacher))
                quality = F.kl_div(
                    F.log_softmax(logits.float(), -1), F.log_softmax(reference.float(), -1), log_target=True,
                    reduction="batchmean",
                ) / inputs.shape[1]
            penalty = (used.mean() - config.target_skip) ** 2
            loss = quality + config.budget_weight * penalty
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            entry = {
                "step": step + 1,
                "loss": loss.item(),
                "quality": quality.item(),
                "penalty": penalty.item(),
                "mean_probability": probs.mean().item(),
                "skip_rate": (probs > 0.5).float().mean().item() if config.loss in ("skip_cost", "set_cost") else report.skip_rate(),
                "seconds": time.perf_counter() - began,
            }
            history.append(entry)
            if bar is not None:
                bar.update(1)
                if (step + 1) % max(1, config.log_every) == 0 or step + 1 == config.steps:
                    bar.set_postfix({k: entry[k] for k in ("quality", "skip_rate", "mean_probability")})
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
                path = Path(config.checkpoint_dir) / f"step_{step + 1:06d}.pt"  # type: ignore[arg-type]
                checkpoints.append(save_checkpoint(path, om, optimizer, step + 1, config))
    finally:
        if bar is not None:
            bar.close()
        for n, p in om.named_parameters():
            p.requires_grad_(frozen.get(n, True))
    if config.checkpoint_dir:
        checkpoints.append(save_checkpoint(Path(config.checkpoint_dir) / "final.pt", om, optimizer, config.steps, config))
    if config.lora is not None and config.lora.merge:
        om = optimize_merged(om, model, () if example is not None else (first[:, :-1],), example or {},
                             keep_adapters_hint="use LoraSettings(merge=False)")
    return RouterTrainingResult(om, history, checkpoints, list(trainable))
