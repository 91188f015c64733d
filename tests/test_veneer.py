"""compute_larv_scales + apply_scales on hand-built state dicts."""

from __future__ import annotations

import pytest
import torch

from fusion_bench_larv.settings import LarvSettings
from fusion_bench_larv.veneer import apply_scales, compute_larv_scales


def make_state(num_layers=6, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {"embed.weight": torch.randn(10, 8, generator=g)}
    for i in range(num_layers):
        sd[f"layers.{i}.attn.weight"] = torch.randn(8, 8, generator=g)
        sd[f"layers.{i}.fc.weight"] = torch.randn(16, 8, generator=g)
        sd[f"layers.{i}.fc.bias"] = torch.randn(16, generator=g)
        sd[f"layers.{i}.norm.weight"] = torch.ones(8)
    sd["norm.weight"] = torch.ones(8)
    sd["position_ids"] = torch.arange(5)
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}


def perturb(sd, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        k: (
            v + (scale * torch.randn(v.shape, generator=g)).to(v.dtype)
            if v.is_floating_point()
            else v.clone()
        )
        for k, v in sd.items()
    }


def test_unit_scales_leave_tensors_bit_identical():
    theta0 = make_state()
    merged = perturb(theta0)
    before = {k: v.clone() for k, v in merged.items()}
    res = compute_larv_scales(
        theta0, merged, LarvSettings(gate="schedule", schedule="uniform"), progress=False
    )
    assert set(res.param_scale.values()) == {1.0}
    apply_scales(theta0, merged, res.param_scale)
    assert all(torch.equal(before[k], merged[k]) for k in merged)


@pytest.mark.parametrize("policy", ["nearest", "neutral"])
def test_every_parameter_gets_its_layer_scale(policy):
    theta0 = make_state()
    merged = perturb(theta0)
    base = {k: v.clone() for k, v in merged.items()}
    res = compute_larv_scales(theta0, merged, LarvSettings(outside_blocks=policy), progress=False)
    s = res.scales
    assert sorted(s) == [0.5, 0.5, 1.0, 1.0, 1.5, 1.5]
    apply_scales(theta0, merged, res.param_scale)
    for i in range(6):
        for p in ("attn.weight", "fc.weight", "fc.bias", "norm.weight"):
            k = f"layers.{i}.{p}"
            torch.testing.assert_close(
                merged[k], theta0[k] + s[i] * (base[k] - theta0[k]), rtol=0, atol=1e-7
            )
    emb, norm = (s[0], s[-1]) if policy == "nearest" else (1.0, 1.0)
    torch.testing.assert_close(
        merged["embed.weight"],
        theta0["embed.weight"] + emb * (base["embed.weight"] - theta0["embed.weight"]),
        rtol=0,
        atol=1e-7,
    )
    assert res.param_scale["norm.weight"] == norm
    assert torch.equal(merged["position_ids"], theta0["position_ids"])  # int buffers untouched
    assert "position_ids" not in res.param_scale


def test_report_fields():
    theta0 = make_state()
    res = compute_larv_scales(
        theta0, perturb(theta0), LarvSettings(gate="continuous"), progress=False
    )
    d = res.to_dict()
    assert d["num_layers"] == 6 and d["thresholds"] is None
    for i, rec in enumerate(d["layers"]):
        assert rec["index"] == i + 1 and rec["prefix"] == f"layers.{i}."
        assert rec["r"] == pytest.approx((i + 1) / 6)
        assert rec["num_matrices"] == 2  # attn and fc weights; bias and norm excluded
        assert 0.5 < rec["s"] < 1.5 and rec["e"] > 0 and rec["c"] > 0
    assert {o["name"] for o in d["outside_blocks"]} == {"embed.weight", "norm.weight"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_models_keep_their_dtype(dtype):
    theta0 = make_state(dtype=dtype)
    merged = perturb(theta0)
    res = compute_larv_scales(theta0, merged, LarvSettings(), progress=False)
    ref = compute_larv_scales(
        {k: v.float() if v.is_floating_point() else v for k, v in theta0.items()},
        {k: v.float() if v.is_floating_point() else v for k, v in merged.items()},
        LarvSettings(),
        progress=False,
    )
    assert res.scales == ref.scales
    apply_scales(theta0, merged, res.param_scale)
    assert all(merged[k].dtype == dtype for k in merged if k != "position_ids")


def test_zero_update_gives_e_zero_and_a_warning():
    theta0 = make_state()
    res = compute_larv_scales(
        theta0, {k: v.clone() for k, v in theta0.items()}, LarvSettings(), progress=False
    )
    assert all(rec.e == 0.0 and rec.c == 0.0 for rec in res.layers)
    assert any("zero everywhere" in w for w in res.warnings)


def test_key_and_shape_mismatch_raise():
    theta0 = make_state()
    merged = perturb(theta0)
    merged.pop("layers.0.fc.bias")
    with pytest.raises(ValueError, match="different parameters"):
        compute_larv_scales(theta0, merged, LarvSettings())
    merged = perturb(theta0)
    merged["layers.0.fc.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        compute_larv_scales(theta0, merged, LarvSettings())


def test_randomized_spectrum_is_deterministic():
    theta0 = make_state()
    merged = perturb(theta0)
    s = LarvSettings(spectrum="randomized", rank=2, seed=3)
    a = compute_larv_scales(theta0, merged, s, progress=False).to_dict()
    b = compute_larv_scales(theta0, merged, s, progress=False).to_dict()
    a.pop("diagnostics_seconds"), b.pop("diagnostics_seconds")
    assert a == b
