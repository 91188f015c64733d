"""Iso-CTS with its float64 retry (larv_lab.testbed.iso_cts_retry) against FusionBench's own
ISO_CTS_Merge: bit for bit where nothing fails; where float32's SVD fails (forced here), that key
is the same merge computed in float64."""

from __future__ import annotations

import torch
from fusion_bench.method import ISO_CTS_Merge
from fusion_bench.modelpool import BaseModelPool
from torch import nn

from larv_lab.testbed import iso_cts_retry
from larv_lab.testbed.iso_cts_retry import IsoCTSWithRetry

CONFIG = dict(scaling_factor=1.5, common_space_fraction=0.8, exclude_keys=None)


def tiny(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 24), nn.LayerNorm(24), nn.Linear(24, 12))


def pool() -> BaseModelPool:
    models = {"_pretrained_": tiny(0)}
    for t in range(3):
        ft = tiny(0)
        torch.manual_seed(10 + t)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.1 * torch.randn_like(p))
        models[f"task{t}"] = ft
    return BaseModelPool(models)


def test_equals_fusion_bench_where_nothing_fails():
    expected = ISO_CTS_Merge(**CONFIG).run(pool()).state_dict()
    algo = IsoCTSWithRetry(**CONFIG)
    ours = algo.run(pool()).state_dict()
    assert algo.retried_keys == []
    for key in expected:
        assert torch.equal(expected[key], ours[key]), key
    assert not torch.equal(ours["2.weight"], tiny(0).state_dict()["2.weight"])


def test_a_key_whose_float32_svd_fails_is_merged_in_float64(monkeypatch):
    expected = ISO_CTS_Merge(**CONFIG).run(pool()).state_dict()
    svd = torch.linalg.svd

    def failing_svd(a, *args, **kwargs):  # float32 SVDs of the 12 x 24 key fail, as on the decoder
        if a.dtype == torch.float32 and 12 in a.shape and 24 in a.shape:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return svd(a, *args, **kwargs)

    monkeypatch.setattr(iso_cts_retry.torch.linalg, "svd", failing_svd)
    algo = IsoCTSWithRetry(**CONFIG)
    ours = algo.run(pool()).state_dict()
    assert algo.retried_keys == ["2.weight"]
    assert ours["2.weight"].dtype == torch.float32
    torch.testing.assert_close(ours["2.weight"], expected["2.weight"], rtol=1e-5, atol=1e-6)
    for key in expected.keys() - {"2.weight"}:
        assert torch.equal(expected[key], ours[key]), key
