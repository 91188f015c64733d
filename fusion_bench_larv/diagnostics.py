"""Weight-only diagnostics on plain tensors (spec, "Diagnostics"): spectral entropy / effective
rank, effective-rank contrast ``e`` and commutator conflict ``c``.

Everything is computed in float32 or wider whatever the input dtype, and never needs data or
gradients.
"""

from __future__ import annotations

import math

import torch

DEFAULT_EPS = 1e-8


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """Matrix view used by the diagnostics: a conv kernel (out, in, kh, kw) becomes (out, in·kh·kw)."""
    if t.ndim < 2:
        raise ValueError(f"diagnostics need a tensor with >= 2 dims, got shape {tuple(t.shape)}")
    return t.reshape(t.shape[0], -1)


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64) if t.dtype == torch.float64 else t.to(torch.float32)


def singular_values(
    a: torch.Tensor,
    spectrum: str = "exact",
    rank: int = 2,
    oversample: int = 10,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """All singular values (``exact``) or the top ``rank`` ones from a randomized range finder
    (``randomized``: Gaussian sketch of ``rank + oversample`` columns, no power iterations, as in
    the paper's Appendix B)."""
    a = _wide(as_matrix(a))
    if spectrum == "exact":
        return torch.linalg.svdvals(a)
    if spectrum != "randomized":
        raise ValueError(f"spectrum must be 'exact' or 'randomized', got {spectrum!r}")
    m, n = a.shape
    k = max(1, min(int(rank), m, n))
    sketch = min(k + int(oversample), m, n)
    omega = torch.randn(n, sketch, generator=generator, dtype=a.dtype, device="cpu").to(a.device)
    q, _ = torch.linalg.qr(a @ omega)
    return torch.linalg.svdvals(q.T @ a)[:k]


def spectral_entropy(
    sigma: torch.Tensor, frobenius_sq: float | torch.Tensor | None = None
) -> float:
    """H = −Σ p_j log p_j with p_j = σ_j² / ‖A‖_F². ``frobenius_sq`` defaults to Σσ_j² (exact
    spectrum); a truncated spectrum must pass the true ‖A‖_F² (spec)."""
    energy = sigma.to(torch.float64) ** 2
    total = (
        energy.sum() if frobenius_sq is None else torch.as_tensor(frobenius_sq, dtype=torch.float64)
    )
    if total <= 0:
        return 0.0
    p = energy / total
    p = p[p > 0]  # 0·log 0 = 0
    return float(-(p * p.log()).sum())


def effective_rank(
    a: torch.Tensor,
    spectrum: str = "exact",
    rank: int = 2,
    oversample: int = 10,
    generator: torch.Generator | None = None,
) -> float:
    """r_eff(A) = exp(H(A)); scale invariant, 1 for a rank-1 matrix, min(m, n) for an isotropic one."""
    a = _wide(as_matrix(a))
    sigma = singular_values(a, spectrum, rank, oversample, generator)
    return math.exp(spectral_entropy(sigma, a.pow(2).sum()))


def rank_contrast(
    theta0: torch.Tensor,
    delta: torch.Tensor,
    spectrum: str = "exact",
    rank: int = 2,
    oversample: int = 10,
    eps: float = DEFAULT_EPS,
    generator: torch.Generator | None = None,
) -> float:
    """Effective-rank contrast e = r_eff(θ_0) / (r_eff(Δ) + ε); 0 when ‖Δ‖_F is numerically zero."""
    if is_numerically_zero(delta, theta0):
        return 0.0
    r0 = effective_rank(theta0, spectrum, rank, oversample, generator)
    rd = effective_rank(delta, spectrum, rank, oversample, generator)
    return r0 / (rd + eps)


def is_numerically_zero(delta: torch.Tensor, reference: torch.Tensor | None = None) -> bool:
    """‖Δ‖_F is exactly zero, or below 1e-10·‖reference‖_F (far under fp32 round-off of θ_0)."""
    nd = float(_wide(delta).norm())
    if nd == 0.0:
        return True
    ref = float(_wide(reference).norm()) if reference is not None else 0.0
    return nd <= 1e-10 * ref


def _commutator_norm(x: torch.Tensor, y: torch.Tensor, left: bool) -> torch.Tensor:
    """‖X Yᵀ − Y Xᵀ‖_F (left) or ‖Xᵀ Y − Yᵀ X‖_F (right) without forming the large product.

    For M = X Yᵀ: ‖M − Mᵀ‖² = 2‖M‖² − 2 tr(M²), with ‖X Yᵀ‖² = tr(XᵀX · YᵀY) and
    tr((X Yᵀ)²) = tr((Yᵀ X)²), so only min(m, n)-sized products are needed. Float64 against
    cancellation.
    """
    m, n = x.shape
    big = m if left else n
    small = n if left else m
    if big <= small:  # the product itself is the small side: form it
        prod = x @ y.T if left else x.T @ y
        return torch.linalg.matrix_norm(prod - prod.T)
    x64, y64 = x.to(torch.float64), y.to(torch.float64)
    if left:  # big m×m product; use n×n Grams
        gx, gy, cross = x64.T @ x64, y64.T @ y64, y64.T @ x64
    else:  # big n×n product; use m×m Grams
        gx, gy, cross = x64 @ x64.T, y64 @ y64.T, x64 @ y64.T
    sq = 2.0 * (gx * gy).sum() - 2.0 * (cross * cross.T).sum()
    return sq.clamp_min(0.0).sqrt().to(x.dtype)


def commutator_conflict(
    theta0: torch.Tensor, delta: torch.Tensor, eps: float = DEFAULT_EPS
) -> float:
    """Commutator conflict coefficient.

    Square: ‖θ_0 Δ − Δ θ_0‖_F / (‖θ_0‖_F ‖Δ‖_F + ε).
    Rectangular: mean of the left and right Gram-commutators,
    ½‖θ_0 Δᵀ − Δ θ_0ᵀ‖_F/(…) + ½‖θ_0ᵀ Δ − Δᵀ θ_0‖_F/(…).
    """
    x, y = _wide(as_matrix(theta0)), _wide(as_matrix(delta))
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: θ_0 {tuple(x.shape)} vs Δ {tuple(y.shape)}")
    denom = float(torch.linalg.matrix_norm(x)) * float(torch.linalg.matrix_norm(y)) + eps
    m, n = x.shape
    if m == n:
        return float(torch.linalg.matrix_norm(x @ y - y @ x)) / denom
    left = float(_commutator_norm(x, y, left=True))
    right = float(_commutator_norm(x, y, left=False))
    return 0.5 * left / denom + 0.5 * right / denom
