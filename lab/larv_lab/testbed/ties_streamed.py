"""TIES-Merging as FusionBench computes it (``TiesMergingAlgorithm``), one tensor at a time.

FusionBench flattens the n task vectors into one (n, d) matrix and trims it with ``kthvalue``
along the rows, holding several copies of that matrix at once: on the decoder testbed (six
135 M-parameter models) the kernel killed it at 20 GB (docs/testbeds.md). The merge is the same
function of the task vectors τ_t = θ_t − θ_0, over the state dicts' keys in sorted order (a tied
tensor counted under each of its keys, as FusionBench's flattening counts it):

    κ_t = the (d − ⌊d·k⌋)-th smallest |τ_t,i| over all d entries of τ_t  (k = threshold / 100)
    τ̂_t = τ_t ⊙ [|τ_t| ≥ κ_t]
    γ   = sgn(Σ_t τ̂_t), each 0 replaced by sgn(Σ_i γ_i)          (the majority sign)
    τ_m = Σ_t τ̂_t ⊙ [sgn τ̂_t = γ]      (merge_func sum; mean divides each entry by its count
                                         of kept entries, at least 1; max: max_t |…| · γ)
    θ   = θ_0 + λ τ_m

Here κ_t needs one task vector flattened at a time and the rest runs tensor by tensor, so the
extra memory is about two flattened task vectors plus n copies of the largest tensor. The result
equals FusionBench's bit for bit (lab/tests/test_ties_streamed.py checks it against FusionBench's
own functions); keys in ``remove_keys`` keep θ_0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from fusion_bench.compat.modelpool import to_modelpool
from fusion_bench.method import TiesMergingAlgorithm
from torch import Tensor, nn


def _kept_fraction(threshold: float) -> float:
    """FusionBench's reading of ``threshold``: a percentage when above 1, else a fraction."""
    return threshold / 100 if threshold > 1 else threshold


def trim_thresholds(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    keys: Sequence[str],
    threshold: float,
) -> Tensor:
    """κ_t per task, shape (n,): the (d − ⌊d·k⌋)-th smallest |τ_t| over the keys' entries, one
    task at a time."""
    kappas = []
    for ft in finetuned:
        magnitude = torch.cat([(ft[k] - pretrained[k]).reshape(-1) for k in keys]).abs_()
        d = magnitude.numel()
        kappas.append(magnitude.kthvalue(d - int(d * _kept_fraction(threshold))).values)
        del magnitude
    return torch.stack(kappas)


def _trimmed(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    key: str,
    kappas: Tensor,
) -> Tensor:
    """τ̂_t for one key, stacked over the tasks: (n, numel)."""
    tv = torch.stack([(ft[key] - pretrained[key]).reshape(-1) for ft in finetuned])
    return tv * (tv.abs() >= kappas.unsqueeze(1))


def ties_merge(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    *,
    scaling_factor: float,
    threshold: float,
    merge_func: str = "sum",
    remove_keys: Sequence[str] = (),
) -> dict[str, Tensor]:
    """θ = θ_0 + λ τ_m (module docstring) for every key not in ``remove_keys``."""
    merge_func = merge_func.split("-")[-1]
    if merge_func not in ("sum", "mean", "max"):
        raise ValueError(f"Merge method {merge_func} is not defined.")
    keys = sorted(k for k in pretrained if k not in set(remove_keys))
    kappas = trim_thresholds(pretrained, finetuned, keys, threshold)
    # γ before its zeros are resolved, flattened in key order: FusionBench's majority sign is the
    # float32 sum over exactly this vector, so the same sum gives the same sign. τ̂ is computed
    # again per key below rather than kept: keeping it would hold every task vector at once.
    signs = torch.cat(
        [torch.sign(_trimmed(pretrained, finetuned, k, kappas).sum(dim=0)) for k in keys]
    )
    majority = torch.sign(signs.sum())
    merged = {}
    offset = 0
    for key in keys:
        trimmed = _trimmed(pretrained, finetuned, key, kappas)
        gamma = signs[offset : offset + trimmed.shape[1]].clone()
        offset += trimmed.shape[1]
        gamma[gamma == 0] = majority
        selected = trimmed * torch.where(gamma.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
        if merge_func == "sum":
            tau = selected.sum(dim=0)
        elif merge_func == "mean":
            tau = selected.sum(dim=0) / torch.clamp((selected != 0).sum(dim=0).float(), min=1)
        else:
            tau = selected.abs().max(dim=0)[0] * gamma
        merged[key] = (pretrained[key].reshape(-1) + scaling_factor * tau).reshape(
            pretrained[key].shape
        )
    return merged


class StreamedTiesMergingAlgorithm(TiesMergingAlgorithm):
    """FusionBench's ``TiesMergingAlgorithm`` with its merge computed by :func:`ties_merge`."""

    @torch.no_grad()
    def run(self, modelpool, **kwargs) -> nn.Module:
        modelpool = to_modelpool(modelpool)
        model = modelpool.load_model("_pretrained_")
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"StreamedTiesMergingAlgorithm needs an nn.Module pool, got {type(model)}"
            )
        pretrained = model.state_dict()
        finetuned = [modelpool.load_model(name).state_dict() for name in modelpool.model_names]
        merged = ties_merge(
            pretrained,
            finetuned,
            scaling_factor=self.scaling_factor,
            threshold=self.threshold,
            merge_func=self.config.get("merge_func", "sum"),
            remove_keys=self.config.get("remove_keys", []) or [],
        )
        model.load_state_dict(merged, strict=False)
        return model
