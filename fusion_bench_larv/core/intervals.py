"""Paired intervals for a difference in accuracy (variant − base merger) over the same examples.
Plain bool vectors in (per-sample correctness, one entry per example, same examples in the same
order for both models), plain floats out; accuracies and differences as fractions. Pure numpy, in
``core`` so that both the test-set comparisons (:mod:`fusion_bench_larv.evaluation.compare`) and
the validation guard (:mod:`fusion_bench_larv.adapter.selection`) read the same intervals.

Notation for one task with n test images, a = the variant's correctness, b = the base's:
n₁₀ = #{i : a_i ∧ ¬b_i}, n₀₁ = #{i : ¬a_i ∧ b_i} (the discordant pairs), Δ = (n₁₀ − n₀₁) / n
= acc(a) − acc(b).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import NamedTuple

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
DEFAULT_LEVEL = 0.95


class Interval(NamedTuple):
    """A difference and its percentile bootstrap interval (fractions)."""

    delta: float
    lo: float
    hi: float

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.lo > 0 or self.hi < 0


def _pair(a: Sequence[bool], b: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"correctness vectors must be 1-D, got shapes {a.shape} and {b.shape}")
    if a.shape != b.shape:
        raise ValueError(
            f"paired correctness vectors differ in length ({a.size} vs {b.size}): "
            "they must cover the same test images in the same order"
        )
    if a.size == 0:
        raise ValueError("empty correctness vectors")
    return a.astype(bool), b.astype(bool)


def _counts(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int]:
    """(n₁₀, n₀₁, n) of two checked bool vectors."""
    return int(np.sum(a & ~b)), int(np.sum(~a & b)), int(a.size)


def discordant(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, int]:
    """(n₁₀, n₀₁, n) of two paired correctness vectors."""
    return _counts(*_pair(a, b))


def _orientation(a: np.ndarray, b: np.ndarray, n10: int, n01: int) -> float:
    """+1 when a has more of the discordant pairs, −1 when b has; on a tie, the direction of
    the first discordant image (+1 when there is none). Swapping a and b flips it."""
    if n10 != n01:
        return 1.0 if n10 > n01 else -1.0
    diff = np.flatnonzero(a != b)
    return 1.0 if diff.size == 0 or a[diff[0]] else -1.0


def _bootstrap_deltas(a: np.ndarray, b: np.ndarray, resamples: int, rng) -> np.ndarray:
    """B draws of Δ* = (N₁₀* − N₀₁*) / n, where (N₁₀*, N₀₁*, rest) ~ Multinomial(n; n₁₀/n,
    n₀₁/n, 1 − (n₁₀ + n₀₁)/n): exactly the counts of discordant images among n test images drawn
    with replacement (the paired bootstrap over images, without materialising the indices).
    The two discordant categories are drawn in an order that does not depend on which vector
    is a (fewer first, see :func:`_orientation`), so swapping a and b gives exactly −Δ* from
    the same stream."""
    n10, n01, n = _counts(a, b)
    if n10 + n01 == 0:
        return np.zeros(resamples)
    small, large = sorted((n10, n01))
    counts = rng.multinomial(n, [small / n, large / n, (n - small - large) / n], size=resamples)
    diff = (counts[:, 1] - counts[:, 0]).astype(np.float64)  # N_large − N_small
    return _orientation(a, b, n10, n01) * diff / n


def _percentile(deltas: np.ndarray, level: float) -> tuple[float, float]:
    """The k-th smallest and k-th largest of the B sorted draws, k = ⌊B(1 − level)/2⌋ (0-based
    indices k and B − 1 − k): the percentile interval, symmetric under negation."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    s = np.sort(deltas)
    k = min(int(math.floor(len(s) * (1 - level) / 2)), (len(s) - 1) // 2)
    return float(s[k]), float(s[len(s) - 1 - k])


def _delta(a: np.ndarray, b: np.ndarray) -> float:
    """Δ = (n₁₀ − n₀₁) / n."""
    n10, n01, n = _counts(a, b)
    return (n10 - n01) / n


def _check_resamples(resamples: int) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")


def paired_bootstrap(
    a: Sequence[bool],
    b: Sequence[bool],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    level: float = DEFAULT_LEVEL,
) -> Interval:
    """Δ = acc(a) − acc(b) and its paired bootstrap percentile interval: B resamples of the n
    test images with replacement (the same images for both models), Δ* per resample, the sorted
    Δ* at 0-based positions k and B − 1 − k, k = ⌊B(1 − level)/2⌋ (see
    :func:`_bootstrap_deltas`, :func:`_percentile`). Seeded: ``numpy.random.default_rng(seed)``."""
    _check_resamples(resamples)
    a, b = _pair(a, b)
    deltas = _bootstrap_deltas(a, b, resamples, np.random.default_rng(seed))
    lo, hi = _percentile(deltas, level)
    return Interval(_delta(a, b), lo, hi)


def average_bootstrap(
    pairs: Sequence[tuple[Sequence[bool], Sequence[bool]]],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    level: float = DEFAULT_LEVEL,
) -> Interval:
    """Δ̄ = (1/T) Σ_t Δ_t over T tasks (equal task weights, as FusionBench's average accuracy)
    and its interval: each resample draws every task's images independently (task t from
    ``default_rng([seed, t])``), Δ̄* = (1/T) Σ_t Δ_t*, percentile interval as
    :func:`paired_bootstrap`."""
    _check_resamples(resamples)
    if not pairs:
        raise ValueError("average_bootstrap needs at least one task")
    total = np.zeros(resamples)
    delta = 0.0
    for t, (a, b) in enumerate(pairs):
        a, b = _pair(a, b)
        total += _bootstrap_deltas(a, b, resamples, np.random.default_rng([seed, t]))
        delta += _delta(a, b)
    lo, hi = _percentile(total / len(pairs), level)
    return Interval(delta / len(pairs), lo, hi)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Exact McNemar test (two-sided): with m = n₁₀ + n₀₁ discordant pairs,
    p = min(1, 2 · P(X ≤ min(n₁₀, n₀₁))), X ~ Binomial(m, ½); p = 1 when m = 0."""
    n10, n01, _ = discordant(a, b)
    m = n10 + n01
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(n10, n01) + 1))
    return min(1.0, float(Fraction(2 * tail, 2**m)))  # exact integers, rounded once
