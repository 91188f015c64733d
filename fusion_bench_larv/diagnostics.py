"""Weight-only diagnostics on plain tensors (spec, "Diagnostics"): spectral entropy / effective
rank, effective-rank contrast ``e`` and commutator conflict ``c``.

Everything is computed in float32 or wider whatever the input dtype, and never needs data or
gradients.

Two layers of API: the single-matrix functions (``singular_values``, ``effective_rank``,
``rank_contrast``, ``commutator_conflict``) and their batched, cost-conscious kernels
(``frobenius_sq``, ``small_gram``, ``exact_energies``, ``randomized_energies``,
``entropies``, ``commutator_conflicts``) that work on stacks ``(B, m, n)`` of same-shaped
matrices on whatever device the tensors live on. The batched kernels never form an object larger
than ``min(m, n)²`` per matrix beyond the inputs:

* Grams (``AᵀA`` or ``AAᵀ``, the smaller one) are products in the compute dtype (float64 for
  float64 input, float32 otherwise) over row blocks, accumulated in float64: float64 products
  cost ~5x more on a CPU and buy nothing the float32 eigen-solve could keep;
* exact spectrum: the eigenvalues of the smaller Gram are the squared singular values; the
  eigen-solve runs in the compute dtype;
* rectangular commutators: the large side comes from the trace identity
  ``‖M − Mᵀ‖² = 2‖M‖² − 2 tr(M²)`` with ``‖XYᵀ‖² = ⟨XᵀX, YᵀY⟩`` and ``tr((XYᵀ)²) = ⟨C, Cᵀ⟩``,
  ``C = XᵀY``, and the small side is ``‖C − Cᵀ‖`` itself. The identity is a difference: where
  it cancels (nearly commuting θ_0 and Δ) those matrices are redone with float64 products, so
  float32 round-off never decides a small c.
"""

from __future__ import annotations

import torch

DEFAULT_EPS = 1e-8


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """Matrix view used by the diagnostics: a conv kernel (out, in, kh, kw) becomes (out, in·kh·kw)."""
    if t.ndim < 2:
        raise ValueError(f"diagnostics need a tensor with >= 2 dims, got shape {tuple(t.shape)}")
    return t.reshape(t.shape[0], -1)


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64) if t.dtype == torch.float64 else t.to(torch.float32)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, float32 for everything else (float32, float16, bfloat16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    spectrum_tail: str = "none",
) -> float:
    """r_eff(A) = exp(H(A)); scale invariant, 1 for a rank-1 matrix, min(m, n) for an isotropic one.

    Computed by the batched kernels (exact: eigenvalues of the smaller Gram)."""
    a = as_matrix(a).unsqueeze(0)
    if spectrum == "exact":
        energy = exact_energies(a)
    elif spectrum == "randomized":
        energy = randomized_energies(a, rank, oversample, [generator])
    else:
        raise ValueError(f"spectrum must be 'exact' or 'randomized', got {spectrum!r}")
    tail = tail_dims(spectrum, spectrum_tail, energy, *a.shape[-2:])
    return float(entropies(energy, frobenius_sq(a), tail).exp()[0])


def rank_contrast(
    theta0: torch.Tensor,
    delta: torch.Tensor,
    spectrum: str = "exact",
    rank: int = 2,
    oversample: int = 10,
    eps: float = DEFAULT_EPS,
    generator: torch.Generator | None = None,
    spectrum_tail: str = "none",
) -> float:
    """Effective-rank contrast e = r_eff(θ_0) / (r_eff(Δ) + ε); 0 when ‖Δ‖_F is numerically zero."""
    if is_numerically_zero(delta, theta0):
        return 0.0
    r0 = effective_rank(theta0, spectrum, rank, oversample, generator, spectrum_tail)
    rd = effective_rank(delta, spectrum, rank, oversample, generator, spectrum_tail)
    return r0 / (rd + eps)


def is_numerically_zero(delta: torch.Tensor, reference: torch.Tensor | None = None) -> bool:
    """‖Δ‖_F is exactly zero, or below 1e-10·‖reference‖_F (far under fp32 round-off of θ_0)."""
    nd = float(_wide(delta).norm())
    if nd == 0.0:
        return True
    ref = float(_wide(reference).norm()) if reference is not None else 0.0
    return nd <= 1e-10 * ref


def commutator_conflict(
    theta0: torch.Tensor, delta: torch.Tensor, eps: float = DEFAULT_EPS
) -> float:
    """Commutator conflict coefficient.

    Square: ‖θ_0 Δ − Δ θ_0‖_F / (‖θ_0‖_F ‖Δ‖_F + ε).
    Rectangular: mean of the left and right Gram-commutators,
    ½‖θ_0 Δᵀ − Δ θ_0ᵀ‖_F/(…) + ½‖θ_0ᵀ Δ − Δᵀ θ_0‖_F/(…).
    """
    x, y = as_matrix(theta0), as_matrix(delta)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: θ_0 {tuple(x.shape)} vs Δ {tuple(y.shape)}")
    return float(commutator_conflicts(x.unsqueeze(0), y.unsqueeze(0), eps)[0])


# -- batched kernels -----------------------------------------------------------------------------
# Row blocks for Gram products: a converted copy of at most this many rows per matrix at once.
_ROW_BLOCK = 2048
# Redo a rectangular commutator with float64 products when the identity's difference is below this
# fraction of its first term: float32 products err by ~1e-6 of that term, so c stays within ~1e-4.
_CANCELLATION = 1e-2


def frobenius_sq(a: torch.Tensor) -> torch.Tensor:
    """‖A_b‖_F² per matrix of a stack ``(B, m, n)``, accumulated in float64."""
    return torch.linalg.vector_norm(a, dim=(-2, -1), dtype=torch.float64).pow(2)


def tall(a: torch.Tensor) -> torch.Tensor:
    """The stack with every matrix turned tall (m ≥ n): a wide one is transposed (a view)."""
    return a.mT if a.shape[-2] < a.shape[-1] else a


def gram64(x: torch.Tensor, y: torch.Tensor | None = None, exact: bool = False) -> torch.Tensor:
    """``Xᵀ Y`` (``Xᵀ X`` without ``y``) of tall stacks ``(B, m, n)`` as float64: products over
    row blocks in the compute dtype (float64 with ``exact``), accumulated in float64, so that no
    full converted copy of the inputs is made."""
    m = x.shape[-2]
    work = torch.float64 if exact else compute_dtype(x.dtype)
    out = None
    for i in range(0, m, _ROW_BLOCK):
        xb = x[..., i : i + _ROW_BLOCK, :].to(work)
        yb = xb if y is None else y[..., i : i + _ROW_BLOCK, :].to(work)
        part = (xb.mT @ yb).to(torch.float64)
        out = part if out is None else out.add_(part)
    return out


def small_gram(a: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """The ``min(m, n)²`` Gram (``AᵀA`` of the tall orientation) of each matrix, float64 (see
    ``gram64`` for ``exact``)."""
    return gram64(tall(a), exact=exact)


def exact_energies(a: torch.Tensor | None = None, gram: torch.Tensor | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
    """All squared singular values σ_j², descending, float64, shape ``(B, min(m, n))``: the
    eigenvalues of the smaller Gram (pass ``gram`` to reuse one). The eigen-solve runs in
    ``dtype`` (default: float64 for float64 input, float32 otherwise); round-off below zero is
    clamped to 0."""
    if gram is None:
        gram = small_gram(a)
    if dtype is None:
        dtype = compute_dtype(a.dtype) if a is not None else torch.float64
    # Normalised to unit trace first: the spectrum of a fine-tuning update sits near 1e-6, where
    # LAPACK's iterations run into subnormal numbers and slow down >10x; scaled back afterwards.
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1).to(torch.float64)
    scale = torch.where(trace > 0, trace, torch.ones_like(trace))
    g = (gram / scale.to(gram.dtype)[..., None, None]).to(dtype)
    if g.device.type == "cpu" and g.ndim == 3:  # LAPACK: a loop beats the batched call
        lam = torch.stack([torch.linalg.eigvalsh(m) for m in g]).to(torch.float64)
    else:  # CUDA: one batched call
        lam = torch.linalg.eigvalsh(g).to(torch.float64)
    lam = lam * scale[..., None]
    return lam.flip(-1).clamp_min(0.0)


def randomized_energies(
    a: torch.Tensor,
    rank: int,
    oversample: int,
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """Top-``rank`` squared singular values from the randomized range finder (one Gaussian sketch
    per matrix, drawn on the CPU from that matrix's generator, as ``singular_values``)."""
    a = a.to(compute_dtype(a.dtype))
    m, n = a.shape[-2:]
    k = max(1, min(int(rank), m, n))
    sketch = min(k + int(oversample), m, n)
    omega = torch.stack(
        [torch.randn(n, sketch, generator=g, dtype=a.dtype, device="cpu") for g in generators]
    ).to(a.device)
    q, _ = torch.linalg.qr(a @ omega)
    return torch.linalg.svdvals(q.mT @ a)[..., :k].to(torch.float64).pow(2)


def entropies(energy: torch.Tensor, total: torch.Tensor, tail_dims: int = 0) -> torch.Tensor:
    """Spectral entropy per row: H = −Σ p_j log p_j, p_j = energy_j / total (float64); 0 where
    total ≤ 0.

    ``tail_dims`` > 0 (``spectrum_tail: uniform``) adds the unseen rest of a truncated spectrum:
    the residual share ``p_r = 1 − Σ p_j`` spread evenly over the ``tail_dims`` directions outside
    the top-k, ``−p_r log(p_r / tail_dims)`` — the largest entropy consistent with the top-k and
    the true total. Without it (the spec's formula) a spectrum whose energy spreads out loses
    top-k mass and so *lowers* H, ranking layers opposite to the exact entropy."""
    energy = energy.to(torch.float64)
    total = total.to(torch.float64)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    p = energy / safe.unsqueeze(-1)
    h = -torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p)).sum(-1)
    if tail_dims > 0:
        rest = (1.0 - p.sum(-1)).clamp_min(0.0)  # round-off can push Σ p_j past 1
        h = h - torch.where(rest > 0, rest * (rest.clamp_min(1e-300) / tail_dims).log(),
                            torch.zeros_like(rest))  # fmt: skip
    return torch.where(total > 0, h, torch.zeros_like(h))


def tail_dims(spectrum: str, spectrum_tail: str, energy: torch.Tensor, m: int, n: int) -> int:
    """Directions outside the computed spectrum that ``entropies`` spreads the residual over:
    ``min(m, n) − k`` for a randomized spectrum with ``spectrum_tail: uniform``, else 0 (an exact
    spectrum has no tail)."""
    if spectrum != "randomized" or spectrum_tail == "none":
        return 0
    if spectrum_tail != "uniform":
        raise ValueError(f"spectrum_tail must be 'none' or 'uniform', got {spectrum_tail!r}")
    return max(0, min(m, n) - energy.shape[-1])


def commutator_conflicts(
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float = DEFAULT_EPS,
    gram_x: torch.Tensor | None = None,
    gram_y: torch.Tensor | None = None,
    fro2_x: torch.Tensor | None = None,
    fro2_y: torch.Tensor | None = None,
) -> torch.Tensor:
    """``commutator_conflict`` for stacks ``(B, m, n)`` of same-shaped θ_0 / Δ, float64 ``(B,)``.

    Square: the commutator itself, in the compute dtype (as ``commutator_conflict``).
    Rectangular (oriented tall): ``C = XᵀY``; small side ``‖C − Cᵀ‖``; large side
    ``√(2⟨XᵀX, YᵀY⟩ − 2⟨C, Cᵀ⟩)``. ``gram_x`` / ``gram_y`` (float64 small-side Grams) are
    reused when given: θ_0's comes from its per-run statistics, Δ's from its spectrum.
    """
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: θ_0 {tuple(x.shape)} vs Δ {tuple(y.shape)}")
    fx = frobenius_sq(x) if fro2_x is None else fro2_x.to(torch.float64)
    fy = frobenius_sq(y) if fro2_y is None else fro2_y.to(torch.float64)
    denom = fx.sqrt() * fy.sqrt() + eps
    m, n = x.shape[-2:]
    if m == n:
        cd = compute_dtype(x.dtype)
        xc, yc = x.to(cd), y.to(cd)
        num = torch.linalg.matrix_norm(xc @ yc - yc @ xc).to(torch.float64)
        return num / denom
    xt, yt = tall(x), tall(y)
    gx = gram64(xt) if gram_x is None else gram_x.to(torch.float64)
    gy = gram64(yt) if gram_y is None else gram_y.to(torch.float64)
    small, big_sq, first = _gram_commutators(gx, gy, gram64(xt, yt))
    if compute_dtype(x.dtype) != torch.float64:
        redo = (big_sq < _CANCELLATION * first).nonzero().flatten()
        if len(redo):
            xr, yr = xt.index_select(0, redo), yt.index_select(0, redo)
            small[redo], big_sq[redo], _ = _gram_commutators(
                gram64(xr, exact=True), gram64(yr, exact=True), gram64(xr, yr, exact=True)
            )
    big = big_sq.clamp_min(0.0).sqrt()
    return 0.5 * big / denom + 0.5 * small / denom


def _gram_commutators(gx: torch.Tensor, gy: torch.Tensor, c: torch.Tensor) -> tuple:
    """From ``XᵀX``, ``YᵀY`` and ``C = XᵀY`` of tall stacks: the small-side commutator norm
    ``‖C − Cᵀ‖``, the large side's square ``2⟨XᵀX, YᵀY⟩ − 2⟨C, Cᵀ⟩`` and that identity's first
    term (the scale its round-off is relative to)."""
    small = torch.linalg.matrix_norm(c - c.mT)
    first = 2.0 * (gx * gy).sum((-2, -1))
    return small, first - 2.0 * (c * c.mT).sum((-2, -1)), first
