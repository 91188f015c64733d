"""Composite score, gates and depth schedules against the formulas of docs/method.md
("Composite score and gates", "Depth-only schedules") and hand-listed values."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_bench_larv.core.gates import (
    composite_score,
    continuous_gate,
    depth_prior,
    empirical_quantile,
    median,
    normalize_scores,
    softplus,
    standardize,
    tiered_gate,
)
from fusion_bench_larv.core.registry import depth_schedule


def test_softplus_and_standardize():
    assert softplus(0.0) == pytest.approx(math.log(2.0))
    assert softplus(50.0) == pytest.approx(50.0)
    assert softplus(-800.0) == pytest.approx(0.0, abs=1e-300)
    # population std: [1, 3] -> mean 2, std 1
    assert standardize([1.0, 3.0]) == [-1.0, 1.0]
    assert standardize([2.0, 2.0, 2.0]) == [0.0, 0.0, 0.0]


def test_depth_prior():
    assert depth_prior(4) == [0.25, 0.5, 0.75, 1.0]


def _direct(e, c, eta, rho, zeta, info=True, depth=True, conflict=True):
    n = len(e)
    mu = sum(c) / n
    sd = math.sqrt(sum((x - mu) ** 2 for x in c) / n)
    out = []
    for i in range(n):
        z = (c[i] - mu) / sd
        num = (e[i] ** eta if info else 1) * (((i + 1) / n) ** rho if depth else 1)
        den = (math.log(1 + math.exp(z)) + 1) ** zeta if conflict else 1
        out.append(num / den)
    return out


@pytest.mark.parametrize(
    "switches", [(True, True, True), (False, True, True), (True, False, True), (True, True, False)]
)
@pytest.mark.parametrize(
    ("eta", "rho", "zeta"), [(1.0, 0.5, 1.0), (2.0, 0.0, 0.5), (0.5, 1.5, 2.0)]
)
def test_composite_score_matches_formula(switches, eta, rho, zeta):
    e = [0.8, 1.2, 1.0, 2.5, 0.3]
    c = [0.4, 0.1, 0.35, 0.2, 0.05]
    info, depth, conflict = switches
    got = composite_score(e, c, eta, rho, zeta, info, depth, conflict)
    assert got == pytest.approx(_direct(e, c, eta, rho, zeta, info, depth, conflict), rel=1e-12)


def test_empirical_quantile_definition():
    w = [5.0, 1.0, 3.0, 2.0, 4.0, 6.0]
    assert empirical_quantile(w, 1 / 3) == 2.0  # F̂(2) = 2/6 ≥ 1/3
    assert empirical_quantile(w, 2 / 3) == 4.0
    assert empirical_quantile(w, 0.5) == 3.0
    assert empirical_quantile([1.0, 1.0, 1.0, 2.0], 0.5) == 1.0  # ties: F̂(1) = 3/4


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=12, max_size=12, unique=True))
def test_tiered_gate_gives_four_four_four_on_twelve_distinct_scores(w):
    s, (t1, t2) = tiered_gate(w)
    assert s.count(0.5) == 4 and s.count(1.0) == 4 and s.count(1.5) == 4
    assert t1 < t2
    for x, si in zip(w, s, strict=True):  # monotone in w
        assert si == (0.5 if x <= t1 else 1.0 if x <= t2 else 1.5)


def test_tiered_gate_custom_levels_and_quantiles():
    s, _ = tiered_gate([1, 2, 3, 4], alpha=0.25, beta=0.75, levels=(0.0, 1.0, 2.0))
    assert s == [0.0, 1.0, 1.0, 2.0]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=30), st.floats(0.1, 10))
def test_continuous_gate_is_bounded_and_monotone(w, gamma):
    s = continuous_gate(w, gamma)
    assert all(0.5 <= x <= 1.5 for x in s)
    order = sorted(range(len(w)), key=lambda i: w[i])
    assert all(s[a] <= s[b] for a, b in zip(order, order[1:], strict=False))


def test_continuous_gate_values():
    assert continuous_gate([1.0]) == [1.0]
    assert continuous_gate([1.2], gamma=3.0)[0] == pytest.approx(1 + 0.5 * math.tanh(0.6))
    assert all(0.5 < x < 1.5 for x in continuous_gate([0.0, 0.5, 1.5, 2.0]))


def test_depth_schedules_on_twelve_layers():
    assert depth_schedule("uniform", 12) == [1.0] * 12
    assert depth_schedule("uniform", 12, [0.7]) == [0.7] * 12
    lin = depth_schedule("linear", 12)
    assert lin[0] == 0.5 and lin[-1] == 1.5 and lin[6] == pytest.approx(0.5 + 6 / 11)
    assert depth_schedule("tier2", 12) == [0.5] * 6 + [1.5] * 6
    assert depth_schedule("tier3", 12) == [0.5] * 4 + [1.0] * 4 + [1.5] * 4
    assert depth_schedule("tier6", 12) == pytest.approx(
        [0.5, 0.5, 0.7, 0.7, 0.9, 0.9, 1.1, 1.1, 1.3, 1.3, 1.5, 1.5]
    )
    assert depth_schedule("tier12", 12) == pytest.approx([0.5 + i / 11 for i in range(12)])
    assert depth_schedule("custom", 12, [0.0, 1.0, 1.4]) == [0.0] * 4 + [1.0] * 4 + [1.4] * 4
    assert depth_schedule("lines", 12, [0.2, 0.6]) == pytest.approx(
        [0.2 + 0.6 * i / 11 for i in range(12)]
    )


def test_tiers_map_proportionally_when_not_a_multiple():
    assert depth_schedule("tier3", 24) == [0.5] * 8 + [1.0] * 8 + [1.5] * 8
    # by layer centre, ⌊(i + ½)K/L⌋: symmetric, both ends reached
    assert depth_schedule("tier3", 7) == [0.5, 0.5, 1.0, 1.0, 1.0, 1.5, 1.5]
    assert depth_schedule("tier6", 5) == pytest.approx([0.5, 0.7, 1.1, 1.3, 1.5])
    assert depth_schedule("tier2", 5) == [0.5, 0.5, 1.5, 1.5, 1.5]
    assert depth_schedule("tier12", 6) == pytest.approx([0.5 + j / 11 for j in (1, 3, 5, 7, 9, 11)])


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        depth_schedule("tier4", 12)


# -- more: softplus, standardize, composite score ----------------------------------------------
@pytest.mark.parametrize("x", [-30.0, -2.5, -1.0, 0.3, 1.0, 4.0, 30.0])
def test_softplus_matches_definition(x):
    assert softplus(x) == pytest.approx(math.log(1.0 + math.exp(x)), rel=1e-12)


def test_softplus_does_not_overflow():
    assert softplus(1000.0) == 1000.0
    assert softplus(-1000.0) == 0.0


def test_standardize_population_std_by_hand():
    # [1, 2, 3, 4]: mean 2.5, population variance 1.25 (the sample variance would be 5/3)
    sd = math.sqrt(1.25)
    assert standardize([1.0, 2.0, 3.0, 4.0]) == pytest.approx(
        [-1.5 / sd, -0.5 / sd, 0.5 / sd, 1.5 / sd]
    )
    assert standardize([7.0]) == [0.0]
    assert standardize([]) == []
    assert standardize([1e6, 1e6]) == [0.0, 0.0]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=20))
def test_standardize_has_zero_mean_unit_population_std(v):
    z = standardize(v)
    if max(v) - min(v) > 1e-6:
        assert sum(z) / len(z) == pytest.approx(0.0, abs=1e-9)
        assert sum(x * x for x in z) / len(z) == pytest.approx(1.0, rel=1e-9)


def test_composite_score_by_hand():
    # e = (1, 1), c = (0, 1): z = (−1, 1), r = (1/2, 1); defaults η = 1, ρ = ½, ζ = 1
    w = composite_score([1.0, 1.0], [0.0, 1.0])
    assert w[0] == pytest.approx(math.sqrt(0.5) / (math.log(1 + math.exp(-1)) + 1))
    assert w[1] == pytest.approx(1.0 / (math.log(1 + math.e) + 1))
    # e enters linearly with η = 1 and to the power η otherwise
    assert composite_score([2.0, 3.0], [0.0, 1.0])[1] == pytest.approx(3 * w[1])
    assert composite_score([2.0, 3.0], [0.0, 1.0], eta=2.0)[1] == pytest.approx(9 * w[1])


def test_composite_score_constant_conflict_gives_z_zero():
    # std(c) = 0: z = 0 and the conflict factor is (ln 2 + 1)^ζ for every layer
    e = [0.5, 1.0, 2.0]
    got = composite_score(e, [0.3] * 3, zeta=2.0)
    want = [e[i] * math.sqrt((i + 1) / 3) / (math.log(2) + 1) ** 2 for i in range(3)]
    assert got == pytest.approx(want)


def test_composite_score_all_factors_off_and_zero_exponents():
    e, c = [0.0, 3.0, 7.0], [0.1, 0.9, 0.4]
    assert (
        composite_score(e, c, use_info=False, use_depth_prior=False, use_conflict=False)
        == [1.0] * 3
    )
    assert composite_score(e, c, eta=0.0, rho=0.0, zeta=0.0) == [1.0] * 3
    # e = 0 (a layer without update) scores 0 whenever the info factor is on
    assert composite_score(e, c)[0] == 0.0


def test_composite_score_length_mismatch():
    with pytest.raises(ValueError, match="layers"):
        composite_score([1.0, 2.0], [0.1])


def test_depth_prior_edges():
    assert depth_prior(1) == [1.0]
    assert depth_prior(12) == pytest.approx([i / 12 for i in range(1, 13)])


# -- empirical quantile -------------------------------------------------------------------------
def test_empirical_quantile_hand_cases_with_ties():
    v = [2.0, 1.0, 2.0, 3.0, 2.0]  # F̂(1) = 0.2, F̂(2) = 0.8, F̂(3) = 1
    assert empirical_quantile(v, 0.2) == 1.0
    assert empirical_quantile(v, 0.21) == 2.0
    assert empirical_quantile(v, 0.8) == 2.0
    assert empirical_quantile(v, 0.81) == 3.0
    assert empirical_quantile(v, 1.0) == 3.0
    assert empirical_quantile(v, 1e-9) == 1.0
    twelve = [float(i) for i in range(12, 0, -1)]
    assert empirical_quantile(twelve, 1 / 3) == 4.0  # F̂(4) = 4/12 exactly (no float slip to 5)
    assert empirical_quantile(twelve, 2 / 3) == 8.0
    with pytest.raises(ValueError):
        empirical_quantile([], 0.5)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(-5, 5).map(float), min_size=1, max_size=25),
    st.integers(1, 99).map(lambda k: k / 100),
)
def test_empirical_quantile_is_the_infimum(values, q):
    # the definition, literally: t is a sample, F̂(t) ≥ q, and F̂(t') < q for every sample t' < t
    n = len(values)
    t = empirical_quantile(values, q)
    assert t in values

    def cdf(x):
        return sum(v <= x for v in values) / n

    assert cdf(t) >= q - 1e-12
    assert all(cdf(x) < q for x in values if x < t)


# -- tiered gate --------------------------------------------------------------------------------
def test_tiered_gate_with_ties_by_hand():
    # t1 = 1 (F̂(1) = 1/2 ≥ 1/3), t2 = 2 (F̂(2) = 5/6 ≥ 2/3)
    s, th = tiered_gate([1.0, 1.0, 1.0, 2.0, 2.0, 3.0])
    assert th == (1.0, 2.0)
    assert s == [0.5, 0.5, 0.5, 1.0, 1.0, 1.5]
    # all equal: every score is ≤ t1
    assert tiered_gate([0.7] * 5)[0] == [0.5] * 5


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=40, unique=True),
    st.sampled_from([(1 / 3, 2 / 3), (0.25, 0.75), (0.1, 0.5)]),
)
def test_tiered_gate_tier_sizes_on_distinct_scores(w, ab):
    # distinct scores: exactly ⌈αL⌉ lowest get levels[0], up to ⌈βL⌉ get levels[1]
    alpha, beta = ab
    n = len(w)
    levels = (0.0, 0.25, 2.0)
    s, _ = tiered_gate(w, alpha, beta, levels)
    k1, k2 = math.ceil(alpha * n - 1e-9), math.ceil(beta * n - 1e-9)
    by_rank = [s[i] for i in sorted(range(n), key=lambda i: w[i])]
    assert by_rank == [0.0] * k1 + [0.25] * (k2 - k1) + [2.0] * (n - k2)


def test_tiered_gate_on_twelve_layers_uses_the_given_levels():
    w = [0.1 * i for i in (5, 3, 11, 0, 8, 1, 7, 10, 2, 6, 9, 4)]
    s, (t1, t2) = tiered_gate(w, levels=(0.2, 0.9, 1.7))
    assert t1 == pytest.approx(0.3) and t2 == pytest.approx(0.7)
    assert s == [0.9, 0.2, 1.7, 0.2, 1.7, 0.2, 0.9, 1.7, 0.2, 0.9, 1.7, 0.9]


# -- continuous gate ----------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.floats(-3.0, 5.0), st.floats(-3.0, 5.0), st.floats(0.1, 3.0))
def test_continuous_gate_strict_bounds_symmetry_and_monotonicity(a, b, gamma):
    sa, sb = continuous_gate([a, b], gamma)
    assert 0.5 < sa < 1.5
    if a < b:
        assert sa < sb or sa == pytest.approx(sb, abs=1e-15)
    # s(1 + d) + s(1 − d) = 2 (tanh is odd)
    d = a - 1.0
    assert sum(continuous_gate([1 + d, 1 - d], gamma)) == pytest.approx(2.0)


def test_continuous_gate_at_one_is_one_for_any_gamma():
    for gamma in (0.1, 1.0, 3.0, 50.0):
        assert continuous_gate([1.0], gamma) == [1.0]
    # default γ = 3
    assert continuous_gate([0.0])[0] == pytest.approx(1 - 0.5 * math.tanh(3.0))


# -- median-normalized scores (`w_normalize: median`; not the paper's rule) ----------------------
def test_median_of_odd_and_even_numbers_of_layers():
    assert median([3.0, 1.0, 2.0]) == 2.0
    # even L: the mean of the two middle scores of the sorted list, as numpy.median
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert median([5.0, 1.0]) == 3.0 and median([7.0]) == 7.0
    with pytest.raises(ValueError):
        median([])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=30))
def test_median_is_numpys(values):
    import numpy as np

    assert median(values) == pytest.approx(float(np.median(values)), rel=1e-12, abs=1e-9)


def test_median_normalized_continuous_gate_by_hand():
    # w = (1, 2, 4): m = 2, w / m = (0.5, 1, 2); γ = 3:
    # s = 1 + ½·tanh(−1.5), 1, 1 + ½·tanh(3)
    w_tilde, m = normalize_scores([1.0, 2.0, 4.0], "median")
    assert m == 2.0 and w_tilde == [0.5, 1.0, 2.0]
    s = continuous_gate(w_tilde, 3.0)
    assert s == pytest.approx([0.5474258732, 1.0, 1.4975273768], abs=1e-10)
    # the paper's rule on the same scores: 1 + ½·tanh(0), ½·tanh(3), ½·tanh(9)
    assert continuous_gate([1.0, 2.0, 4.0], 3.0) == pytest.approx(
        [1.0, 1.4975273768, 1.4999999848], abs=1e-10
    )


def test_median_normalized_gate_with_an_even_number_of_layers_by_hand():
    # L = 4: m = (2 + 3) / 2 = 2.5, w / m = (1.6, 0.4, 1.2, 0.8): s = 1 ± ½·tanh(1.8), 1 ± ½·tanh(0.6)
    w_tilde, m = normalize_scores([4.0, 1.0, 3.0, 2.0], "median")
    assert m == 2.5 and w_tilde == pytest.approx([1.6, 0.4, 1.2, 0.8], rel=1e-15)
    s = continuous_gate(w_tilde)
    assert s == pytest.approx([1.4734030064, 0.5265969936, 1.2685247835, 0.7314752165], abs=1e-10)
    # no layer sits at the median: the scales are symmetric about 1 around it
    assert s[0] + s[1] == pytest.approx(2.0) and s[2] + s[3] == pytest.approx(2.0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(1e-3, 1e3), min_size=2, max_size=24),
    st.floats(1e-3, 1e3),
    st.floats(0.1, 10.0),
)
def test_median_normalized_gate_is_scale_free(w, k, gamma):
    scaled = [k * x for x in w]
    s, m = normalize_scores(w, "median")
    s_k, m_k = normalize_scores(scaled, "median")
    assert m_k == pytest.approx(k * m, rel=1e-12)
    assert continuous_gate(s_k, gamma) == pytest.approx(continuous_gate(s, gamma), abs=1e-9)


def test_the_papers_rule_is_not_scale_free_and_the_tiered_gate_is():
    w = [0.2, 0.5, 0.9, 1.4, 3.0]
    for k in (0.5, 2.0, 10.0):
        scaled = [k * x for x in w]
        # default (`none`): the level of w moves every scale
        assert normalize_scores(scaled) == (scaled, None)
        paper, paper_k = continuous_gate(w), continuous_gate(scaled)
        assert paper_k != pytest.approx(paper, abs=1e-3)
        # median: unchanged
        med = continuous_gate(normalize_scores(w, "median")[0])
        assert continuous_gate(normalize_scores(scaled, "median")[0]) == pytest.approx(med)
        # the tiered gate reads the order only: scale-free already (thresholds scale with w)
        (t, (t1, t2)), (t_k, (t1_k, t2_k)) = tiered_gate(w), tiered_gate(scaled)
        assert t_k == t and (t1_k, t2_k) == pytest.approx((k * t1, k * t2))
    # the median layer gets s = 1 exactly
    assert continuous_gate(normalize_scores(w, "median")[0])[2] == 1.0


def test_median_normalization_when_the_median_is_not_positive():
    # scores are ≥ 0; with m = 0 the ratio is undefined: the scores are read as they are
    assert normalize_scores([0.0, 0.0, 0.0, 1.0], "median") == ([0.0, 0.0, 0.0, 1.0], 1.0)
    assert normalize_scores([0.0, 0.0], "median") == ([0.0, 0.0], 1.0)
    with pytest.raises(ValueError, match="median"):
        normalize_scores([1.0], "mean")


# -- depth schedules ----------------------------------------------------------------------------
def test_tier_levels_as_documented():
    # the tier2 / tier3 / tier6 / tier12 levels of docs/method.md, "Depth-only schedules"
    from fusion_bench_larv.core.gates import TIER_LEVELS

    assert TIER_LEVELS["tier2"] == (0.5, 1.5)
    assert TIER_LEVELS["tier3"] == (0.5, 1.0, 1.5)
    assert TIER_LEVELS["tier6"] == pytest.approx((0.5, 0.7, 0.9, 1.1, 1.3, 1.5))
    t12 = TIER_LEVELS["tier12"]
    assert len(t12) == 12 and t12[0] == 0.5 and t12[-1] == pytest.approx(1.5)
    assert all(b - a == pytest.approx(1 / 11) for a, b in zip(t12, t12[1:], strict=False))


def test_linear_schedule_endpoints_exact():
    for n in (2, 5, 12, 24):
        lin = depth_schedule("linear", n)
        assert lin[0] == 0.5 and lin[-1] == 1.5
        assert lin == pytest.approx([0.5 + i / (n - 1) for i in range(n)])
    assert depth_schedule("linear", 1) == [1.0]  # one layer: the middle of the range


def test_tier_schedules_on_twenty_four_layers():
    assert depth_schedule("tier2", 24) == [0.5] * 12 + [1.5] * 12
    tier6 = [0.5, 0.7, 0.9, 1.1, 1.3, 1.5]
    assert depth_schedule("tier6", 24) == pytest.approx([v for v in tier6 for _ in range(4)])
    assert depth_schedule("tier12", 24) == pytest.approx(
        [0.5 + j / 11 for j in range(12) for _ in range(2)]
    )
    assert depth_schedule("custom", 24, [0.0, 1.0, 1.0]) == [0.0] * 8 + [1.0] * 16


def test_custom_schedule_in_thirds_with_freeze_rows():
    assert depth_schedule("custom", 12, [1.0, 1.0, 0.0]) == [1.0] * 8 + [0.0] * 4
    assert depth_schedule("custom", 12, [0.0, 0.0, 1.0]) == [0.0] * 8 + [1.0] * 4
    assert depth_schedule("custom", 12) == [0.5] * 4 + [1.0] * 4 + [1.5] * 4  # default scales
    assert depth_schedule("custom", 7, [0.0, 1.0, 2.0]) == [0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 2.0]


def test_tier_schedules_accept_their_own_levels():
    assert depth_schedule("tier2", 4, [0.0, 2.0]) == [0.0, 0.0, 2.0, 2.0]
    assert depth_schedule("tier3", 6, [3.0, 2.0, 1.0]) == [3.0, 3.0, 2.0, 2.0, 1.0, 1.0]


def test_lines_schedule():
    # LiNeS: α + β·ℓ/(L−1), ℓ = 0..L−1; its default (0.5, 1.0) is the linear schedule
    assert depth_schedule("lines", 5, [1.0, -0.5]) == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5])
    assert depth_schedule("lines", 12) == pytest.approx(depth_schedule("linear", 12))


def test_schedule_needs_a_layer():
    with pytest.raises(ValueError):
        depth_schedule("tier3", 0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 60), st.sampled_from(["tier2", "tier3", "tier6", "tier12"]))
def test_tier_mapping_is_proportional(num_layers, name):
    # every tier gets ⌊L/K⌋ or ⌈L/K⌉ consecutive layers, in order; with 2L > K both the first
    # and the last level are reached
    from fusion_bench_larv.core.gates import TIER_LEVELS

    levels = TIER_LEVELS[name]
    k = len(levels)
    s = depth_schedule(name, num_layers)
    idx = [levels.index(v) for v in s]
    assert idx == sorted(idx)
    for j in range(k):
        assert idx.count(j) in (num_layers // k, -(-num_layers // k))
    if 2 * num_layers > k:
        assert idx[0] == 0 and idx[-1] == k - 1
