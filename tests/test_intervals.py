"""Paired intervals over test images (fusion_bench_larv.evaluation.intervals) on hand-made cases,
and the per-sample file format they read (fusion_bench_larv.evaluation.per_sample)."""

from __future__ import annotations

import numpy as np
import pytest

from fusion_bench_larv.evaluation import intervals as iv
from fusion_bench_larv.evaluation import per_sample


def _vectors(n: int, seed: int, p_a: float = 0.8, p_b: float = 0.7):
    rng = np.random.default_rng(seed)
    return rng.random(n) < p_a, rng.random(n) < p_b


def test_identical_predictions_give_exactly_zero():
    a, _ = _vectors(500, 0)
    r = iv.paired_bootstrap(a, a.copy())
    assert (r.delta, r.lo, r.hi) == (0.0, 0.0, 0.0) and not r.significant
    avg = iv.average_bootstrap([(a, a), (a[:100], a[:100])])
    assert (avg.delta, avg.lo, avg.hi) == (0.0, 0.0, 0.0)
    assert iv.mcnemar_exact(a, a) == 1.0


def test_all_pairs_discordant_one_way_collapse_to_a_point():
    a, b = np.ones(40, bool), np.zeros(40, bool)
    r = iv.paired_bootstrap(a, b)
    assert (r.delta, r.lo, r.hi) == (1.0, 1.0, 1.0) and r.significant
    assert iv.paired_bootstrap(b, a) == (-1.0, -1.0, -1.0)
    # k of n pairs discordant, all one way: Δ = k/n, and resampling never gives a negative Δ
    a = np.array([True] * 7 + [False] * 13)
    b = np.zeros(20, bool)
    r = iv.paired_bootstrap(a, b, resamples=500)
    assert r.delta == pytest.approx(7 / 20)
    assert 0.0 <= r.lo <= r.delta <= r.hi <= 1.0


def test_mcnemar_exact_by_hand():
    # 10 discordant pairs, all one way: p = 2 * 0.5**10
    a = np.array([True] * 10 + [True, False] * 5)
    b = np.array([False] * 10 + [True, False] * 5)
    assert iv.discordant(a, b) == (10, 0, 20)
    assert iv.mcnemar_exact(a, b) == 2 * 0.5**10
    # 1 vs 2 discordant pairs: p = 2 * (C(3,0) + C(3,1)) / 8 = 1 (capped)
    assert iv.mcnemar_exact([True, False, False], [False, True, True]) == 1.0
    # 1 vs 9: p = 2 * (1 + 10) / 1024
    a = np.array([True] + [False] * 9)
    assert iv.mcnemar_exact(a, ~a) == pytest.approx(2 * 11 / 1024, abs=0)
    # many pairs: no overflow, symmetric
    a, b = _vectors(5000, 3)
    assert iv.mcnemar_exact(a, b) == iv.mcnemar_exact(b, a) < 1e-6


def test_swapping_the_arguments_negates_the_interval():
    for seed in range(4):
        a, b = _vectors(301, seed)
        r, s = iv.paired_bootstrap(a, b, seed=seed), iv.paired_bootstrap(b, a, seed=seed)
        assert (s.delta, s.lo, s.hi) == (-r.delta, -r.hi, -r.lo)
    # a tie of discordant pairs (n10 == n01) too
    a = np.array([True, False, True, False, True, True])
    b = np.array([False, True, False, True, True, True])
    r, s = iv.paired_bootstrap(a, b), iv.paired_bootstrap(b, a)
    assert r.delta == 0.0 and (s.lo, s.hi) == (-r.hi, -r.lo)
    # the average over tasks, ties included
    pairs = [_vectors(200, 10), _vectors(90, 11), (a, b)]
    r = iv.average_bootstrap(pairs)
    s = iv.average_bootstrap([(y, x) for x, y in pairs])
    assert (s.delta, s.lo, s.hi) == (-r.delta, -r.hi, -r.lo)


def test_seeded_and_reproducible():
    a, b = _vectors(400, 5)
    assert iv.paired_bootstrap(a, b, seed=7) == iv.paired_bootstrap(a, b, seed=7)
    pairs = [_vectors(100, 1), _vectors(50, 2)]
    assert iv.average_bootstrap(pairs, seed=3) == iv.average_bootstrap(pairs, seed=3)
    draws = {iv.paired_bootstrap(a, b, seed=s, resamples=200)[1:] for s in range(5)}
    assert len(draws) > 1  # the seed matters


def test_interval_contains_the_difference_and_is_sensible():
    a, b = _vectors(2000, 8, 0.85, 0.75)
    r = iv.paired_bootstrap(a, b)
    assert r.delta == pytest.approx(a.mean() - b.mean())
    assert r.lo < r.delta < r.hi and r.significant
    # normal approximation of the paired difference's standard error: the interval's half-width
    d = a.astype(float) - b.astype(float)
    se = d.std() / np.sqrt(len(d))
    assert (r.hi - r.lo) / 2 == pytest.approx(1.96 * se, rel=0.15)
    # the average: equal task weights, Δ = mean of the per-task Δ
    pairs = [_vectors(300, 20), _vectors(1000, 21)]
    avg = iv.average_bootstrap(pairs)
    assert avg.delta == pytest.approx(np.mean([x.mean() - y.mean() for x, y in pairs]))
    assert avg.lo <= avg.delta <= avg.hi


def test_mismatched_vectors_raise_a_clear_error():
    with pytest.raises(ValueError, match="differ in length"):
        iv.paired_bootstrap(np.ones(5, bool), np.ones(6, bool))
    with pytest.raises(ValueError, match="1-D"):
        iv.paired_bootstrap(np.ones((2, 3), bool), np.ones((2, 3), bool))
    with pytest.raises(ValueError, match="differ in length"):
        iv.average_bootstrap([(np.ones(3, bool), np.ones(3, bool)), (np.ones(2), np.ones(4))])
    with pytest.raises(ValueError, match="differ in length"):
        iv.mcnemar_exact([True], [True, False])
    with pytest.raises(ValueError):
        iv.average_bootstrap([])
    with pytest.raises(ValueError):
        iv.paired_bootstrap([True], [False], resamples=0)


def test_per_sample_file_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    c1, c2 = rng.random(1001) < 0.6, rng.random(7) < 0.5
    labels = rng.integers(0, 10, 1001)
    entries = {"mnist": per_sample.encode_task(c1, labels), "tiny": per_sample.encode_task(c2)}
    assert entries["mnist"]["n"] == 1001 and entries["mnist"]["correct"] == int(c1.sum())
    path = per_sample.write(tmp_path / per_sample.FILE, [entries])
    (back,) = per_sample.read(path)
    assert np.array_equal(back["mnist"], c1) and np.array_equal(back["tiny"], c2)
    digests = per_sample.read_digests(path)[0]
    assert digests == {"mnist": per_sample.labels_digest(labels), "tiny": None}
    assert per_sample.read(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    assert per_sample.read(tmp_path / "bad.json") is None
