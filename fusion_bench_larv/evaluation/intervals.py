"""The paired intervals, where the evaluation room has always named them; they live in
:mod:`fusion_bench_larv.core.intervals` (the validation guard reads them too)."""

from ..core.intervals import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    Interval,
    average_bootstrap,
    discordant,
    mcnemar_exact,
    paired_bootstrap,
)

__all__ = [
    "DEFAULT_LEVEL",
    "DEFAULT_RESAMPLES",
    "DEFAULT_SEED",
    "Interval",
    "average_bootstrap",
    "discordant",
    "mcnemar_exact",
    "paired_bootstrap",
]
