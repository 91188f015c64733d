"""Weight-only diagnostics on plain tensors (docs/method.md, "Diagnostics"): spectral entropy / effective
rank, effective-rank contrast ``e``, commutator conflict ``c`` and the one rule for a zero update.

Everything is computed in float32 or wider whatever the input dtype, and never needs data or
gradients.

Each formula has ONE batched definition, on stacks ``(B, m, n)`` of same-shaped matrices; the
merge pipeline (:mod:`.veneer`) and the single-matrix helpers both call it:

* ``effective_ranks``: ``r_eff(A) = exp(H)``, ``H = −Σ_j p_j log p_j``, ``p_j = σ_j² / ‖A‖_F²``
  (single matrix: ``effective_rank``);
* ``rank_contrasts``: ``e = r_eff(θ_0) / (r_eff(Δ) + ε)``, 0 for a zero update
  (``rank_contrast``);
* ``commutator_conflicts``: ``c = ‖θ_0 Δ − Δ θ_0‖_F / (‖θ_0‖_F ‖Δ‖_F + ε)`` for square matrices,
  the mean of the two Gram-commutators for rectangular ones (``commutator_conflict``);
* ``is_zero_update``: ``‖Δ‖_F = 0`` or ``‖Δ‖_F ≤ 1e-10·‖θ_0‖_F``.

The pipeline reaches them through two compositions that share intermediate products:
``theta0_statistics`` (‖θ_0‖_F², r_eff(θ_0) and θ_0's small Gram: once per run, cacheable) and
``pair_diagnostics`` (e and c of a merge, given θ_0's statistics). ``rank_contrast`` takes the same
path, so a single pair gives the pipeline's number.

Cost: nothing larger than ``min(m, n)²`` per matrix is formed beyond the inputs, and every step
is one batched call per stack (the pipeline stacks same-shaped matrices, :func:`.veneer.shape_batches`):

* Grams (``AᵀA`` or ``AAᵀ``, the smaller one) are products in the compute dtype (float64 for
  float64 input, float32 otherwise) over row blocks, accumulated in float64: float64 products
  cost ~5x more on a CPU and buy nothing the float32 eigen-solve could keep;
* exact spectrum: the eigenvalues of the smaller Gram are the squared singular values; the
  eigen-solve runs in the compute dtype; ‖Δ‖_F² is that Gram's trace (no second pass over Δ);
* randomized spectrum: one Gaussian sketch per matrix, seeded by the caller; for a pair, θ_0's
  sketch is drawn first and Δ's second from the same generator;
* rectangular commutators: the large side comes from the trace identity
  ``‖M − Mᵀ‖² = 2‖M‖² − 2 tr(M²)`` with ``‖XYᵀ‖² = ⟨XᵀX, YᵀY⟩`` and ``tr((XYᵀ)²) = ⟨C, Cᵀ⟩``,
  ``C = XᵀY``, and the small side is ``‖C − Cᵀ‖`` itself; θ_0's and Δ's Grams are reused. The
  identity is a difference: where it cancels (nearly commuting θ_0 and Δ) those matrices are
  redone with float64 products, so float32 round-off never decides a small c.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_EPS = 1e-8
# ‖Δ‖_F at or below this fraction of ‖θ_0‖_F counts as a zero update (far under fp32 round-off)
ZERO_UPDATE_RTOL = 1e-10


@dataclass(frozen=True)
class SpectrumOptions:
    """How spectra are computed: the config keys of the same names (docs/method.md, "Diagnostics")."""

    spectrum: str = "exact"  # "exact" (all σ_j) | "randomized" (top-k sketch)
    rank: int = 2  # randomized: k
    oversample: int = 10  # randomized: extra sketch columns
    spectrum_tail: str = (
        "none"  # randomized: "none" (the paper's formula) | "uniform" (see ``entropies``)
    )


@dataclass(frozen=True)
class MatrixStats:
    """Per-matrix statistics of one side (θ_0 or Δ) of a stack ``(B, m, n)``, float64."""

    fro2: torch.Tensor  # (B,): ‖A‖_F²
    r_eff: torch.Tensor  # (B,): r_eff(A)
    gram: torch.Tensor | None = None  # (B, k, k), k = min(m, n): small Gram; rectangular only


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


def _sketch_dims(rank: int, oversample: int, m: int, n: int) -> tuple[int, int]:
    """(k, sketch columns) of the randomized range finder for an m×n matrix."""
    k = max(1, min(int(rank), m, n))
    return k, min(k + int(oversample), m, n)


# -- single matrices -----------------------------------------------------------------------------
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
    k, sketch = _sketch_dims(rank, oversample, m, n)
    omega = torch.randn(n, sketch, generator=generator, dtype=a.dtype, device="cpu").to(a.device)
    q, _ = torch.linalg.qr(a @ omega)
    return torch.linalg.svdvals(q.T @ a)[:k]


def spectral_entropy(
    sigma: torch.Tensor, frobenius_sq: float | torch.Tensor | None = None
) -> float:
    """H = −Σ p_j log p_j with p_j = σ_j² / ‖A‖_F². ``frobenius_sq`` defaults to Σσ_j² (exact
    spectrum); a truncated spectrum must pass the true ‖A‖_F² (docs/method.md, "Exact and randomized spectra")."""
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
    """r_eff(A) = exp(H(A)) of one matrix (``effective_ranks``); scale invariant, 1 for a rank-1
    matrix, min(m, n) for an isotropic one."""
    options = SpectrumOptions(spectrum, rank, oversample, spectrum_tail)
    return float(effective_ranks(as_matrix(a).unsqueeze(0), options, [generator])[0])


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
    """e = r_eff(θ_0) / (r_eff(Δ) + ε) of one pair; 0 for a zero update (``is_zero_update``).

    The pipeline's path (``theta0_statistics``, Δ's side of ``pair_diagnostics``,
    ``rank_contrasts``); randomized: θ_0's sketch comes first from ``generator``, Δ's second."""
    options = SpectrumOptions(spectrum, rank, oversample, spectrum_tail)
    x, y = as_matrix(theta0).unsqueeze(0), as_matrix(delta).unsqueeze(0)
    theta0_stats = theta0_statistics(x, options, [generator])
    delta_stats = delta_statistics(y, options, [generator], compute_dtype(x.dtype))
    return float(rank_contrasts(theta0_stats, delta_stats, eps)[0])


def commutator_conflict(
    theta0: torch.Tensor, delta: torch.Tensor, eps: float = DEFAULT_EPS
) -> float:
    """Commutator conflict c of one pair (``commutator_conflicts``).

    Square: ‖θ_0 Δ − Δ θ_0‖_F / (‖θ_0‖_F ‖Δ‖_F + ε).
    Rectangular: mean of the left and right Gram-commutators,
    ½‖θ_0 Δᵀ − Δ θ_0ᵀ‖_F/(…) + ½‖θ_0ᵀ Δ − Δᵀ θ_0‖_F/(…).
    """
    x, y = as_matrix(theta0), as_matrix(delta)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: θ_0 {tuple(x.shape)} vs Δ {tuple(y.shape)}")
    return float(commutator_conflicts(x.unsqueeze(0), y.unsqueeze(0), eps)[0])


# -- the formulas, batched -----------------------------------------------------------------------
def is_zero_update(
    fro2_delta: torch.Tensor | float, fro2_theta0: torch.Tensor | float
) -> torch.Tensor:
    """Whether an update counts as zero (docs/method.md, "Diagnostics"), from squared Frobenius
    norms (batched, float64): ``‖Δ‖_F = 0`` exactly, or
    ``‖Δ‖_F ≤ 1e-10·‖θ_0‖_F`` (``ZERO_UPDATE_RTOL``; far under float32 round-off of θ_0).

    The only definition: ``rank_contrasts`` and ``pair_diagnostics`` (e and c of a zero update are
    0) and the pipeline's "zero everywhere" warning all use it."""
    fy = torch.as_tensor(fro2_delta, dtype=torch.float64)
    fx = torch.as_tensor(fro2_theta0, dtype=torch.float64)
    return (fy == 0) | (fy.sqrt() <= ZERO_UPDATE_RTOL * fx.sqrt())


def effective_ranks(
    a: torch.Tensor,
    options: SpectrumOptions,
    generators: list[torch.Generator | None] | None = None,
    *,
    gram: torch.Tensor | None = None,
    fro2: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """r_eff(A) = exp(H(A)) per matrix of a stack ``(B, m, n)``, float64 ``(B,)``, with
    ``H = −Σ_j p_j log p_j`` and ``p_j = σ_j² / ‖A‖_F²`` (``entropies``).

    * ``exact``: σ_j² are the eigenvalues of the small Gram (``exact_energies``; ``gram`` is
      reused when given, the eigen-solve runs in ``dtype``, default the compute dtype of ``a``);
    * ``randomized``: the top-k σ_j² from one sketch per matrix, drawn from ``generators`` (one per
      matrix; None: the global RNG); p_j still divides by the true ‖A‖_F² and, with
      ``spectrum_tail: uniform``, the residual is spread over the unseen directions.

    ``fro2`` (‖A‖_F², float64) is reused when given."""
    m, n = a.shape[-2:]
    if options.spectrum == "exact":
        energy = exact_energies(a, gram=gram, dtype=dtype)
    elif options.spectrum == "randomized":
        gens = [None] * a.shape[0] if generators is None else generators
        energy = randomized_energies(a, options.rank, options.oversample, gens)
    else:
        raise ValueError(f"spectrum must be 'exact' or 'randomized', got {options.spectrum!r}")
    tail = tail_dims(options.spectrum, options.spectrum_tail, energy, m, n)
    total = frobenius_sq(a) if fro2 is None else fro2
    return entropies(energy, total, tail).exp()


def rank_contrasts(
    theta0: MatrixStats, delta: MatrixStats, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """Effective-rank contrast per matrix, float64 ``(B,)``:
    ``e = r_eff(θ_0) / (r_eff(Δ) + ε)``, and ``e = 0`` where the update is zero
    (``is_zero_update``)."""
    zero = is_zero_update(delta.fro2, theta0.fro2)
    return torch.where(zero, torch.zeros_like(theta0.r_eff), theta0.r_eff / (delta.r_eff + eps))


def commutator_conflicts(
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float = DEFAULT_EPS,
    gram_x: torch.Tensor | None = None,
    gram_y: torch.Tensor | None = None,
    fro2_x: torch.Tensor | None = None,
    fro2_y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Commutator conflict per pair of stacks ``(B, m, n)`` of same-shaped θ_0 / Δ, float64
    ``(B,)``:

    * square: ``c = ‖θ_0 Δ − Δ θ_0‖_F / (‖θ_0‖_F ‖Δ‖_F + ε)``; the commutator itself, in the
      compute dtype;
    * rectangular: ``c = ½‖θ_0 Δᵀ − Δ θ_0ᵀ‖_F / (‖θ_0‖_F ‖Δ‖_F + ε)
      + ½‖θ_0ᵀ Δ − Δᵀ θ_0‖_F / (‖θ_0‖_F ‖Δ‖_F + ε)``. On the tall orientation X, Y (a transpose
      swaps the two terms), with ``C = XᵀY``: the small side is ``‖C − Cᵀ‖`` and the large side
      ``√(2⟨XᵀX, YᵀY⟩ − 2⟨C, Cᵀ⟩)``, redone with float64 products where that difference cancels.

    ``gram_x`` / ``gram_y`` (float64 small-side Grams) and ``fro2_x`` / ``fro2_y`` (‖·‖_F²) are
    reused when given: ``pair_diagnostics`` passes θ_0's statistics and Δ's.
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


# -- the pipeline's two compositions ------------------------------------------------------------
def theta0_statistics(
    theta0: torch.Tensor,
    options: SpectrumOptions,
    generators: list[torch.Generator | None] | None = None,
) -> MatrixStats:
    """θ_0's side of the diagnostics for a stack ``(B, m, n)``: ‖θ_0‖_F², r_eff(θ_0)
    (``effective_ranks``) and, for a rectangular stack, the small Gram (``small_gram``) that the
    commutator identity reuses. They depend on θ_0 and ``options`` only: computed once per run and
    cacheable (:mod:`.stats_cache`).

    Exact spectra come from that Gram (square ones too, then dropped). Randomized: θ_0's sketch is
    drawn from ``generators`` here, before Δ's (see ``skip_theta0_sketches``)."""
    m, n = theta0.shape[-2:]
    square = m == n
    fro2 = frobenius_sq(theta0)
    gram = None if square and options.spectrum == "randomized" else small_gram(theta0)
    r_eff = effective_ranks(theta0, options, generators, gram=gram, fro2=fro2)
    return MatrixStats(fro2, r_eff, None if square else gram)


def skip_theta0_sketches(
    generators: list[torch.Generator], theta0: torch.Tensor, options: SpectrumOptions
) -> None:
    """Advance each generator past the sketch ``theta0_statistics`` would draw for θ_0 (same size
    and dtype), so that Δ's sketch is the same whether θ_0's statistics are computed now or come
    from a cache."""
    m, n = theta0.shape[-2:]
    _, sketch = _sketch_dims(options.rank, options.oversample, m, n)
    for g in generators:
        torch.randn(n, sketch, generator=g, dtype=compute_dtype(theta0.dtype))


def delta_statistics(
    delta: torch.Tensor,
    options: SpectrumOptions,
    generators: list[torch.Generator | None] | None = None,
    dtype: torch.dtype | None = None,
) -> MatrixStats:
    """Δ's side of the diagnostics for a stack ``(B, m, n)``: ‖Δ‖_F², r_eff(Δ) and, rectangular,
    the small Gram; on every merge, so cheaper than ``theta0_statistics``: ‖Δ‖_F² is the Gram's
    trace where there is one, and a square Δ's Gram (exact spectrum only) is a single product in
    ``dtype`` (θ_0's compute dtype; default Δ's)."""
    m, n = delta.shape[-2:]
    cd = compute_dtype(delta.dtype) if dtype is None else dtype
    if m == n:
        yc = delta.to(cd)
        gram = None if options.spectrum == "randomized" else yc.mT @ yc  # spectrum only
    else:
        gram = small_gram(delta)  # also the commutator identity's Δ Gram
    if gram is None:
        fro2 = frobenius_sq(delta)
    else:
        fro2 = gram.diagonal(dim1=-2, dim2=-1).sum(-1, dtype=torch.float64)
    r_eff = effective_ranks(delta, options, generators, gram=gram, fro2=fro2, dtype=cd)
    return MatrixStats(fro2, r_eff, None if m == n else gram)


def pair_diagnostics(
    theta0: torch.Tensor,
    delta: torch.Tensor,
    theta0_stats: MatrixStats,
    options: SpectrumOptions,
    eps: float = DEFAULT_EPS,
    generators: list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """e and c of each pair (θ_0, Δ) of two stacks ``(B, m, n)``, float64 ``(B,)`` each, given
    θ_0's statistics (``theta0_statistics``, fresh or cached):

    * ``e = r_eff(θ_0) / (r_eff(Δ) + ε)`` (``rank_contrasts``);
    * ``c`` (``commutator_conflicts``), with both sides' small Grams and squared norms reused;
    * both are 0 for a zero update (``is_zero_update``).

    Randomized: ``generators`` must have drawn θ_0's sketch already (``theta0_statistics`` does;
    ``skip_theta0_sketches`` replays it); Δ's sketch is drawn here."""
    delta_stats = delta_statistics(delta, options, generators, compute_dtype(theta0.dtype))
    e = rank_contrasts(theta0_stats, delta_stats, eps)
    c = commutator_conflicts(
        theta0, delta, eps, gram_x=theta0_stats.gram, gram_y=delta_stats.gram,
        fro2_x=theta0_stats.fro2, fro2_y=delta_stats.fro2,
    )  # fmt: skip
    zero = is_zero_update(delta_stats.fro2, theta0_stats.fro2)
    return e, torch.where(zero, torch.zeros_like(c), c)


# -- batched kernels: the cost tricks behind the formulas --------------------------------------
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
    eigenvalues of the smaller Gram (pass ``gram`` to reuse one), one batched eigen-solve for the
    stack. The eigen-solve runs in ``dtype`` (default: float64 for float64 input, float32
    otherwise); round-off below zero is clamped to 0."""
    if gram is None:
        gram = small_gram(a)
    if dtype is None:
        dtype = compute_dtype(a.dtype) if a is not None else torch.float64
    # Normalised to unit trace first: the spectrum of a fine-tuning update sits near 1e-6, where
    # LAPACK's iterations run into subnormal numbers and slow down >10x; scaled back afterwards.
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1).to(torch.float64)
    scale = torch.where(trace > 0, trace, torch.ones_like(trace))
    g = (gram / scale.to(gram.dtype)[..., None, None]).to(dtype)
    # one call for the whole stack: LAPACK loops over it in C++ (one workspace query), and cuSOLVER
    # gets the batch to schedule as it can
    lam = torch.linalg.eigvalsh(g).to(torch.float64) * scale[..., None]
    return lam.flip(-1).clamp_min(0.0)


def randomized_energies(
    a: torch.Tensor,
    rank: int,
    oversample: int,
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """Top-``rank`` squared singular values from the randomized range finder (one Gaussian sketch
    per matrix, drawn on the CPU from that matrix's generator, as ``singular_values``); the sketch
    products, the QR and the SVD of QᵀA are one batched call each for the stack."""
    a = a.to(compute_dtype(a.dtype))
    m, n = a.shape[-2:]
    k, sketch = _sketch_dims(rank, oversample, m, n)
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
    the true total. Without it (the paper's formula, the default) a spectrum whose energy spreads out loses
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


def _gram_commutators(gx: torch.Tensor, gy: torch.Tensor, c: torch.Tensor) -> tuple:
    """From ``XᵀX``, ``YᵀY`` and ``C = XᵀY`` of tall stacks: the small-side commutator norm
    ``‖C − Cᵀ‖``, the large side's square ``2⟨XᵀX, YᵀY⟩ − 2⟨C, Cᵀ⟩`` and that identity's first
    term (the scale its round-off is relative to)."""
    small = torch.linalg.matrix_norm(c - c.mT)
    first = 2.0 * (gx * gy).sum((-2, -1))
    return small, first - 2.0 * (c * c.mT).sum((-2, -1)), first
