"""Linear attention (chunked, with decay, GQA, varlen, states) and its recurrent decode step."""

from .api import linear_attention, linear_attention_step

__all__ = ["linear_attention", "linear_attention_step"]
