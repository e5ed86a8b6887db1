"""Rotary position embedding (rotate-half form), forward only."""

from .op import rotary_embedding, rotary_embedding_pair

__all__ = ["rotary_embedding", "rotary_embedding_pair"]
