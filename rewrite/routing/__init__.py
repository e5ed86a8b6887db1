"""Layer skipping at run time and in training: per-call knobs, skip reports, router training.

The `layer_skip` pass (rewrite.passes.layer_skip) inserts the routers; this package holds what the
routed program calls when it runs, how other passes find and extend routed blocks in a graph
(`rewrite.routing.graph`), and the API that trains the routers.
"""

from rewrite.routing.controls import (
    MODES,
    SkipControls,
    SkipRecord,
    SkipReport,
    current_controls,
    last_call_probabilities,
    record_skips,
    skip_controls,
)
from rewrite.routing.graph import (
    RoutedCall,
    add_block_input,
    is_routed_block,
    outer_value,
    replace_route,
    routed_calls,
)
from rewrite.routing.runtime import (
    HeldDecisions,
    InputRule,
    RoutedBlock,
    RowSelectable,
    SharesRowReads,
    layer_skip_route,
    routes_from_mask,
)

__all__ = [
    "MODES",
    "HeldDecisions",
    "InputRule",
    "RoutedBlock",
    "RoutedCall",
    "RowSelectable",
    "SharesRowReads",
    "SkipControls",
    "SkipRecord",
    "SkipReport",
    "add_block_input",
    "current_controls",
    "is_routed_block",
    "last_call_probabilities",
    "layer_skip_route",
    "outer_value",
    "record_skips",
    "replace_route",
    "routed_calls",
    "routes_from_mask",
    "skip_controls",
]
