"""Reproduce the LARV paper's tables and figures as resumable FusionBench multiruns
(``python -m fusion_bench_larv.reproduce``); see README, "Reproducing the paper"."""

from .experiments import EXPERIMENTS, Cell, Experiment, PoolSpec, Suite, Variant, expand

__all__ = ["EXPERIMENTS", "Cell", "Experiment", "PoolSpec", "Suite", "Variant", "expand"]
