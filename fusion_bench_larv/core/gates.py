"""Composite score, gates and the shapes of the depth-only schedules (docs/method.md, "Composite
score and gates", "Median-normalized scores" and "Depth-only schedules"). Plain Python floats in,
plain lists out; the gates and schedules by name are in :mod:`.registry`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

DEFAULT_LEVELS = (0.5, 1.0, 1.5)

# Levels of the fixed tier schedules (paper Appendix D.1).
TIER_LEVELS: dict[str, tuple[float, ...]] = {
    "tier2": (0.5, 1.5),
    "tier3": (0.5, 1.0, 1.5),
    "tier6": (0.5, 0.7, 0.9, 1.1, 1.3, 1.5),
    "tier12": tuple(0.5 + i / 11 for i in range(12)),
}
# How the continuous gate reads w: `none` (the paper) or `median` (w / median w; not in the paper).
W_NORMALIZATIONS = ("none", "median")


def depth_prior(num_layers: int) -> list[float]:
    """r_ℓ = ℓ / L for ℓ = 1..L."""
    return [(i + 1) / num_layers for i in range(num_layers)]


def depth_fraction(num_layers: int) -> list[float]:
    """f_i = i / (L − 1) for i = 0..L−1 (the depth ramps' position: 0 at the first block, 1 at
    the last); ½ for a single block."""
    return [i / (num_layers - 1) if num_layers > 1 else 0.5 for i in range(num_layers)]


def standardize(values: Sequence[float]) -> list[float]:
    """z-scores with the population std; all zeros when the std is zero."""
    n = len(values)
    if n == 0:
        return []
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / n
    std = math.sqrt(var)
    if std <= 1e-12 * max(1.0, abs(mean)):
        return [0.0] * n
    return [(v - mean) / std for v in values]


def softplus(t: float) -> float:
    """sp(t) = log(1 + e^t), overflow-safe."""
    return max(t, 0.0) + math.log1p(math.exp(-abs(t)))


def composite_score(
    e: Sequence[float],
    c: Sequence[float],
    eta: float = 1.0,
    rho: float = 0.5,
    zeta: float = 1.0,
    use_info: bool = True,
    use_depth_prior: bool = True,
    use_conflict: bool = True,
) -> list[float]:
    """w_ℓ = e_ℓ^η · r_ℓ^ρ / (sp(z(c_ℓ)) + 1)^ζ; a switched-off factor is 1 (paper Table 3)."""
    if len(e) != len(c):
        raise ValueError(f"e has {len(e)} layers but c has {len(c)}")
    r = depth_prior(len(e))
    z = standardize(c)
    w = []
    for e_l, r_l, z_l in zip(e, r, z, strict=True):
        num = (e_l**eta if use_info else 1.0) * (r_l**rho if use_depth_prior else 1.0)
        den = (softplus(z_l) + 1.0) ** zeta if use_conflict else 1.0
        w.append(num / den)
    return w


def empirical_quantile(values: Sequence[float], q: float) -> float:
    """t = inf{t : F̂(t) ≥ q} for the empirical CDF F̂ of ``values``."""
    if not values:
        raise ValueError("empirical_quantile of an empty list")
    s = sorted(values)
    n = len(s)
    # smallest k (1-based) with k/n >= q; the tolerance keeps q = 1/3, n = 12 at k = 4
    k = max(1, math.ceil(q * n - 1e-9))
    return s[min(k, n) - 1]


def tiered_gate(
    w: Sequence[float],
    alpha: float = 1 / 3,
    beta: float = 2 / 3,
    levels: Sequence[float] = DEFAULT_LEVELS,
) -> tuple[list[float], tuple[float, float]]:
    """s = levels[0] if w ≤ t1, levels[1] if t1 < w ≤ t2, levels[2] otherwise, with (t1, t2) the
    (α, β) empirical quantiles of the scores. Returns the scales and (t1, t2).

    It reads only the order of the scores, so it is already scale-free: w → k·w (k > 0) gives the
    same scales, and :func:`normalize_scores` does not apply to it (docs/method.md,
    "Median-normalized scores")."""
    t1, t2 = empirical_quantile(w, alpha), empirical_quantile(w, beta)
    lo, mid, hi = levels
    return [lo if x <= t1 else (mid if x <= t2 else hi) for x in w], (t1, t2)


def continuous_gate(w: Sequence[float], gamma: float = 3.0) -> list[float]:
    """s = 1 + 0.5·tanh(γ(w − 1)), in (0.5, 1.5). It reads the level of w: for the scale-free
    variant pass the scores through :func:`normalize_scores` first."""
    return [1.0 + 0.5 * math.tanh(gamma * (x - 1.0)) for x in w]


def median(values: Sequence[float]) -> float:
    """The median of L values: the middle one of the sorted values for odd L, the mean of the two
    middle ones, (w_(L/2) + w_(L/2+1)) / 2, for even L (as ``numpy.median``)."""
    if not values:
        raise ValueError("median of an empty list")
    s = sorted(values)
    n, h = len(s), len(s) // 2
    return float(s[h]) if n % 2 else (s[h - 1] + s[h]) / 2


def normalize_scores(w: Sequence[float], how: str = "none") -> tuple[list[float], float | None]:
    """The scores as the continuous gate reads them, and the normalizer they were divided by
    (docs/method.md, "Median-normalized scores"; ``median`` is not the paper's rule).

    ``none`` (the paper's rule, default): w̃_ℓ = w_ℓ; the normalizer is None.
    ``median``: w̃_ℓ = w_ℓ / m with m = median_ℓ(w_ℓ) over the L layers (:func:`median`; for even
    L the mean of the two middle scores). Scale-free: w → k·w (k > 0) leaves w̃ unchanged, so
    1 + ½·tanh(γ(w̃_ℓ − 1)) reads only the layer-to-layer profile, and a layer at the median gets
    s = 1. When m ≤ 0 (scores are ≥ 0, so at least half of them are 0, e.g. an all-zero update) the
    ratio is undefined: w̃ = w and the normalizer is 1.0.
    """
    if how not in W_NORMALIZATIONS:
        raise ValueError(
            f"unknown score normalization {how!r}; allowed: {', '.join(W_NORMALIZATIONS)}"
        )
    w = [float(x) for x in w]
    if how == "none":
        return w, None
    m = median(w)
    if not m > 0:
        return w, 1.0
    return [x / m for x in w], m


def tiers(num_layers: int, levels: Sequence[float]) -> list[float]:
    """Proportional mapping of L layers onto K = len(levels) tiers by each layer's centre:
    tier = ⌊(i + ½)·K/L⌋. Equals ⌊i·K/L⌋ when K divides L; otherwise it stays symmetric, gives
    every tier ⌊L/K⌋ or ⌈L/K⌉ layers and, when 2L > K, reaches both the first and the last level
    (⌊i·K/L⌋ would never give the deepest level to any layer when L < K)."""
    k = len(levels)
    return [
        float(levels[min(k - 1, ((2 * i + 1) * k) // (2 * num_layers))]) for i in range(num_layers)
    ]
