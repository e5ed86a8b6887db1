"""Sequence parallelism: one long sequence split over the ranks of a group.

The `sequence_parallel` pass puts the functions of `graph_functions` in the graph; this package
holds what they run (softmax strategies, linear-state prefixes, kernel modes), the shard layouts,
the groups they communicate through, the input / loss helpers, and the communication cost model.
"""

from rewrite.distributed.groups import (
    CountingGroup,
    GroupError,
    SequenceGroup,
    bind_group,
    get_group,
    register_group,
    run_on_threads,
    threaded_groups,
)
from rewrite.distributed.inputs import (
    all_reduce_gradients,
    gather_sequence,
    pad_to_multiple,
    sequence_parallel_loss,
    shard_inputs,
    shift_labels,
)
from rewrite.distributed.layout import LAYOUTS, global_positions, shard, unshard

__all__ = [
    "LAYOUTS",
    "CountingGroup",
    "GroupError",
    "SequenceGroup",
    "all_reduce_gradients",
    "bind_group",
    "gather_sequence",
    "get_group",
    "global_positions",
    "pad_to_multiple",
    "register_group",
    "run_on_threads",
    "sequence_parallel_loss",
    "shard",
    "shard_inputs",
    "shift_labels",
    "threaded_groups",
    "unshard",
]
