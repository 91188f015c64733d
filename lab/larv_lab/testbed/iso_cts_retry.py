"""Iso-CTS as FusionBench computes it (``iso_cts``), with a float64 retry of a key whose float32
SVD does not converge.

FusionBench's ``iso_cts`` merges each key on its own. Its last step orthogonalises the stacked
task-specific and common bases by an SVD of a matrix whose rows are nearly orthonormal, so that
every singular value is close to 1; LAPACK's float32 SVD can fail to converge on such a matrix
(on the decoder testbed: one 192 × 576 matrix of 212, docs/testbeds.md). Here a key whose float32
merge raises ``LinAlgError`` is merged again by the same function on its task vectors in float64,
and the result cast back; every other key is FusionBench's float32 result bit for bit
(lab/tests/test_iso_cts_retry.py). The retried keys are logged and kept in ``retried_keys``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from fusion_bench.method import ISO_CTS_Merge
from fusion_bench.method.isotropic_merging.iso_utils import check_parameterNamesMatch, iso_cts
from fusion_bench.utils.state_dict_arithmetic import state_dict_add, state_dict_mul, state_dict_sub
from torch import Tensor

log = logging.getLogger(__name__)


def iso_cts_with_retry(
    task_vectors: Sequence[Mapping[str, Tensor]],
    *,
    common_space_fraction: float,
    accelerator="cpu",
    exclude_keys: Sequence[str] | None = None,
) -> tuple[dict[str, Tensor], list[str]]:
    """FusionBench's ``iso_cts`` key by key: (the merged task vector, the keys merged in float64)."""
    kwargs = dict(common_space_fraction=common_space_fraction, accelerator=accelerator,
                  exclude_keys=list(exclude_keys or []))  # fmt: skip
    merged, retried = {}, []
    for key in task_vectors[0]:
        one = [{key: tv[key]} for tv in task_vectors]
        try:
            merged[key] = iso_cts(one, **kwargs)[key]
        except torch.linalg.LinAlgError as e:
            dtype = one[0][key].dtype
            log.warning("iso_cts: %s did not converge in %s (%s); merged in float64", key, dtype, e)
            merged[key] = iso_cts([{key: tv[key].double()} for tv in one], **kwargs)[key].to(dtype)
            retried.append(key)
    return merged, retried


class IsoCTSWithRetry(ISO_CTS_Merge):
    """FusionBench's ``ISO_CTS_Merge`` (``run`` as its own) with :func:`iso_cts_with_retry`."""

    retried_keys: tuple[str, ...] = ()  # set by run: the keys merged in float64

    def run(self, modelpool):
        with torch.no_grad():
            pretrained_model = modelpool.load_pretrained_model()
            pretrained = pretrained_model.state_dict()
            task_vectors = [
                state_dict_sub(modelpool.load_model(name).state_dict(), pretrained)
                for name in modelpool.model_names
            ]
            check_parameterNamesMatch(task_vectors)
            merged_tv, self.retried_keys = iso_cts_with_retry(
                task_vectors,
                common_space_fraction=self.common_space_fraction,
                accelerator=self.fabric.device,
                exclude_keys=self.exclude_keys,
            )
            pretrained_model.load_state_dict(
                state_dict_add(pretrained, state_dict_mul(merged_tv, self.scaling_factor))
            )
        return pretrained_model
