"""Graph passes of torch-rewrite: one module per pass, registered by name."""

from __future__ import annotations

from rewrite.passes.base import GraphPass, PassContext, PassResult

PASSES: dict[str, type[GraphPass]] = {}


def register_pass(cls: type[GraphPass]) -> type[GraphPass]:
    """Class decorator adding a pass to the registry under `cls.name`."""
    PASSES[cls.name] = cls
    return cls


from rewrite.passes import attention_normalize as _attention_normalize  # noqa: E402,F401
from rewrite.passes import layer_skip as _layer_skip  # noqa: E402,F401
from rewrite.passes import mixer as _mixer  # noqa: E402,F401
from rewrite.passes import sequence_parallel as _sequence_parallel  # noqa: E402,F401
from rewrite.passes import stateful as _stateful  # noqa: E402,F401
from rewrite.passes import varlen as _varlen  # noqa: E402,F401

__all__ = ["PASSES", "GraphPass", "PassContext", "PassResult", "register_pass"]
