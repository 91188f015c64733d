"""Per-block scales fitted on labelled data: the ceiling of per-block rescaling (docs/method.md,
"The ceiling of per-block rescaling"). LARV, the depth ramps and LiNeS each pick one scale per
block for the merged update; fitting those scales with labels says how far any such rule could go.

The merge is parametrised by the scales s (one per source u and group b):

    θ(s)_k = θ_0,k + Σ_u s_{u, b(k)} · Δ_{u,k}

where b(k) is parameter k's group: block ℓ − 1 for a parameter of block ℓ = 1..L, and L for
every parameter outside the blocks (:func:`group_of`). The sources are either the merged update
alone (Δ_1 = θ_merged − θ_0: one scale per block), or each task vector of a merge
θ_0 + λ Σ_t τ_t (Δ_t = λ τ_t: one scale per task vector and block, :func:`common_coefficient`).
s = 1 everywhere is the base merge itself.

:func:`fit_block_scales` starts at s = 1 and takes ``steps`` Adam steps on the caller's loss
ℓ(θ(s)), e.g. the cross-entropy of a batch of labelled validation examples per task, evaluated
through :func:`torch.func.functional_call` (:func:`call_with`). Plain tensors and callables; no
FusionBench.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import LarvInputError
from .layers import LayerGroups

__all__ = [
    "BlockFit",
    "call_with",
    "common_coefficient",
    "compose",
    "fit_block_scales",
    "group_of",
]

StateDict = Mapping[str, torch.Tensor]
#: the loss a fit minimises: θ(s) by parameter name and the step (0-based) -> a scalar tensor
Loss = Callable[[Mapping[str, torch.Tensor], int], torch.Tensor]


def group_of(groups: LayerGroups, names: Sequence[str]) -> dict[str, int]:
    """b(k) for each name k of ``names``: ℓ − 1 for a member of block ℓ = 1..L, L for a name
    outside the blocks (one group for all of them, wherever they sit)."""
    member = {n: i for i, block in enumerate(groups.members) for n in block}
    return {n: member.get(n, groups.num_layers) for n in names}


def compose(
    theta0: StateDict,
    updates: Sequence[StateDict],
    group: Mapping[str, int],
    scales: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """θ(s)_k = θ_0,k + Σ_u s[u, b(k)] · Δ_u,k for every name k of ``group``; differentiable in
    ``scales`` (shape: sources × groups). A source without an entry for k adds nothing to it."""
    out = {}
    for k, b in group.items():
        value = theta0[k]
        for u, delta in enumerate(updates):
            if k in delta:
                value = value + scales[u, b] * delta[k]
        out[k] = value
    return out


def call_with(module: nn.Module, params: Mapping[str, torch.Tensor], prefix: str = ""):
    """``module`` as a function of its inputs with the parameters ``params`` in place of its own
    (``prefix`` + name: e.g. ``backbone.`` when the module wraps the model the names are of)."""
    named = {prefix + k: v for k, v in params.items()}

    def forward(*args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(module, named, args, kwargs)

    return forward


def common_coefficient(
    theta0: StateDict, merged: StateDict, task_vectors: Sequence[StateDict], names: Sequence[str]
) -> tuple[float, float]:
    """(λ, r): the least-squares λ with θ_merged − θ_0 ≈ λ Σ_t τ_t over ``names``,

        λ = ⟨Δθ, Στ⟩ / ‖Στ‖²,    r = ‖Δθ − λ Στ‖ / ‖Δθ‖,

    in float64. r ≈ 0 (rounding) says the merge is θ_0 + λ Σ_t τ_t (Task Arithmetic, simple
    averaging), so that each task vector can carry its own scales; λ = 0, r = 1 when Στ = 0.
    """
    dot = sq_sum = sq_delta = 0.0
    for k in names:
        delta = merged[k].double() - theta0[k].double()
        total = sum(tv[k].double() for tv in task_vectors)
        dot += float((delta * total).sum())
        sq_sum += float(total.square().sum())
        sq_delta += float(delta.square().sum())
    lam = dot / sq_sum if sq_sum > 0 else 0.0
    # ‖Δ − λΣ‖² = ‖Δ‖² − 2λ⟨Δ, Σ⟩ + λ²‖Σ‖² = ‖Δ‖² − λ⟨Δ, Σ⟩ at the least-squares λ
    resid = max(sq_delta - lam * dot, 0.0)
    return lam, (math.sqrt(resid / sq_delta) if sq_delta > 0 else 0.0)


@dataclass
class BlockFit:
    """A fit's outcome: ``scales[u][b]`` (sources × groups), the loss at every step (before
    that step's update: ``curve[0]`` is the base merge's), and its time."""

    scales: list[list[float]]
    curve: list[float]
    seconds: float
    steps: int = field(init=False)

    def __post_init__(self) -> None:
        self.steps = len(self.curve)


def fit_block_scales(
    theta0: StateDict,
    updates: Sequence[StateDict],
    group: Mapping[str, int],
    num_groups: int,
    loss: Loss,
    steps: int,
    lr: float,
    on_step: Callable[[int, float], None] | None = None,
) -> BlockFit:
    """s* ≈ argmin_s ℓ(θ(s)) (:func:`compose`): ``steps`` steps of Adam (learning rate ``lr``)
    from s = 1 (the base merge), one call of ``loss(θ(s), step)`` per step. θ_0 and the updates
    are read only; every tensor must sit on the device ``loss`` computes on."""
    if steps < 0 or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"steps must be ≥ 0 and lr > 0, got steps={steps}, lr={lr}")
    if not updates:
        raise LarvInputError("a fit of per-block scales needs at least one update to scale")
    bad = sorted({b for b in group.values() if not 0 <= b < num_groups})
    if bad:
        raise ValueError(f"group indices {bad} are outside 0..{num_groups - 1}")
    start = time.perf_counter()
    dtype = next(iter(theta0.values())).dtype if theta0 else torch.float32
    dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    device = next(iter(updates[0].values())).device if updates[0] else None
    scales = torch.ones(len(updates), num_groups, dtype=dtype, device=device, requires_grad=True)
    opt = torch.optim.Adam([scales], lr=lr)
    theta0 = {k: theta0[k].detach() for k in group}
    updates = [{k: v.detach() for k, v in u.items()} for u in updates]
    curve = []
    for step in range(steps):
        opt.zero_grad()
        value = loss(compose(theta0, updates, group, scales), step)
        if not torch.isfinite(value):
            raise LarvInputError(f"the fit's loss is {float(value)} at step {step}")
        value.backward()
        opt.step()
        curve.append(float(value.detach()))
        if on_step is not None:
            on_step(step, curve[-1])
    return BlockFit(scales.detach().cpu().tolist(), curve, time.perf_counter() - start)
