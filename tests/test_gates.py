"""Composite score, gates and depth schedules against the spec's formulas and hand-listed values."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_bench_larv.gates import (
    composite_score,
    continuous_gate,
    depth_prior,
    depth_schedule,
    empirical_quantile,
    softplus,
    standardize,
    tiered_gate,
)


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
