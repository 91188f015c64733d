"""Reproduce the LARV paper's tables and figures as resumable FusionBench multiruns
(``python -m larv_lab.reproduce``); see docs/reproducing.md."""

from .experiments import EXPERIMENTS, Cell, Experiment, PoolSpec, Suite, Variant, expand

__all__ = ["EXPERIMENTS", "Cell", "Experiment", "PoolSpec", "Suite", "Variant", "expand"]
