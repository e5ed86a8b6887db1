"""Key validity from an attention mask: which keys are real tokens and which are padding.

The mixers cannot apply an arbitrary [Lq, Lk] mask (they never build a score matrix), so they
accept only the two mask forms that reduce to one bit per key:

- a causal mask combined with key padding (Hugging Face decoders), and
- a key-padding mask (Hugging Face encoders).

The rule: a key is *valid* when at least one query may see it (the mask reduced with `any` over
its query rows and its head dim). For a causal mask that is the last query row; for a padding mask
it is any row. A padded key then changes nothing in the recurrent state: its value is zeroed and its
log-decay set to 0, so a left-padded row gives the same outputs on its real tokens as the sequence
without padding. Outputs at padded query positions are finite but meaningless.

Mask values: a bool mask keeps True (SDPA semantics; `negated` masks hide True, as `masked_fill`
does); a float (additive) mask keeps 0 and hides values <= -1e4 (`-inf`, `finfo.min`, the old
`-10000.0`). Any other value is an additive bias the mixers cannot carry.
"""

from __future__ import annotations

import torch

from rewrite.analysis.mask_probe import HIDDEN_BELOW, holds_bias, sequence_causal
from rewrite.errors import PassError


def visible(mask: torch.Tensor, negated: bool = False) -> torch.Tensor:
    """The mask as a bool tensor that is True where a query may see a key."""
    if mask.dtype == torch.bool:
        return ~mask if negated else mask
    if negated:
        return mask == 0
    return mask > HIDDEN_BELOW


def key_validity(mask: torch.Tensor, batch: int, negated: bool = False) -> torch.Tensor:
    """[B, Lk] bool: keys at least one query may see (the mask reduced over queries and heads)."""
    vis = visible(mask, negated)
    while vis.dim() < 4:
        vis = vis.unsqueeze(0)
    valid = vis.any(dim=-2).any(dim=1)  # [B or 1, Lk]
    return valid.expand(batch, valid.shape[-1])


def _is_concrete(t: torch.Tensor) -> bool:
    """Whether `t` holds real values (not a fake/functional tensor of a trace, not under compile)."""
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()


MIXER_LIMIT = (
    "a linear mixer can carry only causal and key-padding masks. Leave this layer out with the mixer's `layers` "
    "selector (models that alternate sliding-window and full layers keep their window layers as they are)"
)
"""What the mixer can carry and what to do, said when a mask is refused (other callers say their own)."""


def check_mask_form(
    mask: torch.Tensor, valid: torch.Tensor, causal: bool, layer: str, negated: bool = False,
    limit: str = MIXER_LIMIT,
) -> None:
    """Raise PassError if `mask` is not causal-plus-key-padding (or key padding) given `valid`; `limit` ends the
    message (what the caller can carry, what to do).

    Only rows of valid queries are compared (padded query rows may be fully hidden or not).
    Skipped while tracing or compiling, where the values are not known.
    """
    if not _is_concrete(mask):
        return
    if mask.is_floating_point() and not negated:
        if holds_bias(mask):
            raise PassError(
                "mixer",
                f"at {layer}: the attention mask holds additive bias values (neither 0 nor <= "
                f"{HIDDEN_BELOW:g}); {limit}"
            )
    vis = visible(mask, negated)
    while vis.dim() < 4:
        vis = vis.unsqueeze(0)
    length = valid.shape[-1]
    if vis.shape[-2] not in (1, length):
        raise PassError("mixer", f"at {layer}: mask has {vis.shape[-2]} query rows for {length} tokens")
    expected = valid[:, None, None, :]
    rows = valid[:, None, :, None]  # compare only rows of real queries
    if vis.shape[-2] == 1:  # one row for every query: a pure key-padding mask
        rows = rows.any(dim=-2, keepdim=True)
    elif causal:
        expected = expected & torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    if bool(((vis != expected) & rows).any()):
        if causal and sequence_causal(vis):
            raise PassError(
                "mixer",
                f"at {layer}: the attention mask packs several sequences into one row (block-diagonal causal); the "
                "mixers carry packed sequences by their boundaries (cu_seqlens): add the `varlen` pass to the plan "
                "after `mixer`, or give each sequence its own row with key padding",
            )
        form = "causal plus key padding" if causal else "key padding"
        raise PassError(
            "mixer",
            f"at {layer}: the attention mask is not {form} (e.g. a sliding window or a block pattern); {limit}"
        )
