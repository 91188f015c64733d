"""LiNeS as its authors define it (docs/method.md, "LiNeS (faithful)"): the pure maths.

Wang et al., "LiNeS: Post-training layer scaling prevents forgetting and enhances model merging"
(ICLR 2025). Checked against the authors' public code, ``wang-kee/LiNeS``:

- ``src/eval/eval.py``, ``LiNeS_scaling(task_vector, alpha, beta, num_blocks)``: every key of
  block ℓ (the first ``i`` in 0..L−1 whose ``".{i}."`` occurs in the key) is scaled by
  α + β·ℓ/(L − 1); every other key by α;
- ``src/eval/eval.py``, ``evaluate``: for multi-task merging,
  α = (norm_summed_tvs / norm_mtv) · 1/num_tasks, then θ = θ_0 + scaled τ_MTV
  (``apply_to(..., scaling_coef=1.0)``): LiNeS *replaces* the merger's global coefficient, which
  is swept as β instead;
- ``src/eval/aggregation.py``, ``create_task_vector``: norm_mtv = ‖τ_MTV‖₁ and
  norm_summed_tvs = ‖Σ_t τ_t‖₁, L1 norms of the whole flattened state dict (``remove_keys = []``:
  every key, embeddings and norms included), τ_MTV the merger's output before any coefficient
  (Task Arithmetic's Σ_t τ_t, TIES' disjoint merge).

Plain tensors and floats in, plain values out; the FusionBench adapter is
:mod:`.lines_algorithm`. Two departures from the authors' code, neither of which changes a value
on a single-stack model such as the CLIP vision towers: blocks are found by
:func:`.layers.group_layers` (LARV's block finder) instead of the ``".{i}."`` substring with a
hard-coded L (12 or 24), and the L1 norms are accumulated in float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from ..core.layers import LayerGroups

__all__ = [
    "l1_norm",
    "lines_alpha",
    "lines_alpha_from_norms",
    "lines_param_scales",
    "lines_scales",
    "sum_task_vectors",
]


def l1_norm(tensors: Iterable[torch.Tensor]) -> float:
    """‖v‖₁ = Σ_k Σ_j |v_k,j| over all tensors of a flattened vector, accumulated in float64
    (the authors flatten the whole state dict and take ``.abs().sum()``)."""
    total = 0.0
    for t in tensors:
        total += float(t.detach().abs().sum(dtype=torch.float64))
    return total


def sum_task_vectors(
    task_vectors: Iterable[Mapping[str, torch.Tensor]],
) -> tuple[dict[str, torch.Tensor], int]:
    """(Σ_t τ_t, T): the key-wise sum of the task vectors and their number. Each τ_t must have
    the keys (and shapes) of the first; the sum keeps the first one's dtypes. Takes any iterable,
    so that task vectors can be formed one at a time and never held together."""
    total: dict[str, torch.Tensor] | None = None
    count = 0
    for tv in task_vectors:
        if total is None:
            total = {k: v.detach().clone() for k, v in tv.items()}
        else:
            if set(tv) != set(total):
                diff = sorted(set(tv) ^ set(total))[:5]
                raise ValueError(f"task vector {count + 1} has other keys than the first: {diff}")
            for k, v in tv.items():
                if tuple(v.shape) != tuple(total[k].shape):
                    raise ValueError(
                        f"task vector {count + 1}: shape of {k!r} is {tuple(v.shape)}, the "
                        f"first's is {tuple(total[k].shape)}"
                    )
                total[k] += v.to(total[k].dtype)
        count += 1
    if total is None:
        raise ValueError("LiNeS needs at least one task vector (fine-tuned model); none given")
    return total, count


def lines_alpha_from_norms(sum_l1: float, merged_l1: float, num_tasks: int) -> float:
    """α = ‖Σ_t τ_t‖₁ / (T · ‖τ_MTV‖₁), from the two L1 norms and T (``wang-kee/LiNeS``,
    ``src/eval/eval.py``, ``evaluate``: ``(norm_summed_tvs / norm_mtv) * 1 / num_tasks``).

    For Task Arithmetic with coefficient 1 (τ_MTV = Σ_t τ_t) α = 1/T; for simple averaging
    (τ_MTV = Σ_t τ_t / T) α = 1. Undefined when τ_MTV = 0 (a ValueError)."""
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"LiNeS needs the number of tasks T ≥ 1, got {num_tasks!r}")
    for what, v in (("‖Σ_t τ_t‖₁", sum_l1), ("‖τ_MTV‖₁", merged_l1)):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"LiNeS: {what} = {v!r}; an L1 norm must be finite and ≥ 0")
    if merged_l1 == 0:
        raise ValueError(
            "LiNeS: the merged task vector τ_MTV = θ_merged − θ_0 is zero, so "
            "α = ‖Σ_t τ_t‖₁ / (T·‖τ_MTV‖₁) is undefined; the base merger changed nothing"
        )
    return sum_l1 / (num_tasks * merged_l1)


def lines_alpha(
    task_vectors: Sequence[Mapping[str, torch.Tensor]], merged_vector: Mapping[str, torch.Tensor]
) -> float:
    """α = ‖Σ_t τ_t‖₁ / (T · ‖τ_MTV‖₁) with τ_t = θ_t − θ_0 the T task vectors, τ_MTV the merged
    task vector (the merger's output minus θ_0, before any global coefficient), and ‖·‖₁ the L1
    norm over all entries of all tensors (``wang-kee/LiNeS``, ``src/eval/aggregation.py``,
    ``create_task_vector``, and ``src/eval/eval.py``, ``evaluate``)."""
    summed, count = sum_task_vectors(task_vectors)
    return lines_alpha_from_norms(l1_norm(summed.values()), l1_norm(merged_vector.values()), count)


def lines_scales(num_blocks: int, alpha: float, beta: float) -> list[float]:
    """λ_ℓ = α + β · ℓ/(L − 1) for the blocks ℓ = 0..L−1 (``wang-kee/LiNeS``,
    ``src/eval/eval.py``, ``LiNeS_scaling``): α at the first block, α + β at the last. L ≥ 2."""
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 2:
        raise ValueError(
            f"LiNeS needs at least 2 blocks (λ_ℓ divides by L − 1), got {num_blocks!r}"
        )
    for name, v in (("alpha", alpha), ("beta", beta)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"LiNeS: {name} = {v!r}; it must be a finite number")
    return [alpha + beta * (i / (num_blocks - 1)) for i in range(num_blocks)]


def lines_param_scales(
    names: Sequence[str], groups: LayerGroups, alpha: float, beta: float
) -> tuple[dict[str, float], list[float]]:
    """Per parameter name, the factor of its τ_MTV entries, and the per-block λ_ℓ.

    A parameter of block ℓ (``groups.members[ℓ]``, from :func:`.layers.group_layers`) gets
    λ_ℓ = α + β·ℓ/(L − 1); every parameter outside the blocks (embeddings, pre- and post-norms,
    heads) gets α, as in ``LiNeS_scaling``'s ``layer_scalings_dict.get(k, alpha)``. Apply with
    θ_k ← θ_0,k + s_k·(θ_merged,k − θ_0,k) (:func:`.veneer.apply_scales`)."""
    lambdas = lines_scales(groups.num_layers, alpha, beta)
    block_of = {n: i for i, members in enumerate(groups.members) for n in members}
    return {n: (lambdas[block_of[n]] if n in block_of else float(alpha)) for n in names}, lambdas
