"""The signal-correlation analysis (larv_lab.signals): its pure functions on hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import torch

from larv_lab.signals import (
    SIGNALS,
    adamerging_block_profile,
    block_task_stats,
    critical_rho,
    permutation_p,
    render,
    rerender,
    spearman,
    task_vector_signals,
)


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # ranks (1, 2, 3) vs (1, 3, 2): Pearson of the ranks = 0.5
    assert math.isclose(spearman([1, 2, 3], [5, 9, 7]), 0.5)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_task_vector_signals_by_hand():
    members = [["b0.w"], ["b1.w"]]
    theta0 = {"b0.w": torch.tensor([1.0, 0.0]), "b1.w": torch.tensor([0.0, 2.0])}
    # block 0: τ_1 = (1, 0), τ_2 = (0, 1): orthogonal, no sign clash on any entry beyond zeros
    # block 1: τ_1 = (1, 1), τ_2 = (-1, -1): opposite
    taus = [
        {"b0.w": torch.tensor([1.0, 0.0]), "b1.w": torch.tensor([1.0, 1.0])},
        {"b0.w": torch.tensor([0.0, 1.0]), "b1.w": torch.tensor([-1.0, -1.0])},
    ]
    stats = block_task_stats(theta0, taus, members)
    sig = task_vector_signals(stats, [0, 1])
    # ‖Σ τ‖ / ‖θ_0‖: block 0 √2 / 1, block 1 0 / 2
    np.testing.assert_allclose(sig["update_norm"], [math.sqrt(2), 0.0])
    np.testing.assert_allclose(sig["cosine"], [0.0, -1.0])
    # 1 − mean_j |Σ_t sign|/T: block 0 entries |1+0|, |0+1| -> 1 − 1/2; block 1: |1−1| -> 1
    np.testing.assert_allclose(sig["sign_conflict"], [0.5, 1.0])
    # a resample with one task twice: no pair of distinct tasks, cosine undefined
    assert np.isnan(task_vector_signals(stats, [0, 0])["cosine"]).all()


def test_adamerging_block_profile_averages_each_blocks_tensors():
    w = torch.tensor([[1.0, 3.0, 5.0], [0.0, 2.0, 4.0]])  # 2 tasks × 3 parameter tensors
    prof = adamerging_block_profile(w, ["a.0.w", "a.0.b", "a.1.w"], [["a.0.w", "a.0.b"], ["a.1.w"]])
    np.testing.assert_allclose(prof, [[2.0, 5.0], [1.0, 4.0]])


def test_permutation_p_by_hand():
    # ranks (1, 2, 3, 4) vs (1, 3, 2, 4): ρ = 1 − 6·2 / (4·15) = 0.8; of the 24 orders, |ρ| ≥ 0.8
    # for the identity, its reverse and the 3 adjacent swaps of each: 8 / 24
    assert math.isclose(permutation_p([1, 2, 3, 4], [1, 3, 2, 4]), 8 / 24)
    # 5 blocks in the same order: only the identity and its reverse reach |ρ| = 1
    assert math.isclose(permutation_p([1, 2, 3, 4, 5], [2, 4, 6, 8, 10]), 2 / 120)
    assert math.isnan(permutation_p([1, 1, 1], [1, 2, 3]))


def test_critical_rho_is_the_least_significant_value():
    # L = 5: P(|ρ| = 1) = 2/120 ≤ 0.05, P(|ρ| ≥ 0.9) = 10/120 > 0.05
    assert critical_rho(5) == 1.0
    # L = 4: even |ρ| = 1 has P = 2/24 > 0.05: no correlation is detectable
    assert critical_rho(4) == math.inf
    # L = 12 draws permutations at random: the least significant |ρ| sits near the tabulated
    # two-sided 5% Spearman value (Zar 1972: 0.587) and is monotone in α
    assert 0.55 < critical_rho(12) < 0.62
    assert critical_rho(12, alpha=0.01) > critical_rho(12)


def test_rerender_recomputes_the_tests_and_keeps_the_intervals():
    stored = {
        "num_blocks": 5,
        "profiles": {"prof": [1.0, 2.0, 3.0, 4.0, 5.0]},
        "signals": {s: [5.0, 4.0, 3.0, 2.0, 1.0] for s in SIGNALS},
        "rho": [{"profile": "prof", "signal": "depth", "rho": -1.0, "lo": -1.0, "hi": -0.5}],
    }
    out = rerender(stored)
    depth = next(r for r in out["rho"] if r["signal"] == "depth")
    assert (depth["lo"], depth["hi"]) == (-1.0, -0.5)
    assert math.isclose(depth["rho"], -1.0) and math.isclose(depth["p_blocks"], 2 / 120)
    assert next(r for r in out["rho"] if r["signal"] == "e")["lo"] is None
    assert out["critical_rho"] == 1.0
    assert "|ρ| ≥ 1.00" in render({"suite": out})
