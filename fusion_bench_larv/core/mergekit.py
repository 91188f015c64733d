"""LARV for mergekit users (docs/mergekit.md): mergekit 0.1.4's merged update of one tensor, and
the merge config whose per-layer ``lambda`` carries LARV's scales s_ℓ. Torch and plain values
only; reading models and writing YAML is :mod:`fusion_bench_larv.export.mergekit`.

What mergekit 0.1.4 does with a config (``merge_methods/generalized_task_arithmetic.py``,
``sparsify.py``, ``config.py``, ``plan.py``), for one tensor with base θ_0, task vectors
δ_t = θ_t − θ_0 and per-model weights w_t:

- ``task_arithmetic`` (``normalize: false``): u = Σ_t w_t δ_t;
- ``ties`` (``normalize: true``): δ̂_t = trim(δ_t) keeps the ⌊density·n⌋ entries of largest |δ_t|
  *of this tensor* (FusionBench's TIES trims over the whole model), σ = sign elected by the sum
  (σ = +1 where Σ_t w_t δ̂_t ≥ 0, else −1), u = Σ_t w_t δ̂_t [sign(w_t δ̂_t) = σ] /
  Σ_t w_t [sign(w_t δ̂_t) = σ] (a zero divisor read as 1);
- then θ = θ_0 + λ·u, with λ the ``lambda`` parameter read for that tensor.

A list of exactly L numbers for ``lambda`` gives layer i = 0..L−1 its own value (the planner reads
it at t = i/(L − 1) and interpolates linearly); tensors outside the layers (embeddings, the final
norm, the head) read it at t = 0, i.e. the first layer's value, unless a ``filter`` entry (a
substring of the tensor's name) listed before the list matches them. So λ_ℓ = λ·s_ℓ with filters
for the outside tensors gives θ_0 + s_ℓ·(λ u) = LARV's θ_0 + s_ℓ·Δθ of the base merge Δθ = λ u.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import LarvConfigError, LarvInputError

METHODS = ("task_arithmetic", "ties")
# mergekit's `normalize` default for each method (registry.py), written out in every config
NORMALIZE = {"task_arithmetic": False, "ties": True}


def magnitude_trim(delta: torch.Tensor, density: float, name: str = "") -> torch.Tensor:
    """mergekit's ``sparsify.magnitude`` without rescaling: δ with all but its k = ⌊density·n⌋
    entries of largest |δ| set to zero (n = δ.numel()); density ≥ 1 returns δ itself. Ties in |δ|
    are broken as ``torch.argsort`` breaks them, as mergekit does. k = 0 is refused (mergekit
    asserts k > 0): raise the density or keep that tensor out of the trim."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    if k <= 0:
        raise LarvInputError(
            f"TIES with density {density} keeps ⌊{density}·{delta.numel()}⌋ = 0 entries of tensor "
            f"{name!r}, which mergekit refuses (it trims every tensor on its own); raise the density"
        )
    mask = torch.zeros_like(delta)
    w = delta.abs().view(-1)
    if w.device.type == "cpu":
        w = w.float()
    mask.view(-1)[torch.argsort(w, descending=True)[:k]] = 1
    return delta * mask


def merged_update(
    method: str,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float = 1.0,
    name: str = "",
) -> torch.Tensor:
    """u of one tensor (module docstring) from its task vectors δ_t and weights w_t, computed with
    mergekit's own operations in the task vectors' dtype (u is mergekit's ``mixed_delta`` before
    ``lambda``). ``density`` is read by ``ties`` only."""
    if method not in METHODS:
        raise LarvConfigError(f"mergekit method {method!r} is not exported; use one of {METHODS}")
    if len(deltas) != len(weights) or not deltas:
        raise LarvInputError(f"{len(deltas)} task vectors for {len(weights)} weights")
    if method == "ties":
        deltas = [magnitude_trim(d, density, name) for d in deltas]
    stacked = torch.stack(list(deltas), dim=0)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    while w.dim() < stacked.dim():
        w = w.unsqueeze(-1)
    weighted = stacked * w
    if method == "task_arithmetic":
        return weighted.sum(dim=0)
    sign = weighted.sign()
    elected = (weighted.sum(dim=0) >= 0).to(weighted.dtype) * 2 - 1
    mask = (sign == elected).to(weighted.dtype)
    mixed = (weighted * mask).sum(dim=0)
    divisor = (w * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    return mixed / divisor


def layer_index_check(prefixes: Sequence[str]) -> None:
    """mergekit numbers a decoder's layers 0..L−1 in one stack (``model.layers.{i}.``): LARV's
    blocks must be those, in that order, for the i-th value of the list to reach block i + 1."""
    stacks = {p.rstrip(".").rpartition(".")[0] for p in prefixes}
    indices = [p.rstrip(".").rpartition(".")[2] for p in prefixes]
    if len(stacks) != 1 or indices != [str(i) for i in range(len(prefixes))]:
        raise LarvInputError(
            "mergekit's per-layer lists index one stack of layers 0..L−1, but LARV's blocks are "
            f"{list(prefixes)[:4]}{' …' if len(prefixes) > 4 else ''}: the export handles "
            "decoder-only models (one `….layers.{i}.` stack)"
        )


def _filter_for(name: str) -> str:
    """The module a parameter belongs to (``lm_head.weight`` → ``lm_head``)."""
    stem, _, last = name.rpartition(".")
    return stem if stem and last in ("weight", "bias") else name


def lambda_setting(
    prefixes: Sequence[str],
    members: Sequence[Sequence[str]],
    param_scale: Mapping[str, float],
    base_lambda: float = 1.0,
) -> list[dict]:
    """mergekit's ``lambda`` for LARV's per-parameter scales: one ``{filter, value}`` entry per
    module outside the blocks (its scale, e.g. ``model.embed_tokens`` → s_1, ``model.norm`` and
    ``lm_head`` → s_L under ``outside_blocks: nearest``), then ``{value: [λ·s_1, …, λ·s_L]}`` for
    the layers, λ = ``base_lambda`` (the base merge's own ``lambda``).

    ``prefixes`` and ``members``: LARV's blocks in depth order (their name prefixes and parameter
    names); ``param_scale``: every scaled parameter → its scale (``LarvResult.param_scale``), the
    one source of every value written. A block's parameters must share one scale. A filter is a
    substring of the names it must match: the module's name, checked to match no block parameter
    and only outside parameters of the same scale (else the parameter's full name)."""
    layer_index_check(prefixes)
    if len(members) != len(prefixes):
        raise LarvInputError(f"{len(prefixes)} block prefixes for {len(members)} member lists")
    block_scales = []
    for prefix, block in zip(prefixes, members, strict=True):
        scales = {param_scale[n] for n in block if n in param_scale}
        if len(scales) != 1:
            raise LarvInputError(
                f"block {prefix!r} holds parameters of {len(scales)} scales {sorted(scales)}; "
                "a mergekit layer takes one value (is a tensor of it tied to another block's?)"
            )
        block_scales.append(scales.pop())
    inside = {n for block in members for n in block}
    outside = {n: s for n, s in param_scale.items() if n not in inside}
    entries: dict[str, float] = {}
    for name, scale in outside.items():
        for candidate in (_filter_for(name), name):
            hits_block = any(candidate in n for n in inside)
            hits_other = any(candidate in n and s != scale for n, s in outside.items())
            if not hits_block and not hits_other:
                break
        else:
            raise LarvInputError(
                f"no mergekit filter selects {name!r} without other parameters of another scale: "
                "its name is part of their names"
            )
        entries.setdefault(candidate, scale)
    setting: list[dict] = [{"filter": f, "value": base_lambda * s} for f, s in entries.items()]
    setting.append({"value": [base_lambda * s for s in block_scales]})
    return setting


def merge_config(
    method: str,
    base_model: str,
    models: Sequence[str],
    weights: Sequence[float],
    lambda_value: list[dict],
    density: float | None = None,
    dtype: str = "float32",
    out_dtype: str | None = None,
) -> dict:
    """A mergekit merge configuration (the YAML's content as plain values): ``models`` with their
    ``weight`` (and ``density`` for ``ties``), ``base_model``, ``parameters`` holding ``lambda``
    (:func:`lambda_setting`) and the method's ``normalize`` written out, ``dtype`` (what mergekit
    computes in) and ``out_dtype`` (what it saves, when not ``dtype``)."""
    if method not in METHODS:
        raise LarvConfigError(f"mergekit method {method!r} is not exported; use one of {METHODS}")
    if len(models) != len(weights):
        raise LarvConfigError(f"{len(models)} models for {len(weights)} weights")
    entries = []
    for model, weight in zip(models, weights, strict=True):
        params: dict = {"weight": weight}
        if method == "ties":
            params["density"] = density
        entries.append({"model": model, "parameters": params})
    config = {
        "merge_method": method,
        "base_model": base_model,
        "models": entries,
        "parameters": {"normalize": NORMALIZE[method], "lambda": lambda_value},
        "dtype": dtype,
    }
    if out_dtype is not None and out_dtype != dtype:
        config["out_dtype"] = out_dtype
    return config
