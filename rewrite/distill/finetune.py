"""Stage 2 of the recipe: losses of the fine-tune and LoRA adapters (peft) on the student's linear layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rewrite.errors import RewriteError


def lora_targets(model: torch.nn.Module) -> list[str]:
    """Names of the linear layers LoRA adapts: every nn.Linear (and GPT-2 Conv1D) but an output head.

    The output head is a linear layer whose weight is also the input embedding (tied) or that
    is named `lm_head`.
    """
    try:
        from transformers.pytorch_utils import Conv1D
        kinds: tuple[type, ...] = (torch.nn.Linear, Conv1D)
    except ImportError:  # transformers is optional
        kinds = (torch.nn.Linear,)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    # nn.MultiheadAttention reads its out_proj's weight directly, so an adapter there would do nothing
    inside_mha = {id(m.out_proj) for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)}
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, kinds) or name.split(".")[-1] == "lm_head":
            continue
        if id(module.weight) in embeddings or id(module) in inside_mha:
            continue
        names.append(name)
    return names


def add_lora(model: torch.nn.Module, rank: int, alpha: float) -> list[str]:
    """Put LoRA adapters (peft, B = 0 so outputs are unchanged) on `model`'s linear layers in place.

    Returns the names of the adapter parameters.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:
        raise RewriteError("finetune method 'lora' needs the peft package (pip install peft), or use 'full'") from exc
    targets = lora_targets(model)
    if not targets:
        raise RewriteError("finetune method 'lora': the model has no linear layer to adapt; use 'full'")
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0), model)
    return [n for n, _ in model.named_parameters() if "lora_" in n]


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of logits [B, L, V] at position t against ids[t + 1] over real tokens."""
    if logits.dim() != 3 or ids.shape != logits.shape[:2]:
        raise RewriteError(
            f"loss 'ce' needs logits [B, L, V] for token ids [B, L], got {tuple(logits.shape)} and {tuple(ids.shape)}"
        )
    largest = int(ids.max()) if ids.numel() else -1
    if largest >= logits.shape[-1]:
        raise RewriteError(
            f"loss 'ce' needs logits over the vocabulary (a language model's output), but the model's output has "
            f"{logits.shape[-1]} features and the token ids reach {largest}: an encoder's hidden states are not "
            f"logits; use --loss kl or mse (match the teacher's outputs), or a model with a language-model head"
        )
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    if valid is None:
        return loss.mean()
    weights = (valid[:, :-1] & valid[:, 1:]).flatten().to(loss.dtype)
    return (loss * weights).sum() / weights.sum().clamp(min=1)


def kl_to_teacher(student: torch.Tensor, teacher: torch.Tensor, temperature: float, valid: torch.Tensor | None) -> torch.Tensor:
    """KL(teacher || student) of the softmax over the last dim at `temperature`, over real tokens."""
    t = temperature
    logp = F.log_softmax(student.float() / t, dim=-1)
    logq = F.log_softmax(teacher.float() / t, dim=-1)
    kl = (logq.exp() * (logq - logp)).sum(-1) * t * t
    if valid is None:
        return kl.mean()
    weights = valid.to(kl.dtype)
    return (kl * weights).sum() / weights.sum().clamp(min=1)


def mse_to_teacher(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error to the teacher's output over real tokens (outputs [B, L, ...])."""
    err = (student.float() - teacher.float()).pow(2)
    if valid is None or err.dim() < 2 or err.shape[:2] != valid.shape:
        return err.mean()
    err = err.flatten(2).mean(-1)
    weights = valid.to(err.dtype)
    return (err * weights).sum() / weights.sum().clamp(min=1)
