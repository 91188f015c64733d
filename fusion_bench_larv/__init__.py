"""fusion-bench-larv: LARV, a data-free layer-wise adaptive rescaling veneer for any task-vector
model merger, as a FusionBench plugin."""

from .diagnostics import commutator_conflict, effective_rank, rank_contrast, singular_values
from .gates import (
    composite_score,
    continuous_gate,
    depth_schedule,
    normalize_scores,
    tiered_gate,
)
from .layers import LayerGroupingError, group_layers
from .settings import LarvConfigError, LarvSettings
from .validation import LarvInputError, LarvLayerError, LarvWarning
from .veneer import LarvResult, apply_scales, compute_larv_scales

__version__ = "0.1.0"

__all__ = [
    "LARVAlgorithm",
    "LarvConfigError",
    "LarvInputError",
    "LarvLayerError",
    "LarvResult",
    "LarvSettings",
    "LarvWarning",
    "LayerGroupingError",
    "apply_scales",
    "commutator_conflict",
    "composite_score",
    "compute_larv_scales",
    "continuous_gate",
    "depth_schedule",
    "effective_rank",
    "group_layers",
    "normalize_scores",
    "rank_contrast",
    "singular_values",
    "tiered_gate",
]


def __getattr__(name):
    # the FusionBench adapter is imported lazily: the math above works without FusionBench
    if name == "LARVAlgorithm":
        from .algorithm import LARVAlgorithm

        return LARVAlgorithm
    raise AttributeError(name)
