"""Targets that are Hugging Face models on disk: a folder as `save_pretrained` writes it, or a config file.

    rewrite dump path/to/model --plan varlen                       # config.json (+ weights) in the folder
    rewrite dump 'path/to/model?batch=4,length=128,padding=right'   # example-input options, as for built-ins
    rewrite explain path/to/config.json --plan attention_normalize  # a config alone: random weights

The model class is the first of the config's `architectures` that transformers has, else
`AutoModelForCausalLM` for decoder model types and `AutoModel` for the rest. A folder holding
weights (`model.safetensors`, `pytorch_model.bin` or their sharded indexes) is loaded with them;
a folder without weights, or a config file named directly, gives a randomly initialized model,
and the notes say so. Nothing is downloaded and no code from the folder runs.

The example inputs are synthesized: `input_ids` of shape [batch, length] drawn uniformly from
[0, vocab_size) and an `attention_mask` of ones; `padding=right` (or `left`) pads every row but
the first, so `varlen` has padding to remove.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rewrite.targets import TargetError

CONFIG_NAME = "config.json"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
PADDING_SIDES = ("none", "right", "left")
DTYPES = ("auto", "float32", "bfloat16", "float16")
OPTION_DEFAULTS: dict[str, Any] = {
    "batch": 2, "length": 64, "padding": "none", "seed": 0, "attn": "sdpa", "dtype": "auto",
}
"""The `?key=value` options a Hugging Face target takes, with their defaults."""


class HFTargetError(TargetError):
    """A Hugging Face folder or config that cannot be built into a model with example inputs."""


@dataclass
class HFTarget:
    """A model built from a Hugging Face folder or config, its synthesized inputs and what was done."""

    model: torch.nn.Module
    kwargs: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)
    inputs_note: str = ""


def is_hf_reference(ref: str) -> bool:
    """Whether `ref` names an existing folder or JSON file (so it is read as a Hugging Face target)."""
    path = Path(ref)
    with contextlib.suppress(OSError):
        return path.is_dir() or (path.is_file() and path.suffix.lower() == ".json")
    return False


def _supported() -> str:
    return (f"a folder with a Hugging Face {CONFIG_NAME} (and {' or '.join(WEIGHT_FILES[::2])} for weights) "
            f"as save_pretrained writes it, or the path of such a config file")


def _config_path(path: Path) -> Path:
    if path.is_dir():
        config = path / CONFIG_NAME
        if not config.is_file():
            present = sorted(p.name for p in path.iterdir())[:8]
            raise HFTargetError(
                f"target {str(path)!r}: the folder has no {CONFIG_NAME} (it holds: {', '.join(present) or 'nothing'}); "
                f"a folder target must be {_supported()}"
            )
        return config
    return path


def weight_files(folder: Path) -> list[Path]:
    """The weight files `from_pretrained` would read in `folder`, in the order it prefers them."""
    return [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No load reports or progress bars from transformers: this module reports what matters itself."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _read_config(config_path: Path, attn: str) -> Any:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    try:
        with _quiet_transformers():
            return transformers.AutoConfig.from_pretrained(
                str(config_path), local_files_only=True, trust_remote_code=False, attn_implementation=attn)
    except (ValueError, KeyError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        examples = ", ".join(t for t in ("llama", "qwen3", "gemma", "phi3", "gpt2", "bert") if t in CONFIG_MAPPING_NAMES)
        raise HFTargetError(
            f"target {str(config_path)!r}: transformers {transformers.__version__} cannot read this config ({reason}); "
            f"supported: a config whose model_type is one of the {len(CONFIG_MAPPING_NAMES)} types this transformers "
            f"knows ({examples}, ...); code shipped with a checkpoint (auto_map) is not run"
        ) from exc


def is_decoder_config(config: Any) -> bool:
    """Whether the config's model type is a causal LM that is not also a masked LM (BERT is built as an encoder)."""
    from transformers.models.auto import modeling_auto

    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    return bool(getattr(config, "is_decoder", False)) or (
        model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def model_class(config: Any) -> tuple[Any, str]:
    """The class that builds `config` and why it was chosen (its `architectures` entry or an Auto class)."""
    import transformers

    named = list(getattr(config, "architectures", None) or [])
    for name in named:
        try:
            cls = getattr(transformers, name, None)
        except Exception:  # a lazily imported class whose optional dependency is missing
            cls = None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) and isinstance(
                config, cls.config_class):
            return cls, "from the config's architectures"
    decoder = is_decoder_config(config)
    candidates = [transformers.AutoModelForCausalLM, transformers.AutoModel] if decoder else [transformers.AutoModel]
    built = [auto for auto in candidates if type(config) in auto._model_mapping]
    if not built:
        raise HFTargetError(
            f"transformers {transformers.__version__} has no model class for {type(config).__name__} (model_type "
            f"{config.model_type!r}, architectures {named or 'not given'}); supported: configs whose architectures "
            f"name a transformers model class, or model types that {' or '.join(a.__name__ for a in candidates)} builds"
        )
    why = (f"none of the config's architectures ({', '.join(named)}) is a transformers class for it"
           if named else "the config names no architectures")
    return built[0], f"{built[0].__name__}: {why}; model_type {config.model_type!r} is {'a' if decoder else 'not a'} decoder"


def _dtype(name: str) -> torch.dtype | str:
    return "auto" if name == "auto" else getattr(torch, name)


def _random_model(cls: Any, config: Any, seed: int, dtype: str) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]), _quiet_transformers():
        torch.manual_seed(seed)
        if hasattr(cls, "_model_mapping"):  # an Auto class
            model = cls.from_config(config)
        else:
            model = cls._from_config(config)
    return model.to(torch.float32 if dtype == "auto" else getattr(torch, dtype))


def _pretrained_model(cls: Any, folder: Path, config: Any, dtype: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    from safetensors import SafetensorError

    try:
        with _quiet_transformers():
            model, info = cls.from_pretrained(
                str(folder), config=config, local_files_only=True, trust_remote_code=False,
                output_loading_info=True, ignore_mismatched_sizes=True, dtype=_dtype(dtype))
    except (OSError, RuntimeError, ValueError, KeyError, SafetensorError, pickle.UnpicklingError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HFTargetError(
            f"target {str(folder)!r}: cannot load the weights in {', '.join(p.name for p in weight_files(folder))} "
            f"({type(exc).__name__}: {reason}); supported: weights saved by save_pretrained for this config"
        ) from exc
    mismatched = [f"{name} (file {tuple(saved)}, config {tuple(built)})"
                  for name, saved, built in sorted(info.get("mismatched_keys") or [])]
    missing = sorted(info.get("missing_keys") or [])
    if mismatched or missing:
        problems = []
        if mismatched:
            problems.append(f"{len(mismatched)} tensors of another shape than the config gives: "
                            + "; ".join(mismatched[:3]) + (" ..." if len(mismatched) > 3 else ""))
        if missing:
            problems.append(f"{len(missing)} of the model's tensors missing from the files: "
                            + ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else ""))
        raise HFTargetError(
            f"target {str(folder)!r}: the weights do not match {CONFIG_NAME} ({type(model).__name__}): "
            + "; and ".join(problems)
            + "; supported: weights saved by save_pretrained together with this config "
              "(to build the config with random weights instead, name the config file itself)"
        )
    return model, info


def synthesize_inputs(vocab_size: int, batch: int, length: int, padding: str, pad_token_id: int,
                      seed: int) -> tuple[dict[str, torch.Tensor], str]:
    """`input_ids` and `attention_mask` of shape [batch, length] and a sentence saying how they were made.

    Row 0 is never padded; with padding, row i > 0 keeps length - i * length // (2 * batch) tokens
    (at least one) and its padded positions hold `pad_token_id`.
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    kept = [length] + [max(1, length - i * length // (2 * batch)) for i in range(1, batch)]
    if padding != "none":
        for row, n in enumerate(kept):
            pad = slice(n, None) if padding == "right" else slice(0, length - n)
            mask[row, pad] = 0
            ids[row, pad] = pad_token_id
    how = (f"input_ids [{batch}, {length}] drawn uniformly from [0, {vocab_size}) with seed {seed}; attention_mask ")
    if padding == "none":
        how += "all ones (no padding; add ?padding=right to pad every row but the first)"
    else:
        how += (f"{padding}-padded: real lengths {kept}, padded positions hold token {pad_token_id}")
    return {"input_ids": ids, "attention_mask": mask}, how


def _options(params: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(params) - set(OPTION_DEFAULTS))
    if unknown:
        accepted = ", ".join(f"{k}={v}" for k, v in OPTION_DEFAULTS.items())
        raise HFTargetError(f"target {where!r}: unknown option(s) {', '.join(unknown)}; "
                            f"a Hugging Face target takes: {accepted}")
    options = {**OPTION_DEFAULTS, **params}
    for key in ("batch", "length"):
        if not isinstance(options[key], int) or isinstance(options[key], bool) or options[key] < 1:
            raise HFTargetError(f"target {where!r}: {key} must be a positive integer, got {options[key]!r}")
    if not isinstance(options["seed"], int):
        raise HFTargetError(f"target {where!r}: seed must be an integer, got {options['seed']!r}")
    for key, allowed in (("padding", PADDING_SIDES), ("dtype", DTYPES), ("attn", ("sdpa", "eager"))):
        if options[key] not in allowed:
            raise HFTargetError(f"target {where!r}: {key} must be one of {', '.join(allowed)}, got {options[key]!r}")
    return options


def load_hf_target(ref: str, params: dict[str, Any]) -> HFTarget:
    """Build the model that the Hugging Face folder or config file `ref` describes, with example inputs.

    `params` are the target's `?key=value` options (OPTION_DEFAULTS). HFTargetError when the path
    holds no config, transformers cannot build it, or its weights do not fit it.
    """
    options = _options(params, ref)
    path = Path(ref)
    config_path = _config_path(path)
    config = _read_config(config_path, options["attn"])
    try:
        cls, why = model_class(config)
    except HFTargetError as exc:
        raise HFTargetError(f"target {str(config_path)!r}: {exc}") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab_size = getattr(text, "vocab_size", None)
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise HFTargetError(f"target {str(config_path)!r}: the config has no vocab_size to draw input_ids from; "
                            f"supported: text models (decoders and encoders over token ids)")
    max_positions = getattr(text, "max_position_embeddings", None)
    if isinstance(max_positions, int) and options["length"] > max_positions:
        raise HFTargetError(f"target {str(config_path)!r}: length={options['length']} is longer than the config's "
                            f"max_position_embeddings ({max_positions}); give ?length=N with N <= {max_positions}")

    notes = []
    weights = weight_files(path) if path.is_dir() else []
    if weights:
        model, info = _pretrained_model(cls, path, config, options["dtype"])
        notes.append(f"model: {type(model).__name__} ({why}); weights loaded from {weights[0]} "
                     f"({next(model.parameters()).dtype})")
        unused = sorted(info.get("unexpected_keys") or [])
        if unused:
            notes.append(f"{len(unused)} tensors in the weight files are not used by {type(model).__name__}: "
                         + ", ".join(unused[:3]) + (" ..." if len(unused) > 3 else ""))
    else:
        model = _random_model(cls, config, options["seed"], options["dtype"])
        if path.is_dir():
            cause = f"{path} holds no weights ({', '.join(WEIGHT_FILES)})"
        else:
            beside = weight_files(path.parent)
            cause = "the target is a config file" + (
                f" (name the folder {path.parent} to load the weights it holds)" if beside else "")
        notes.append(f"model: {type(model).__name__} ({why}); weights are RANDOM (initialized from "
                     f"{config_path.name} with seed {options['seed']}): {cause}")
    pad_token_id = getattr(text, "pad_token_id", None)
    if not isinstance(pad_token_id, int) or not 0 <= pad_token_id < vocab_size:
        pad_token_id = 0
    kwargs, how = synthesize_inputs(vocab_size, options["batch"], options["length"], options["padding"],
                                    pad_token_id, options["seed"])
    return HFTarget(model.eval(), kwargs, notes, f"inputs: {how}; set with ?batch=N,length=N,padding=none|right|left,seed=N")


__all__ = ["HFTarget", "HFTargetError", "OPTION_DEFAULTS", "is_decoder_config", "is_hf_reference",
           "load_hf_target", "model_class", "synthesize_inputs", "weight_files"]
