"""Layer skipping at run time and in training: per-call knobs, skip reports, router training.

The `layer_skip` pass (rewrite.passes.layer_skip) inserts the routers; this package holds what the
routed program calls when it runs and the API that trains the routers.
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
from rewrite.routing.runtime import RoutedBlock, layer_skip_route, routes_from_mask

__all__ = [
    "MODES",
    "RoutedBlock",
    "SkipControls",
    "SkipRecord",
    "SkipReport",
    "current_controls",
    "last_call_probabilities",
    "layer_skip_route",
    "record_skips",
    "routes_from_mask",
    "skip_controls",
]
