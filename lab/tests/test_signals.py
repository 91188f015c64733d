"""The signal-correlation analysis (larv_lab.signals): its pure functions on hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import torch

from larv_lab.signals import (
    adamerging_block_profile,
    block_task_stats,
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
