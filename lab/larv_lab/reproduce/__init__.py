"""Reproduce the LARV paper's tables and figures as resumable FusionBench multiruns
(``python -m larv_lab.reproduce``); see README, "Reproducing the paper"."""

from .experiments import EXPERIMENTS, Cell, Experiment, PoolSpec, Suite, Variant, expand

__all__ = ["EXPERIMENTS", "Cell", "Experiment", "PoolSpec", "Suite", "Variant", "expand"]
