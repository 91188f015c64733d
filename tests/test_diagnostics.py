"""Diagnostics against hand-derived cases, literal formulas (numpy, float64) and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import SHAPES, naive_conflict, naive_reff, structured

from fusion_bench_larv.core import veneer
from fusion_bench_larv.core.diagnostics import (
    MatrixStats,
    SpectrumOptions,
    as_matrix,
    commutator_conflict,
    commutator_conflicts,
    effective_rank,
    effective_ranks,
    entropies,
    exact_energies,
    frobenius_sq,
    is_zero_update,
    pair_diagnostics,
    randomized_energies,
    rank_contrast,
    rank_contrasts,
    singular_values,
    skip_theta0_sketches,
    small_gram,
    spectral_entropy,
    theta0_statistics,
)
from fusion_bench_larv.core.settings import LarvSettings


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


@pytest.mark.parametrize("shape", [(300, 20), (20, 300)])
def test_nearly_commuting_float32_rectangular_is_redone_in_float64(shape):
    # float32 Gram products would leave a round-off floor (~1e-4) in the trace identity's
    # difference; the cancellation guard redoes such matrices with float64 products
    rng = np.random.default_rng(3)
    x = rng.normal(size=shape)
    y = 0.3 * x + 1e-6 * rng.normal(size=shape)  # almost Δ = λ θ_0
    want = _literal_rect_conflict(x, y)
    assert want < 1e-5
    got32 = commutator_conflict(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    # the float32 inputs themselves differ from x, y by ~1e-8 relative: that sets the tolerance
    assert got32 == pytest.approx(want, abs=2e-7)


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


# -- more hand-derived cases -------------------------------------------------------------------
def test_rank_contrast_on_diagonal_cases():
    # θ_0 = diag(2, 1): r_eff = exp(H(0.8, 0.2)); Δ rank-1: r_eff = 1
    r0 = math.exp(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2)))
    theta0 = torch.diag(t([2.0, 1.0]))
    assert rank_contrast(theta0, t([[0.0, 3.0], [0.0, 0.0]]), eps=0.0) == pytest.approx(r0)
    # Δ isotropic (r_eff 2): e = r0 / 2, whatever Δ's scale
    iso = 1e-3 * torch.eye(2, dtype=torch.float64)
    assert rank_contrast(theta0, iso, eps=0.0) == pytest.approx(r0 / 2, rel=1e-12)
    assert rank_contrast(theta0, iso) == pytest.approx(r0 / (2 + 1e-8), rel=1e-12)


def test_rank_contrast_zero_for_a_numerically_zero_update():
    theta0 = torch.randn(6, 4, dtype=torch.float64)
    assert rank_contrast(theta0, torch.zeros(6, 4, dtype=torch.float64)) == 0.0
    assert rank_contrast(theta0, 1e-13 * torch.randn(6, 4, dtype=torch.float64)) == 0.0
    assert rank_contrast(theta0, 1e-6 * torch.randn(6, 4, dtype=torch.float64)) > 0.0


def test_square_conflict_by_hand_dense():
    # A = [[1,2],[3,4]], B = [[0,1],[1,0]]: AB − BA = [[-1,-3],[3,1]], ‖·‖² = 20, ‖A‖² = 30,
    # ‖B‖² = 2, so c = √20 / √60 = 1/√3
    a, b = t([[1.0, 2.0], [3.0, 4.0]]), t([[0.0, 1.0], [1.0, 0.0]])
    assert commutator_conflict(a, b, eps=0.0) == pytest.approx(1 / math.sqrt(3), rel=1e-12)
    assert commutator_conflict(a, b) == pytest.approx(math.sqrt(20) / (math.sqrt(60) + 1e-8))


def test_rectangular_conflict_by_hand():
    # X = e1 e1ᵀ, Y = e2 e1ᵀ (3x2): X Yᵀ − Y Xᵀ = e1e2ᵀ − e2e1ᵀ (norm √2), Xᵀ Y − Yᵀ X = 0
    x = t([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    y = t([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    assert commutator_conflict(x, y, eps=0.0) == pytest.approx(0.5 * math.sqrt(2))
    assert commutator_conflict(x.T, y.T, eps=0.0) == pytest.approx(0.5 * math.sqrt(2))


def test_conv_kernels_fold_in_e_and_c():
    g = torch.Generator().manual_seed(3)
    k0 = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    kd = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    f0, fd = k0.reshape(6, 36), kd.reshape(6, 36)
    assert rank_contrast(k0, kd) == pytest.approx(rank_contrast(f0, fd), rel=1e-12)
    assert commutator_conflict(k0, kd) == pytest.approx(
        _literal_rect_conflict(f0.numpy(), fd.numpy()), rel=1e-9
    )


def test_vectors_and_shape_mismatch_are_rejected():
    with pytest.raises(ValueError, match=">= 2 dims"):
        as_matrix(torch.zeros(3))
    with pytest.raises(ValueError, match="shape mismatch"):
        commutator_conflict(torch.zeros(3, 4), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="spectrum"):
        singular_values(torch.eye(3), "lanczos")


def _np_effective_rank(a: np.ndarray) -> float:
    s = np.linalg.svd(a, compute_uv=False)
    p = s**2 / np.sum(a**2)
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


# -- literal-formula oracles over random shapes ------------------------------------------------
rect_shapes = st.tuples(st.integers(1, 30), st.integers(1, 30)).filter(lambda s: s[0] != s[1])


@settings(max_examples=40, deadline=None)
@given(shape=rect_shapes, seed=st.integers(0, 2**16), scale=st.floats(1e-2, 1e2))
def test_rectangular_conflict_literal_formula_on_random_shapes(shape, seed, scale):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=shape), scale * rng.normal(size=shape)
    got = commutator_conflict(torch.from_numpy(x), torch.from_numpy(y))
    assert got == pytest.approx(_literal_rect_conflict(x, y), rel=1e-8, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_square_conflict_literal_formula_and_bound(n, seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, n)), rng.normal(size=(n, n))
    lit = np.linalg.norm(x @ y - y @ x) / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-8)
    got = commutator_conflict(torch.from_numpy(x), torch.from_numpy(y))
    assert got == pytest.approx(lit, rel=1e-9, abs=1e-12)
    # Böttcher–Wenzel: ‖XY − YX‖_F ≤ √2 ‖X‖_F ‖Y‖_F (real matrices)
    assert got <= math.sqrt(2) + 1e-9


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_effective_rank_matches_numpy(shape, seed):
    a = np.random.default_rng(seed).normal(size=shape)
    assert effective_rank(torch.from_numpy(a)) == pytest.approx(_np_effective_rank(a), rel=1e-9)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_conflict_symmetries(shape, seed):
    # ‖[X, Y]‖ = ‖[Y, X]‖, transposition swaps the two Gram commutators, and orthogonal changes
    # of basis (U·V for rectangular, U·Uᵀ for square) leave every commutator norm unchanged
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.randn(shape, generator=g, dtype=torch.float64)
    c = commutator_conflict(x, y, eps=0.0)
    assert commutator_conflict(y, x, eps=0.0) == pytest.approx(c, rel=1e-9, abs=1e-12)
    assert commutator_conflict(x.T, y.T, eps=0.0) == pytest.approx(c, rel=1e-9, abs=1e-12)
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=g, dtype=torch.float64))
    if shape[0] == shape[1]:
        v = u.T
    else:
        v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=g, dtype=torch.float64))
    assert commutator_conflict(u @ x @ v, u @ y @ v, eps=0.0) == pytest.approx(
        c, rel=1e-8, abs=1e-10
    )
    # e is invariant under transposition too (same singular values)
    e = rank_contrast(x, y, eps=0.0)
    assert rank_contrast(x.T, y.T, eps=0.0) == pytest.approx(e, rel=1e-9)


@settings(max_examples=20, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_commuting_updates_have_zero_conflict(shape, seed):
    # square: Δ a polynomial in θ_0. Rectangular: Δ = θ_0 · p(θ_0ᵀθ_0) shares θ_0's singular
    # vectors, so both Gram commutators vanish
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    x = torch.randn(m, n, generator=g, dtype=torch.float64)
    if m == n:
        y = 0.5 * x @ x @ x - x + 2 * torch.eye(n, dtype=torch.float64)
    else:
        y = x @ (x.T @ x) - 3 * x
    # the Gram identity 2‖M‖² − 2 tr(M²) cancels to ~1e-16·‖M‖², so its square root has an
    # absolute floor near √1e-16 = 1e-8 (the square case forms the commutator itself)
    assert commutator_conflict(x, y) == pytest.approx(0.0, abs=1e-10 if m == n else 1e-7)


# -- randomized spectrum -----------------------------------------------------------------------
def test_randomized_keeps_true_frobenius_norm_by_hand():
    # diag(2, 1), rank 1: the sketch spans the whole range, σ_1 = 2 and p_1 = 4/5 (not 1)
    a = torch.diag(t([2.0, 1.0]))
    sig = singular_values(a, "randomized", rank=1, generator=torch.Generator().manual_seed(0))
    assert sig.tolist() == pytest.approx([2.0])
    r = effective_rank(a, "randomized", rank=1, generator=torch.Generator().manual_seed(0))
    assert r == pytest.approx(math.exp(-0.8 * math.log(0.8)), rel=1e-12)


def test_randomized_is_exact_on_low_rank_matrices():
    # rank(A) = 5 ≤ k + oversample: the range finder captures range(A) exactly
    g = torch.Generator().manual_seed(1)
    a = torch.randn(40, 5, generator=g, dtype=torch.float64) @ torch.randn(
        5, 30, generator=g, dtype=torch.float64
    )
    exact = np.linalg.svd(a.numpy(), compute_uv=False)
    for k in (1, 2, 5):
        sig = singular_values(a, "randomized", k, 10, torch.Generator().manual_seed(7))
        assert sig.shape == (k,)
        np.testing.assert_allclose(sig.numpy(), exact[:k], rtol=1e-10)
    assert effective_rank(
        a, "randomized", 5, 10, torch.Generator().manual_seed(7)
    ) == pytest.approx(_np_effective_rank(a.numpy()), rel=1e-9)


def test_randomized_full_rank_equals_exact_and_clamps_rank():
    a = torch.randn(9, 6, dtype=torch.float64)
    for rank in (6, 50):
        sig = singular_values(a, "randomized", rank, 0, torch.Generator().manual_seed(0))
        np.testing.assert_allclose(sig.numpy(), singular_values(a).numpy(), rtol=1e-10)


def test_randomized_depends_on_the_seed_only():
    a = torch.randn(80, 60)
    one = [
        singular_values(a, "randomized", 2, 3, torch.Generator().manual_seed(s)) for s in (0, 0, 1)
    ]
    assert torch.equal(one[0], one[1])
    assert not torch.equal(one[0], one[2])  # a full-rank matrix: the sketch matters
    # a truncated top-k never exceeds the true singular values (Rayleigh–Ritz)
    exact = singular_values(a)
    assert bool((one[2] <= exact[:2] * (1 + 1e-5)).all())


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), decay=st.floats(0.3, 0.9))
def test_randomized_effective_rank_converges(seed, decay):
    # decaying spectrum σ_j = decay^j: the error of r_eff is non-negative and vanishes at
    # full rank, and a generous sketch (k = 8, oversample 10) is closer than k = 1
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(30, 20, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    a = u @ torch.diag(decay ** torch.arange(20, dtype=torch.float64)) @ v.T
    exact = effective_rank(a)
    err = {
        k: exact - effective_rank(a, "randomized", k, 10, torch.Generator().manual_seed(seed))
        for k in (1, 8, 20)
    }
    assert all(v >= -1e-9 for v in err.values())
    assert err[20] == pytest.approx(0.0, abs=1e-9)
    assert err[8] < err[1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_spectrum_is_float32(dtype):
    a = torch.randn(12, 7).to(dtype)
    sig = singular_values(a)
    assert sig.dtype == torch.float32
    torch.testing.assert_close(sig, torch.linalg.svdvals(a.float()))
    k = torch.randn(4, 3, 2, 2).to(dtype)
    assert effective_rank(k) == pytest.approx(effective_rank(k.float()), rel=1e-6)


# -- randomized spectrum with the uniform tail ---------------------------------------------------
def test_uniform_tail_by_hand():
    # diag(2, 1, 1, 1), rank 1: p_1 = 4/7 seen, the residual 3/7 spread over the 3 other
    # directions gives exactly the true spectrum (a flat tail), so r_eff equals the exact one
    a = torch.diag(t([2.0, 1.0, 1.0, 1.0]))
    gen = torch.Generator().manual_seed(0)
    r = effective_rank(a, "randomized", 1, 10, gen, spectrum_tail="uniform")
    assert r == pytest.approx(_np_effective_rank(a.numpy()), rel=1e-12)
    p1, rest = 4 / 7, 1 / 7
    assert r == pytest.approx(math.exp(-p1 * math.log(p1) - 3 * rest * math.log(rest)), rel=1e-12)
    # the paper's formula (`spectrum_tail: none`; docs/method.md, "Exact and randomized spectra")
    # drops the residual
    r_none = effective_rank(a, "randomized", 1, 10, torch.Generator().manual_seed(0))
    assert r_none == pytest.approx(math.exp(-p1 * math.log(p1)), rel=1e-12)


def test_uniform_tail_is_an_upper_bound_and_exact_without_a_tail():
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        a = torch.randn(30, 12, generator=g, dtype=torch.float64) @ torch.diag(
            torch.rand(12, generator=g, dtype=torch.float64) * 3
        )
        exact = effective_rank(a)
        # largest entropy given the top-k and the total: never below the exact entropy when the
        # top-k are exact (full sketch: oversample covers the whole range)
        tail = effective_rank(a, "randomized", 3, 20, torch.Generator().manual_seed(1),
                              spectrum_tail="uniform")  # fmt: skip
        assert tail >= exact * (1 - 1e-12)
        # an exact spectrum has no tail: the option changes nothing
        assert effective_rank(a, "exact", spectrum_tail="uniform") == exact
        # k = min(m, n): nothing is left over
        full = effective_rank(a, "randomized", 12, 0, torch.Generator().manual_seed(1),
                              spectrum_tail="uniform")  # fmt: skip
        assert full == pytest.approx(exact, rel=1e-9)


def test_uniform_tail_keeps_the_ranking_that_the_truncated_entropy_inverts():
    # updates whose energy spreads out (rank 2 → 48 plus noise): the exact r_eff grows; the paper's
    # top-2 entropy (docs/method.md, "Exact and randomized spectra") shrinks (less mass in the
    # top 2); the uniform tail grows with the exact one
    g = torch.Generator().manual_seed(0)
    exact, none, tail = [], [], []
    for r in (2, 4, 8, 16, 32, 48):
        low = torch.randn(64, r, generator=g, dtype=torch.float64) @ torch.randn(
            r, 64, generator=g, dtype=torch.float64
        )
        noise = torch.randn(64, 64, generator=g, dtype=torch.float64)
        a = 0.8 * low / low.norm() + 0.2 * noise / noise.norm()
        exact.append(effective_rank(a))
        none.append(effective_rank(a, "randomized", 2, 10, torch.Generator().manual_seed(r)))
        tail.append(effective_rank(a, "randomized", 2, 10, torch.Generator().manual_seed(r),
                                   spectrum_tail="uniform"))  # fmt: skip
    assert exact == sorted(exact)
    assert none == sorted(none, reverse=True)
    assert tail == sorted(tail)


def test_unknown_tail_is_rejected():
    with pytest.raises(ValueError, match="spectrum_tail"):
        effective_rank(torch.randn(5, 4), "randomized", 1, 2, torch.Generator(), spectrum_tail="x")


# -- the batched formulas (what the pipeline calls) against independent definitions -------------
def _svd_reff(a: torch.Tensor) -> float:
    """r_eff from torch.linalg.svdvals in float64: exp(−Σ p log p), p = σ² / ‖A‖_F²."""
    a = a.to(torch.float64)
    p = torch.linalg.svdvals(a) ** 2 / (a**2).sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _explicit_conflict(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> float:
    """c with every commutator formed explicitly, float64."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    den = float(torch.linalg.norm(x) * torch.linalg.norm(y)) + eps
    if x.shape[0] == x.shape[1]:
        return float(torch.linalg.norm(x @ y - y @ x)) / den
    left = float(torch.linalg.norm(x @ y.T - y @ x.T))
    right = float(torch.linalg.norm(x.T @ y - y.T @ x))
    return 0.5 * left / den + 0.5 * right / den


def _randomized_reff(a: torch.Tensor, g: torch.Generator, k: int, oversample: int) -> float:
    """r_eff from a top-k range finder written out (Gaussian sketch, QR, SVD of QᵀA), float64."""
    a = a.to(torch.float64)
    m, n = a.shape
    k = max(1, min(k, m, n))
    omega = torch.randn(n, min(k + oversample, m, n), generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(a @ omega)
    p = torch.linalg.svdvals(q.T @ a)[:k] ** 2 / (a**2).sum()
    return float(torch.exp(-(p * p.log()).sum()))


def _stack_pairs(shape, batch, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    low = torch.randn(batch, shape[0], 2, generator=g, dtype=torch.float64)
    y = 0.01 * (low @ torch.randn(batch, 2, shape[1], generator=g, dtype=torch.float64))
    y = y + 1e-3 * torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


@pytest.mark.parametrize("shape", [(9, 9), (30, 7), (7, 30)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pair_diagnostics_match_svdvals_and_explicit_commutators(shape, dtype):
    x, y = _stack_pairs(shape, 3, dtype, seed=sum(shape))
    options = SpectrumOptions()
    stats = theta0_statistics(x, options)
    e, c = pair_diagnostics(x, y, stats, options)
    assert e.dtype == c.dtype == torch.float64 and e.shape == c.shape == (3,)
    assert (stats.gram is None) == (shape[0] == shape[1])
    rel = 1e-10 if dtype == torch.float64 else 1e-4
    for i in range(3):
        assert float(stats.fro2[i]) == pytest.approx(float((x[i].double() ** 2).sum()), rel=1e-12)
        assert float(stats.r_eff[i]) == pytest.approx(_svd_reff(x[i]), rel=rel)
        want_e = _svd_reff(x[i]) / (_svd_reff(y[i]) + 1e-8)
        assert float(e[i]) == pytest.approx(want_e, rel=rel)
        assert float(c[i]) == pytest.approx(_explicit_conflict(x[i], y[i]), rel=rel)
        # the single-matrix helpers give the same numbers
        assert effective_rank(x[i]) == pytest.approx(float(stats.r_eff[i]), rel=rel)
        assert rank_contrast(x[i], y[i]) == pytest.approx(float(e[i]), rel=rel)
        assert commutator_conflict(x[i], y[i]) == pytest.approx(float(c[i]), rel=rel)


@pytest.mark.parametrize("shape", [(12, 12), (40, 9)])
@pytest.mark.parametrize("tail", ["none", "uniform"])
def test_randomized_pair_diagnostics_draw_theta0_first_then_delta(shape, tail):
    x, y = _stack_pairs(shape, 2, torch.float64, seed=4)
    options = SpectrumOptions("randomized", rank=2, oversample=3, spectrum_tail=tail)
    gens = [torch.Generator().manual_seed(s) for s in (10, 11)]
    e, c = pair_diagnostics(x, y, theta0_statistics(x, options, gens), options, generators=gens)
    for i, s in enumerate((10, 11)):
        g = torch.Generator().manual_seed(s)  # one generator: θ_0's sketch, then Δ's
        r0, rd = _randomized_reff(x[i], g, 2, 3), _randomized_reff(y[i], g, 2, 3)
        if tail == "none":
            assert float(e[i]) == pytest.approx(r0 / (rd + 1e-8), rel=1e-9)
        g = torch.Generator().manual_seed(s)
        want = rank_contrast(x[i], y[i], "randomized", 2, 3, generator=g, spectrum_tail=tail)
        assert float(e[i]) == pytest.approx(want, rel=1e-12)  # a stack of one: the same path
        assert float(c[i]) == pytest.approx(_explicit_conflict(x[i], y[i]), rel=1e-9)
    # θ_0's statistics from elsewhere (a cache): replaying θ_0's draw gives the same Δ sketch
    for dtype in (torch.float64, torch.float32):
        xd, yd = x.to(dtype), y.to(dtype)
        fresh = [torch.Generator().manual_seed(s) for s in (10, 11)]
        stats = theta0_statistics(xd, options, fresh)
        e1, _ = pair_diagnostics(xd, yd, stats, options, generators=fresh)
        replay = [torch.Generator().manual_seed(s) for s in (10, 11)]
        skip_theta0_sketches(replay, xd, options)
        e2, _ = pair_diagnostics(xd, yd, stats, options, generators=replay)
        assert torch.equal(e1, e2)


def test_pair_diagnostics_by_hand():
    # pair 1: θ_0 = diag(2, 1) (σ² = 4, 1: p = 0.8, 0.2), Δ = 3·e1e2ᵀ (rank 1, r_eff 1):
    #   e = exp(H(0.8, 0.2)) / (1 + ε); θ_0Δ − Δθ_0 = 6·e1e2ᵀ − 3·e1e2ᵀ, norm 3;
    #   ‖θ_0‖ = √5, ‖Δ‖ = 3: c = 3 / (3√5 + ε)
    # pair 2: θ_0 = I (r_eff 2), Δ = ½ I (r_eff 2, commutes): e = 2 / (2 + ε), c = 0
    # pair 3: Δ = 0: e = c = 0
    eye = torch.eye(2, dtype=torch.float64)
    x = torch.stack([torch.diag(t([2.0, 1.0])), eye, eye])
    y = torch.stack([t([[0.0, 3.0], [0.0, 0.0]]), 0.5 * eye, 0 * eye])
    r0 = math.exp(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2)))
    for eps in (0.0, 1e-8):
        options = SpectrumOptions()
        e, c = pair_diagnostics(x, y, theta0_statistics(x, options), options, eps)
        assert e.tolist() == pytest.approx([r0 / (1 + eps), 2 / (2 + eps), 0.0], rel=1e-12)
        assert c.tolist() == pytest.approx([3 / (3 * math.sqrt(5) + eps), 0.0, 0.0], abs=1e-12)
        assert e[2] == 0.0 and c[2] == 0.0
    # rectangular: X = e1e1ᵀ, Y = e2e1ᵀ (3x2): r_eff 1 each, X Yᵀ − Y Xᵀ = e1e2ᵀ − e2e1ᵀ (norm
    # √2), Xᵀ Y − Yᵀ X = 0, ‖X‖ = ‖Y‖ = 1: e = 1, c = ½√2
    xr = t([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])[None]
    yr = t([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])[None]
    options = SpectrumOptions()
    for a, b in ((xr, yr), (xr.mT, yr.mT)):
        e, c = pair_diagnostics(a, b, theta0_statistics(a, options), options, 0.0)
        assert e.tolist() == pytest.approx([1.0], rel=1e-12)
        assert c.tolist() == pytest.approx([0.5 * math.sqrt(2)], rel=1e-12)


def test_effective_ranks_and_rank_contrasts_formulas():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(4, 11, 6, generator=g, dtype=torch.float64)
    r = effective_ranks(a, SpectrumOptions())
    assert r.tolist() == pytest.approx([_svd_reff(m) for m in a], rel=1e-12)
    # given Gram and ‖A‖² are used as they are
    gram = a.mT @ a
    fro2 = (a**2).sum((-2, -1))
    torch.testing.assert_close(effective_ranks(a, SpectrumOptions(), gram=gram, fro2=fro2), r)
    with pytest.raises(ValueError, match="spectrum"):
        effective_ranks(a, SpectrumOptions("lanczos"))
    # e = r_eff(θ_0) / (r_eff(Δ) + ε), 0 where the update is zero
    th = MatrixStats(fro2=t([4.0, 4.0, 4.0]), r_eff=t([3.0, 3.0, 3.0]))
    de = MatrixStats(fro2=t([1.0, 0.0, 1e-21]), r_eff=t([1.5, 1.0, 1.0]))
    assert rank_contrasts(th, de, 0.5).tolist() == [3.0 / 2.0, 0.0, 0.0]


def test_is_zero_update_semantics():
    # ‖Δ‖ = 0 exactly, or ‖Δ‖ ≤ 1e-10·‖θ_0‖ (compared as norms, not squares)
    fro2_theta0 = t([4.0, 4.0, 4.0, 4.0, 0.0, 0.0])
    fro2_delta = t([0.0, (0.99e-10 * 2) ** 2, (1.01e-10 * 2) ** 2, 1.0, 0.0, 1e-300])
    assert is_zero_update(fro2_delta, fro2_theta0).tolist() == [
        True,
        True,
        False,
        False,
        True,
        False,
    ]
    assert bool(is_zero_update(0.0, 1.0)) and not bool(is_zero_update(1e-18, 1.0))
    # rank_contrast and pair_diagnostics follow the same rule (and set c = 0 with e)
    theta0 = torch.diag(t([1.0, 2.0, 3.0]))  # ‖θ_0‖ = √14; does not commute with `unit`
    unit = torch.ones(3, 3, dtype=torch.float64) / 3  # ‖·‖ = 1
    options = SpectrumOptions()
    for ratio in (0.0, 0.5e-10, 0.99e-10, 1.01e-10, 2e-10, 1e-3):
        delta = ratio * math.sqrt(14) * unit
        zero = bool(is_zero_update((delta**2).sum(), (theta0**2).sum()))
        assert zero == (ratio < 1e-10)
        assert (rank_contrast(theta0, delta) == 0.0) == zero
        stats = theta0_statistics(theta0[None], options)
        e, c = pair_diagnostics(theta0[None], delta[None], stats, options)
        assert (float(e[0]) == 0.0) == zero and (float(c[0]) == 0.0) == zero


# -- batched kernels against the straightforward formulas (tests/oracles.py) --------------------
# -- batched kernels -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gram_spectrum_entropy_and_conflict_match_naive(shape, batch, dtype):
    rng = np.random.default_rng(sum(shape))
    b = 1 if batch is None else batch
    xs = [rng.normal(size=shape) for _ in range(b)]
    ys = [structured(shape, rng) * 1e-2 for _ in range(b)]
    x = torch.tensor(np.stack(xs), dtype=dtype)
    y = torch.tensor(np.stack(ys), dtype=dtype)
    if batch is None:  # unbatched use: a stack of one
        x, y = x[:1], y[:1]
    rtol = 1e-9 if dtype == torch.float64 else 2e-4
    k = min(shape)
    for i in range(x.shape[0]):
        # σ² from the smaller Gram == squared singular values of the full matrix
        sig = np.linalg.svd(xs[i], compute_uv=False)
        got = exact_energies(x)[i].numpy()
        assert got.shape == (k,)
        np.testing.assert_allclose(got, sig**2, rtol=rtol, atol=rtol * sig[0] ** 2)
    assert small_gram(x).shape == (x.shape[0], k, k)
    r = entropies(exact_energies(x), frobenius_sq(x)).exp()
    c = commutator_conflicts(x, y)
    for i in range(x.shape[0]):
        assert float(r[i]) == pytest.approx(naive_reff(xs[i]), rel=rtol)
        assert float(c[i]) == pytest.approx(naive_conflict(xs[i], ys[i]), rel=rtol, abs=1e-7)


@pytest.mark.parametrize("shape", SHAPES)
def test_conflict_reuses_given_grams_and_norms(shape):
    rng = np.random.default_rng(5)
    x = torch.tensor(np.stack([rng.normal(size=shape) for _ in range(2)]))
    y = torch.tensor(np.stack([structured(shape, rng) for _ in range(2)]))
    plain = commutator_conflicts(x, y)
    reused = commutator_conflicts(
        x, y, gram_x=small_gram(x), gram_y=small_gram(y), fro2_x=frobenius_sq(x),
        fro2_y=frobenius_sq(y),
    )  # fmt: skip
    torch.testing.assert_close(reused, plain, rtol=1e-12, atol=1e-14)


def test_batched_randomized_equals_single_matrix_path():
    rng = np.random.default_rng(2)
    a = torch.tensor(np.stack([structured((50, 20), rng) for _ in range(3)]))
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    batched = randomized_energies(a, 2, 10, gens)
    for i, s in enumerate((1, 2, 3)):
        single = singular_values(a[i], "randomized", 2, 10, torch.Generator().manual_seed(s))
        torch.testing.assert_close(batched[i], single.pow(2), rtol=1e-10, atol=0)


def test_entropy_is_zero_for_zero_matrix():
    z = torch.zeros(2, 5, 3, dtype=torch.float64)
    assert entropies(exact_energies(z), frobenius_sq(z)).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("scale", [1e-5, 1.0, 1e3])
def test_exact_energies_at_the_scale_of_fine_tuning_updates(scale):
    # the Gram is normalised to unit trace before the eigen-solve (speed), then scaled back
    rng = np.random.default_rng(9)
    a = structured((48, 16), rng, rank=4, noise=0.2) * scale
    got = exact_energies(torch.tensor(a, dtype=torch.float32)[None])[0].numpy()
    ref = np.linalg.svd(a, compute_uv=False) ** 2
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6 * ref[0])


# -- the pipeline's stacks (veneer.shape_batches) against per-matrix numpy oracles ---------------
def _mixed_pair(seed=0):
    """θ_0 and a merged model (float32) whose matrices have mixed shapes over three blocks: square
    of two sizes, tall, wide and a conv kernel (folded to 6×8)."""
    rng = np.random.default_rng(seed)
    shapes = {"q": (8, 8), "o": (12, 12), "fc1": (24, 8), "fc2": (8, 24), "conv": (6, 2, 2, 2)}
    theta0, merged = {}, {}
    for i in range(3):
        for part, shape in shapes.items():
            k = f"blocks.{i}.{part}.weight"
            d = structured((shape[0], int(np.prod(shape[1:]))), rng, rank=2, noise=0.1)
            theta0[k] = torch.tensor(rng.normal(size=shape), dtype=torch.float32)
            merged[k] = theta0[k] + torch.tensor(0.02 * d.reshape(shape), dtype=torch.float32)
    return theta0, merged


def _oracle_e_c(theta0, merged, name, settings):
    """e and c of one matrix in numpy float64 (Δ formed in float32, as LARV forms it): exact r_eff
    from np.linalg.svd of the full matrix; randomized from the range finder written out in numpy
    (QR of AΩ, SVD of QᵀA), its sketches drawn from the matrix's own generator, θ_0's first."""
    x = theta0[name].double().reshape(theta0[name].shape[0], -1).numpy()
    y = (merged[name] - theta0[name]).double().reshape(x.shape).numpy()
    if settings.spectrum == "exact":
        r0, rd = naive_reff(x), naive_reff(y)
    else:
        g = torch.Generator().manual_seed(veneer._matrix_seed(settings.seed, name))

        def reff(a):
            m, n = a.shape
            k = min(settings.rank, m, n)
            cols = min(k + settings.oversample, m, n)
            omega = torch.randn(n, cols, generator=g, dtype=torch.float32).double().numpy()
            q, _ = np.linalg.qr(a @ omega)
            p = np.linalg.svd(q.T @ a, compute_uv=False)[:k] ** 2 / np.sum(a * a)
            return float(np.exp(-(p * np.log(p)).sum()))

        r0, rd = reff(x), reff(y)
    return r0 / (rd + settings.eps), naive_conflict(x, y, settings.eps)


@pytest.mark.parametrize("spectrum", ["exact", "randomized"])
@pytest.mark.parametrize("batch_bytes", [1, None, 960, 2**40])
def test_stacked_diagnostics_match_per_matrix_oracles_on_mixed_shapes(
    spectrum, batch_bytes, monkeypatch
):
    # batch_bytes 1: one matrix per stack, as the default on the CPU (None); 960: the default on
    # an accelerator (1/8 of θ_0 here: stacks of one to three); 2**40: one stack per shape. Every
    # stacking gives each matrix its own e and c.
    theta0, merged = _mixed_pair()
    names = list(theta0)
    s = LarvSettings(spectrum=spectrum, seed=3)
    calls = {"eigvalsh": 0, "qr": 0}
    for fn in calls:
        real = getattr(torch.linalg, fn)

        def spy(*args, _real=real, _fn=fn, **kwargs):
            calls[_fn] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, fn, spy)
    delta = veneer._LazyDelta(theta0, merged, names)
    e, c = veneer.matrix_diagnostics(theta0, delta, names, s, progress=False,
                                     batch_bytes=batch_bytes)  # fmt: skip
    assert sorted(e) == sorted(c) == sorted(names)
    for k in names:
        want_e, want_c = _oracle_e_c(theta0, merged, k, s)
        assert e[k] == pytest.approx(want_e, rel=1e-4), k
        assert c[k] == pytest.approx(want_c, rel=1e-4), k
    # one eigen-solve (exact) or one QR (randomized) per stack and side (θ_0, Δ): batched calls
    stacks = veneer.shape_batches(names, theta0, delta, None, batch_bytes)
    used = "eigvalsh" if spectrum == "exact" else "qr"
    assert calls[used] == 2 * len(stacks)
    # 960 B (θ_0 is 3 × 640 float32 entries, 7680 B, / 8): the three 8×8 (256 B each) and the
    # three conv kernels (192 B) share a stack, 12×12, 24×8 and 8×24 go one by one
    assert len(stacks) == {1: 15, None: 15, 960: 2 + 3 * 3, 2**40: 5}[batch_bytes]
