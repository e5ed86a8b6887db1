"""Hugging Face `generate` driving an optimized module: a `Cache` that holds a `DecodeState`, and a
small generation model around the module whose forward runs the decode program.

    hf = hf_generation_model(om)
    out = hf.generate(input_ids, attention_mask=mask, max_new_tokens=20, do_sample=True, top_p=0.9)

Every logits processor, stopping criterion and streamer of `transformers` then works unchanged;
the KV caches and recurrent states live in the `DecodeStateCache`, which grows as tokens arrive.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from rewrite.decode.loop import decode_program
from rewrite.decode.state import DecodeState
from rewrite.errors import RewriteError

INITIAL_CAPACITY = 256
"""Slots a cache starts with beyond the prompt; it doubles when full."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is installed wherever HF models are
        raise RewriteError("Hugging Face generate needs the transformers package") from exc
    return transformers


def _cache_base() -> type:
    return _transformers().Cache


class DecodeStateCache(_cache_base()):  # type: ignore[misc]
    """A `transformers.Cache` whose content is a `DecodeState` (KV caches and recurrent states)."""

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.state: DecodeState | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Slots filled so far (prompt padding included), as Hugging Face counts cached tokens."""
        return 0 if self.state is None else self.state.length

    @property
    def is_compileable(self) -> bool:
        return False

    def open(self, program: Any, batch: int, tokens: int) -> DecodeState:
        """The state, allocated on the first call and grown when the new tokens do not fit."""
        if self.state is None:
            self.state = program.new_state(batch, tokens + INITIAL_CAPACITY)
        elif self.state.length + tokens > self.state.capacity:
            self.state.grow(max(2 * self.state.capacity, self.state.length + tokens))
        return self.state


def hf_generation_model(om: Any) -> Any:
    """A `transformers` generation model running `om`'s decode program (shares `om`'s parameters)."""
    source = om.source
    config = getattr(source, "config", None)
    if config is None:
        raise RewriteError(f"{type(source).__name__} is not a Hugging Face model (no config); use om.generate()")
    transformers = _transformers()
    from transformers.modeling_outputs import CausalLMOutputWithPast

    # transformers >= 5.x names the cache `cache` (it was `past_key_values`); generate hands it back under
    # that name, and a forward that misses it would prefill the whole sequence again at every step
    fields = getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
    CACHE_FIELD = "cache" if "cache" in fields else "past_key_values"  # noqa: N806

    class RewriteGenerationModel(transformers.PreTrainedModel, transformers.GenerationMixin):
        """Hugging Face's generation loop over an optimized module's decode program."""

        config_class = type(config)
        base_model_prefix = "optimized"
        main_input_name = "input_ids"
        _supports_sdpa = True  # attention is whatever the optimized module runs

        def __init__(self) -> None:
            super().__init__(copy.deepcopy(config))  # PreTrainedModel adjusts its config; keep the source's
            self.optimized = om
            self.generation_config = getattr(source, "generation_config", None) or transformers.GenerationConfig()

        @classmethod
        def _supports_default_dynamic_cache(cls) -> bool:
            return False  # the forward makes its own DecodeStateCache

        def prepare_inputs_for_generation(self, input_ids: torch.Tensor, past_key_values: Any = None,
                                          attention_mask: torch.Tensor | None = None, cache: Any = None,
                                          **kwargs: Any) -> dict:
            cache = cache if cache is not None else past_key_values
            seen = cache.get_seq_length() if cache is not None else 0
            return {"input_ids": input_ids[:, seen:], "attention_mask": attention_mask, CACHE_FIELD: cache}

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    past_key_values: Any = None, cache: Any = None, **kwargs: Any) -> Any:
            cache = cache if cache is not None else past_key_values
            if cache is not None and not isinstance(cache, DecodeStateCache):
                raise RewriteError(f"this model decodes with a DecodeStateCache, got {type(cache).__name__}")
            cache = cache if cache is not None else DecodeStateCache()
            program = decode_program(om)
            batch, tokens = input_ids.shape
            state = cache.open(program, batch, tokens)
            valid = None if attention_mask is None else attention_mask[:, -tokens:].to(state.device, torch.bool)
            if valid is not None and bool(valid.all()):
                valid = None
            positions = state.positions(tokens, valid)  # continues each row's real tokens held by the state
            state.begin(tokens, valid)
            logits = program(input_ids, positions, state)
            state.advance()
            return CausalLMOutputWithPast(logits=logits, **{CACHE_FIELD: cache})

    return RewriteGenerationModel()
