"""Decoding with an optimized module: state containers, stateful sites, the decode program, the
generation loop with sampling and streaming, and CUDA-graph replay and torch.compile of the decode
step.

`OptimizedModule.generate` is the entry point; `generate` and `stream` here take the module first.
"""

from __future__ import annotations

from typing import Any

from rewrite.decode.state import DecodeState, KVCache, RecurrentState, RingKVCache


def __getattr__(name: str) -> Any:
    # the loop and the program import the pipeline, which imports the passes that import this package
    if name in ("generate", "stream", "StepTokens", "decode_program"):
        from rewrite.decode import loop

        return getattr(loop, name)
    if name in ("hf_generation_model", "DecodeStateCache"):
        from rewrite.decode import hf

        return getattr(hf, name)
    if name == "DecodeProgram":
        from rewrite.decode.program import DecodeProgram

        return DecodeProgram
    raise AttributeError(f"module 'rewrite.decode' has no attribute {name!r}")


__all__ = ["DecodeProgram", "DecodeState", "DecodeStateCache", "KVCache", "RecurrentState", "StepTokens",
           "RingKVCache", "decode_program", "generate", "hf_generation_model", "stream"]
