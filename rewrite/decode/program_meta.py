"""How to call a program the `stateful` pass threaded: its inputs and the structure of its outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DecodeSignature:
    """Kept in `graph_module.meta["decode"]` by the `stateful` pass.

    `inputs` names the program's original flat inputs (before `decode_state`, which comes last);
    `in_spec` / `out_spec` are the pytree specs the capture used to flatten the call's arguments and
    to rebuild its outputs; `positions_in_graph` lists the `arange` nodes whose positions now
    continue from the state (the model computes positions itself, so all sequences of a batch
    share them); `routed_layers` the layer-skip routed blocks whose decisions are held from prefill;
    `slot_mask` whether some site keeps a full softmax KV cache, which needs the state's per-slot
    mask of real tokens (without one the state holds nothing that grows with the context).
    """

    inputs: list[str]
    in_spec: Any = None
    out_spec: Any = None
    positions_in_graph: list[str] = field(default_factory=list)
    routed_layers: list[str] = field(default_factory=list)
    slot_mask: bool = True
