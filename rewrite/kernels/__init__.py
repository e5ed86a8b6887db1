"""Kernel ops of torch-rewrite. Importing this package registers every op under `torch.ops.rewrite`.

Each op has a CPU implementation in plain PyTorch (the reference) and a CUDA implementation in
Triton; Triton is imported only when a CUDA tensor reaches a Triton path.
"""

import sys

if __name__ != "rewrite.kernels":
    # Loaded under the top-level name `kernels` (a source checkout on sys.path; transformers probes
    # that name for its kernel hub). Registering the ops a second time would replace the first
    # registration, so this name becomes an alias of the real package instead.
    import importlib

    sys.modules[__name__] = importlib.import_module("rewrite.kernels")
else:
    from .delta_rule import delta_rule, delta_rule_step
    from .gated_activation import gated_activation
    from .kv_cache_attention import kv_cache_attention
    from .kv_cache_write import kv_cache_write_
    from .linear_attention import linear_attention, linear_attention_step
    from .rms_norm import rms_norm
    from .rotary import rotary_embedding, rotary_embedding_pair
    from .row_gather import gather_rows
    from .row_scatter import add_rows_into_
    from .short_conv import short_conv
    from .sliding_window import fill_ring_cache, sliding_window_attention, sliding_window_attention_step

    __all__ = [
        "add_rows_into_",
        "delta_rule",
        "delta_rule_step",
        "fill_ring_cache",
        "gather_rows",
        "gated_activation",
        "kv_cache_attention",
        "kv_cache_write_",
        "linear_attention",
        "linear_attention_step",
        "rms_norm",
        "rotary_embedding",
        "rotary_embedding_pair",
        "short_conv",
        "sliding_window_attention",
        "sliding_window_attention_step",
    ]
