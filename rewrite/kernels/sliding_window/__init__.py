"""Sliding-window softmax attention (causal or with a lookahead, GQA, varlen, sink tokens) and its ring-buffer
decode step (causal)."""

from .api import fill_ring_cache, ring_slots, sliding_window_attention, sliding_window_attention_step

__all__ = ["fill_ring_cache", "ring_slots", "sliding_window_attention", "sliding_window_attention_step"]
