"""LOT Merging (Layer-wise Optimal Task vector merging, arXiv 2505.23859): the mathematics, on plain
tensors (no FusionBench, no hooks, no data loading; see :mod:`.lot_algorithm` for those).

Notation (weights stored ``out x in``, as ``nn.Linear`` does): for task ``i``, ``X_i`` (``n_i x d``)
are the inputs that *its own* fine-tuned model feeds a linear layer on a few exemplars of task
``i``, ``T_i = W_i - W_0`` its task vector. LOT picks the merged task vector ``T`` minimising the
feature drift ``sum_i ||X_i (T - T_i)^T||_F^2``, a convex quadratic with the closed form

    T = (sum_i T_i G_i) (sum_i G_i)^+,        G_i = X_i^T X_i / n_i     (the task's Gram).

Choices the notes leave open, made here (every one is an option of :class:`LOTAccumulator`):

- **Grams are per-row means** (``X_i^T X_i / n_i``): each task weighs the same whatever its number
  of exemplars or tokens; with equal counts this is the notes' objective up to a constant.
- **Biases** (``bias="joint"``, default): the drift of the layer's full affine output
  ``x W^T + b`` is minimised over ``[T, t]`` jointly, by appending a constant 1 to every input
  (augmented Gram ``[[X^T X, X^T 1], [1^T X, n]] / n``): one closed form for weight and bias.
  ``bias="mean"``: weights as above (plain Gram), biases take the mean of their task vectors.
- **Regularisation** of a rank-deficient ``A = sum_i G_i`` (``regularization``):
  ``"pinv"`` (default, the notes): Moore-Penrose pseudo-inverse, eigenvalues below
  ``rcond * lambda_max`` treated as zero (the minimum-norm minimiser: no update in directions no
  exemplar reaches); ``"ridge"``: ``(A + lam I)^-1`` with ``lam = ridge * tr(A) / d`` (shrinks
  toward the pretrained weight); ``"ridge_to_mean"``: the prior ``lam * sum_i ||T - T_i||^2`` is
  added to the objective, ``T = (sum_i T_i (G_i + lam I)) (A + K lam I)^-1`` -- in directions no
  exemplar reaches, ``T`` falls back to the mean task vector.
- **Normalisation layers** (LayerNorm ``y = gamma * xhat + beta``, ``xhat`` the normalised
  input; ``norms="energy"``, default): the scale's task vector is the per-dimension average of the
  tasks' scale task vectors weighted by the energy ``E_i[d] = mean_rows xhat_i[:, d]^2`` (the
  notes; exactly the minimiser of ``sum_i ||(gamma - gamma_i) * xhat_i||^2``). The shift is then the
  drift minimiser given that scale: ``t_beta = mean_i(t_beta_i - (t_gamma - t_gamma_i) * m_i)``,
  ``m_i[d] = mean_rows xhat_i[:, d]``. ``norms="mean"``: both take the mean task vector.
- **Everything else** (embeddings, class token, position embeddings, layer scales, layers no
  exemplar reached): the mean of the task vectors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "REGULARIZATIONS",
    "GramAccumulator",
    "LOTAccumulator",
    "NormStatsAccumulator",
    "feature_drift",
    "lot_closed_form",
    "lot_norm_scale",
    "lot_norm_shift",
    "solve_right",
]

REGULARIZATIONS = ("pinv", "ridge", "ridge_to_mean")
BIAS_MODES = ("joint", "mean")
NORM_MODES = ("energy", "mean")

_DTYPE = torch.float64


# ------------------------------------------------------------------------------------- statistics
class GramAccumulator:
    """Running ``X^T X`` over row batches of a layer's input (``augment``: with a column of ones
    appended, for the bias). :meth:`mean` is ``X^T X / rows`` (float64, on the input's device)."""

    def __init__(self, augment: bool = False):
        self.augment = augment
        self.sum: torch.Tensor | None = None
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(_DTYPE)
        if self.augment:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        g = x.T @ x
        self.sum = g if self.sum is None else self.sum + g
        self.rows += x.shape[0]

    def mean(self) -> torch.Tensor:
        if self.sum is None:
            raise ValueError("no rows were added")
        return self.sum / self.rows


class NormStatsAccumulator:
    """Per-dimension ``mean(xhat^2)`` (energy) and ``mean(xhat)`` of a normalisation layer's
    normalised input ``xhat`` (last dimension = the normalised features)."""

    def __init__(self):
        self.sq: torch.Tensor | None = None
        self.lin: torch.Tensor | None = None
        self.rows = 0

    def add(self, xhat: torch.Tensor) -> None:
        x = xhat.detach().reshape(-1, xhat.shape[-1]).to(_DTYPE)
        sq, lin = (x * x).sum(0), x.sum(0)
        self.sq = sq if self.sq is None else self.sq + sq
        self.lin = lin if self.lin is None else self.lin + lin
        self.rows += x.shape[0]

    def energy(self) -> torch.Tensor:
        if self.sq is None:
            raise ValueError("no rows were added")
        return self.sq / self.rows

    def mean(self) -> torch.Tensor:
        if self.lin is None:
            raise ValueError("no rows were added")
        return self.lin / self.rows


# ------------------------------------------------------------------------------------ closed form
def solve_right(
    b: torch.Tensor,
    a: torch.Tensor,
    regularization: str = "pinv",
    rcond: float = 1e-6,
    ridge: float = 1e-3,
) -> torch.Tensor:
    """``B A^+`` (``"pinv"``) or ``B (A + lam I)^-1`` with ``lam = ridge * tr(A) / d`` (``"ridge"``),
    for a symmetric positive semi-definite ``A`` (``d x d``) and ``B`` (``m x d``); float64."""
    a, b = a.to(_DTYPE), b.to(_DTYPE)
    if regularization == "pinv":
        # A^+ = V diag(1/w) V^T over the eigenvalues w > rcond * w_max (round-off negatives and
        # the null space dropped); applied as (B V_k / w_k) V_k^T, cheaper than forming A^+
        w, v = torch.linalg.eigh(a)
        keep = w > rcond * w.max().clamp_min(0)
        if not bool(keep.any()):
            return torch.zeros_like(b)
        v = v[:, keep]
        return ((b @ v) / w[keep]) @ v.T
    if regularization == "ridge":
        d = a.shape[0]
        lam = ridge * torch.trace(a) / d
        if not lam > 0:
            return torch.zeros_like(b)
        a_reg = a + lam * torch.eye(d, dtype=a.dtype, device=a.device)
        # A symmetric: B A^-1 = (A^-1 B^T)^T
        return torch.linalg.solve(a_reg, b.T).T
    raise ValueError(f"regularization must be one of {REGULARIZATIONS}, got {regularization!r}")


def _ridge_lambda(grams: Sequence[torch.Tensor], ridge: float) -> torch.Tensor:
    a = sum(g.to(_DTYPE) for g in grams)
    return ridge * torch.trace(a) / (a.shape[0] * len(grams))


def lot_closed_form(
    task_vectors: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    regularization: str = "pinv",
    rcond: float = 1e-6,
    ridge: float = 1e-3,
) -> torch.Tensor:
    """The merged task vector of one linear layer: ``argmin_T sum_i tr((T - T_i) G_i (T - T_i)^T)``
    = ``(sum_i T_i G_i)(sum_i G_i)^+`` (see the module docstring for the regularisations).

    ``task_vectors``: ``T_i`` (``out x d``; with a bias, ``[T_i, t_i]`` of width ``d + 1`` and the
    Grams augmented to match); ``grams``: ``G_i`` (``d x d``). Returns float64."""
    if len(task_vectors) != len(grams) or not grams:
        raise ValueError("need one Gram per task vector, and at least one")
    if regularization == "ridge_to_mean":
        lam = _ridge_lambda(grams, ridge)
        eye = torch.eye(grams[0].shape[0], dtype=_DTYPE, device=grams[0].device)
        grams = [g.to(_DTYPE) + lam * eye for g in grams]
        regularization = "pinv"  # now positive definite (unless every G_i = 0)
    a = sum(g.to(_DTYPE) for g in grams)
    b = sum(t.to(_DTYPE) @ g.to(_DTYPE) for t, g in zip(task_vectors, grams, strict=True))
    return solve_right(b, a, regularization, rcond, ridge)


def feature_drift(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """``||X delta^T||_F^2 / n = tr(delta G delta^T)`` for ``G = X^T X / n`` (float64)."""
    delta = delta.to(_DTYPE)
    return float(torch.einsum("oi,ij,oj->", delta, gram.to(_DTYPE), delta))


def lot_norm_scale(
    task_vectors: Sequence[torch.Tensor], energies: Sequence[torch.Tensor], eps: float = 1e-12
) -> torch.Tensor:
    """Per-dimension energy-weighted mean of the scales' task vectors (plain mean where no task
    carries energy)."""
    tv = torch.stack([t.to(_DTYPE) for t in task_vectors])
    e = torch.stack([x.to(_DTYPE) for x in energies])
    total = e.sum(0)
    weighted = (e * tv).sum(0) / total.clamp_min(eps)
    return torch.where(total > eps, weighted, tv.mean(0))


def lot_norm_shift(
    shift_task_vectors: Sequence[torch.Tensor],
    scale_task_vectors: Sequence[torch.Tensor],
    merged_scale: torch.Tensor,
    means: Sequence[torch.Tensor],
) -> torch.Tensor:
    """The shift minimising ``sum_i mean_rows ||(g - g_i) * xhat_i + (b - b_i)||^2`` for the given
    merged scale ``g``: ``mean_i(b_i - (g - g_i) * m_i)`` (in task-vector terms)."""
    g = merged_scale.to(_DTYPE)
    terms = [
        b.to(_DTYPE) - (g - s.to(_DTYPE)) * m.to(_DTYPE)
        for b, s, m in zip(shift_task_vectors, scale_task_vectors, means, strict=True)
    ]
    return torch.stack(terms).mean(0)


# ---------------------------------------------------------------------------- whole state dicts
@dataclass(frozen=True)
class LinearSpec:
    """The state-dict keys of one linear layer."""

    weight: str
    bias: str | None = None


@dataclass(frozen=True)
class NormSpec:
    """The state-dict keys of one normalisation layer (scale ``weight``, shift ``bias``)."""

    weight: str | None
    bias: str | None = None


@dataclass
class LOTAccumulator:
    """Streams the tasks one at a time (one fine-tuned model in memory at a time) and returns the
    merged task vector of a whole state dict.

    ``linears`` / ``norms``: module name -> its state-dict keys. Per task, :meth:`add_task` takes
    the task vector (``{key: tensor}``), the Grams of the linear layers' inputs (augmented with a
    ones column when the layer has a bias and ``bias == "joint"``) and the normalisation layers'
    statistics (``(energy, mean)`` of ``xhat``). A layer whose statistics are missing for some task
    (no exemplar reached it) falls back to the mean task vector, as does every other parameter.
    """

    linears: Mapping[str, LinearSpec]
    norms: Mapping[str, NormSpec]
    regularization: str = "pinv"
    rcond: float = 1e-6
    ridge: float = 1e-3
    bias: str = "joint"
    norm_mode: str = "energy"
    num_tasks: int = 0
    # running sums
    _mean_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    _a: dict[str, torch.Tensor] = field(default_factory=dict)
    _b: dict[str, torch.Tensor] = field(default_factory=dict)
    _norm_tv: dict[str, list] = field(default_factory=dict)
    _missing: set[str] = field(default_factory=set)

    def __post_init__(self):
        if self.regularization not in REGULARIZATIONS:
            raise ValueError(f"regularization must be one of {REGULARIZATIONS}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.norm_mode not in NORM_MODES:
            raise ValueError(f"norms must be one of {NORM_MODES}, got {self.norm_mode!r}")

    def augmented(self, module: str) -> bool:
        """Whether ``module``'s Gram must carry the ones column (a bias merged jointly)."""
        return self.bias == "joint" and self.linears[module].bias is not None

    def _stack(self, module: str, tv: Mapping[str, torch.Tensor]) -> torch.Tensor:
        spec = self.linears[module]
        w = tv[spec.weight].to(_DTYPE).reshape(tv[spec.weight].shape[0], -1)
        if self.augmented(module):
            w = torch.cat([w, tv[spec.bias].to(_DTYPE).reshape(-1, 1)], dim=1)
        return w

    def add_task(
        self,
        task_vector: Mapping[str, torch.Tensor],
        grams: Mapping[str, torch.Tensor],
        norm_stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        self.num_tasks += 1
        for key, t in task_vector.items():
            if t.is_floating_point():
                t = t.detach().to(_DTYPE)
                self._mean_sum[key] = t if key not in self._mean_sum else self._mean_sum[key] + t
        for module in self.linears:
            g = grams.get(module)
            if g is None:
                self._missing.add(module)
                continue
            g = g.to(_DTYPE).cpu()
            t = self._stack(module, task_vector)
            self._a[module] = g if module not in self._a else self._a[module] + g
            self._b[module] = t @ g if module not in self._b else self._b[module] + t @ g
        for module, spec in self.norms.items():
            stats = norm_stats.get(module)
            if stats is None:
                self._missing.add(module)
                continue
            energy, mean = (s.to(_DTYPE).cpu() for s in stats)
            scale = task_vector[spec.weight] if spec.weight is not None else None
            shift = task_vector[spec.bias] if spec.bias is not None else None
            self._norm_tv.setdefault(module, []).append((scale, shift, energy, mean))

    @property
    def missing(self) -> list[str]:
        """Layers that fell back to the mean task vector (no statistics for some task)."""
        return sorted(self._missing)

    def finalize(self) -> dict[str, torch.Tensor]:
        """The merged task vector (float64; non-float entries are left out)."""
        k = self.num_tasks
        if k == 0:
            raise ValueError("no task was added")
        out = {key: s / k for key, s in self._mean_sum.items()}
        for module, spec in self.linears.items():
            if module in self._missing or module not in self._a:
                continue
            if self.regularization == "ridge_to_mean":
                a = self._a[module]
                lam = self.ridge * torch.trace(a) / (a.shape[0] * k)  # as _ridge_lambda
                eye = torch.eye(self._a[module].shape[0], dtype=_DTYPE)
                # sum_i T_i (G_i + lam I) = B + lam * sum_i T_i = B + lam * K * mean_i T_i
                mean_t = out[spec.weight].reshape(out[spec.weight].shape[0], -1)
                if self.augmented(module):
                    mean_t = torch.cat([mean_t, out[spec.bias].reshape(-1, 1)], dim=1)
                merged = solve_right(
                    self._b[module] + lam * k * mean_t, a + k * lam * eye, "pinv", self.rcond
                )
            else:
                merged = solve_right(
                    self._b[module], self._a[module], self.regularization, self.rcond, self.ridge
                )
            w_shape = out[spec.weight].shape
            if self.augmented(module):
                out[spec.weight] = merged[:, :-1].reshape(w_shape)
                out[spec.bias] = merged[:, -1].reshape(out[spec.bias].shape)
            else:
                out[spec.weight] = merged.reshape(w_shape)
        if self.norm_mode == "energy":
            for module, spec in self.norms.items():
                if module in self._missing or module not in self._norm_tv:
                    continue
                scales, shifts, energies, means = zip(*self._norm_tv[module], strict=True)
                if spec.weight is None:
                    continue
                g = lot_norm_scale(scales, energies)
                out[spec.weight] = g.reshape(out[spec.weight].shape)
                if spec.bias is not None:
                    out[spec.bias] = lot_norm_shift(shifts, scales, g, means).reshape(
                        out[spec.bias].shape
                    )
        return out
