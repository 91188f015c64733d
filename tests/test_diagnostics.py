"""Diagnostics against hand-derived cases, literal formulas (numpy, float64) and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_bench_larv.diagnostics import (
    as_matrix,
    commutator_conflict,
    effective_rank,
    rank_contrast,
    singular_values,
    spectral_entropy,
)


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# -- effective rank: hand-derived --------------------------------------------------------------
def test_rank_one_matrix_has_effective_rank_one():
    a = torch.outer(t([1.0, 2.0, 3.0]), t([4.0, -1.0]))
    assert effective_rank(a) == pytest.approx(1.0, abs=1e-9)


def test_identity_has_full_effective_rank():
    assert effective_rank(torch.eye(4)) == pytest.approx(4.0, rel=1e-12)


def test_diagonal_entropy_by_hand():
    # σ = (2, 1): p = (4/5, 1/5), H = −(0.8 ln 0.8 + 0.2 ln 0.2)
    h = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    a = torch.diag(t([2.0, 1.0]))
    assert spectral_entropy(singular_values(a)) == pytest.approx(h, rel=1e-12)
    assert effective_rank(a) == pytest.approx(math.exp(h), rel=1e-12)


def test_entropy_with_true_frobenius_norm_for_truncated_spectrum():
    # only σ_1 = 2 kept, ‖A‖² = 5: p = (0.8,), H = −0.8 ln 0.8
    assert spectral_entropy(t([2.0]), 5.0) == pytest.approx(-0.8 * math.log(0.8))


def test_rank_contrast_by_hand_and_zero_update():
    theta0 = torch.eye(4)  # r_eff 4
    delta = torch.outer(t([1.0, 0, 0, 0]), t([0, 1.0, 0, 0]))  # r_eff 1
    assert rank_contrast(theta0, delta, eps=0.0) == pytest.approx(4.0)
    assert rank_contrast(theta0, delta) == pytest.approx(4.0 / (1.0 + 1e-8))
    assert rank_contrast(theta0, torch.zeros(4, 4)) == 0.0


def test_conv_kernel_is_folded():
    k = torch.randn(8, 3, 2, 2, dtype=torch.float64)
    assert as_matrix(k).shape == (8, 12)
    np.testing.assert_allclose(
        singular_values(k).numpy(),
        np.linalg.svd(k.reshape(8, 12).numpy(), compute_uv=False),
        rtol=1e-10,
    )


def test_exact_spectrum_matches_numpy():
    a = torch.randn(7, 5, dtype=torch.float64)
    np.testing.assert_allclose(
        singular_values(a).numpy(), np.linalg.svd(a.numpy(), compute_uv=False), rtol=1e-10
    )


# -- commutator conflict -----------------------------------------------------------------------
def test_commuting_square_matrices_have_zero_conflict():
    a = torch.randn(5, 5, dtype=torch.float64)
    poly = 2.0 * a @ a - 3.0 * a + torch.eye(5, dtype=torch.float64)  # commutes with a
    assert commutator_conflict(a, poly) == pytest.approx(0.0, abs=1e-12)
    d1, d2 = torch.diag(t([1.0, 2, 3])), torch.diag(t([-1.0, 5, 0.5]))
    assert commutator_conflict(d1, d2) == 0.0


def test_square_conflict_by_hand():
    # A = [[1,0],[0,0]], B = [[0,1],[0,0]]: AB − BA = [[0,1],[0,0]], ‖·‖ = 1, ‖A‖ = ‖B‖ = 1
    a, b = t([[1.0, 0.0], [0.0, 0.0]]), t([[0.0, 1.0], [0.0, 0.0]])
    assert commutator_conflict(a, b, eps=0.0) == pytest.approx(1.0)


def _literal_rect_conflict(x: np.ndarray, y: np.ndarray, eps: float = 1e-8) -> float:
    den = np.linalg.norm(x) * np.linalg.norm(y) + eps
    left = np.linalg.norm(x @ y.T - y @ x.T)
    right = np.linalg.norm(x.T @ y - y.T @ x)
    return 0.5 * left / den + 0.5 * right / den


@pytest.mark.parametrize("shape", [(40, 7), (7, 40), (64, 16), (3, 5)])
def test_rectangular_conflict_matches_literal_formula(shape):
    # the implementation forms only min(m, n)-sized Grams for the large side: an independent check
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=shape), rng.normal(size=shape)
    got = commutator_conflict(torch.from_numpy(x), torch.from_numpy(y))
    assert got == pytest.approx(_literal_rect_conflict(x, y), rel=1e-9)
    got32 = commutator_conflict(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    assert got32 == pytest.approx(_literal_rect_conflict(x, y), rel=1e-4)


def test_rectangular_conflict_zero_for_aligned_update():
    # Δ = λ θ_0: both Gram commutators vanish
    x = torch.randn(30, 6, dtype=torch.float64)
    assert commutator_conflict(x, 0.3 * x) == pytest.approx(0.0, abs=1e-7)


# -- properties ----------------------------------------------------------------------------------
shapes = st.tuples(st.integers(2, 12), st.integers(2, 12))
scales = st.floats(1e-3, 1e3)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, a=scales, b=scales, seed=st.integers(0, 2**16))
def test_e_and_c_are_scale_invariant(shape, a, b, seed):
    g = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(shape, generator=g, dtype=torch.float64)
    delta = torch.randn(shape, generator=g, dtype=torch.float64)
    e = rank_contrast(theta0, delta, eps=0.0)
    c = commutator_conflict(theta0, delta, eps=0.0)
    assert rank_contrast(a * theta0, b * delta, eps=0.0) == pytest.approx(e, rel=1e-8)
    assert commutator_conflict(a * theta0, b * delta, eps=0.0) == pytest.approx(
        c, rel=1e-7, abs=1e-10
    )


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_bounds(shape, seed):
    g = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(shape, generator=g, dtype=torch.float64)
    delta = torch.randn(shape, generator=g, dtype=torch.float64)
    r = effective_rank(delta)
    assert 1.0 - 1e-9 <= r <= min(shape) + 1e-9
    # ‖AB − BA‖ ≤ 2‖A‖‖B‖ (submultiplicativity), likewise for each Gram commutator
    assert 0.0 <= commutator_conflict(theta0, delta) <= 2.0 + 1e-9


def test_randomized_spectrum_is_seeded_and_reproducible():
    a = torch.randn(50, 30)
    s1 = singular_values(a, "randomized", 3, 5, torch.Generator().manual_seed(1))
    s2 = singular_values(a, "randomized", 3, 5, torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2)


def test_randomized_spectrum_approaches_exact_as_rank_grows():
    # decaying spectrum: σ_j = 0.8^j
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(60, 40, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    a = u @ torch.diag(0.8 ** torch.arange(40, dtype=torch.float64)) @ v.T
    exact = effective_rank(a)
    errors = []
    for k in (1, 2, 4, 8, 16, 32, 40):
        approx = effective_rank(
            a, "randomized", rank=k, oversample=10, generator=torch.Generator().manual_seed(0)
        )
        assert approx <= exact + 1e-6  # a truncated spectrum only loses entropy
        errors.append(exact - approx)
    assert errors[-1] == pytest.approx(0.0, abs=1e-9)  # rank = min(m, n): the exact spectrum
    assert all(later <= earlier + 1e-9 for earlier, later in zip(errors, errors[1:], strict=False))
    assert errors[0] > errors[3] > errors[5]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_computed_in_float32(dtype):
    theta0, delta = torch.randn(16, 8).to(dtype), (0.01 * torch.randn(16, 8)).to(dtype)
    ref_e = rank_contrast(theta0.float(), delta.float())
    ref_c = commutator_conflict(theta0.float(), delta.float())
    assert rank_contrast(theta0, delta) == pytest.approx(ref_e, rel=1e-5)
    assert commutator_conflict(theta0, delta) == pytest.approx(ref_c, rel=1e-5)
