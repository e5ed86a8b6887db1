"""Sliding-window softmax attention (causal, GQA, varlen, sink tokens) and its ring-buffer decode step."""

from .api import fill_ring_cache, ring_slots, sliding_window_attention, sliding_window_attention_step

__all__ = ["fill_ring_cache", "ring_slots", "sliding_window_attention", "sliding_window_attention_step"]
