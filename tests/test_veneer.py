"""compute_larv_scales + apply_scales on hand-built state dicts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from oracles import make_pair, naive_layers

from fusion_bench_larv.core import veneer
from fusion_bench_larv.core.settings import LarvSettings
from fusion_bench_larv.core.veneer import (
    _LazyDelta,
    apply_scales,
    compute_larv_scales,
    gate_scores,
)


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


def test_median_normalized_gate_in_the_report_and_its_zero_median_fallback():
    theta0 = make_state()
    merged = perturb(theta0)
    res = compute_larv_scales(
        theta0, merged, LarvSettings(gate="continuous", w_normalize="median"), progress=False
    )
    d = res.to_dict()
    w = [rec["w"] for rec in d["layers"]]
    assert d["w_normalizer"] == res.w_normalizer == float(np.median(w))
    assert res.scales == gate_scores(
        [r.e for r in res.layers], [r.c for r in res.layers],
        LarvSettings(gate="continuous", w_normalize="median"),
    )[1]  # fmt: skip
    assert res.warnings == []
    assert compute_larv_scales(theta0, merged, LarvSettings(), progress=False).w_normalizer is None
    # an all-zero update: w ≡ 0, the median is 0 and the ratio undefined; the gate reads w as it
    # is (normalizer 1.0) and the report says so
    zero = compute_larv_scales(
        theta0, {k: v.clone() for k, v in theta0.items()},
        LarvSettings(gate="continuous", w_normalize="median"), progress=False,
    )  # fmt: skip
    assert zero.w_normalizer == 1.0
    assert zero.scales == pytest.approx([1 - 0.5 * np.tanh(3.0)] * 6)
    assert any("median of w" in m and "normalizer 1.0" in m for m in zero.warnings)


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


# -- independent oracles for the per-layer diagnostics and the composition --------------------
def _np_reff(a: np.ndarray) -> float:
    s = np.linalg.svd(a.reshape(a.shape[0], -1), compute_uv=False)
    p = s**2 / np.sum(a**2)
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def _np_conflict(x: np.ndarray, y: np.ndarray, eps: float = 1e-8) -> float:
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    den = np.linalg.norm(x) * np.linalg.norm(y) + eps
    if x.shape[0] == x.shape[1]:
        return float(np.linalg.norm(x @ y - y @ x) / den)
    return float(
        0.5 * np.linalg.norm(x @ y.T - y @ x.T) / den
        + 0.5 * np.linalg.norm(x.T @ y - y.T @ x) / den
    )


def test_layer_e_and_c_are_means_over_the_block_matrices():
    theta0 = make_state(num_layers=4)
    theta0["layers.2.conv.weight"] = torch.randn(4, 2, 3, 3)  # folded to (4, 18)
    merged = perturb(theta0)
    res = compute_larv_scales(theta0, merged, LarvSettings(), progress=False)
    for i, rec in enumerate(res.layers):
        mats = [k for k in theta0 if k.startswith(f"layers.{i}.") and theta0[k].ndim >= 2]
        assert rec.num_matrices == len(mats) == (3 if i == 2 else 2)
        es, cs = [], []
        for k in mats:
            x = theta0[k].double().numpy()
            d = merged[k].double().numpy() - x
            es.append(_np_reff(x) / (_np_reff(d) + 1e-8))
            cs.append(_np_conflict(x, d))
        assert rec.e == pytest.approx(float(np.mean(es)), rel=1e-4)
        assert rec.c == pytest.approx(float(np.mean(cs)), rel=1e-4)
        assert rec.num_params == sum(
            theta0[k].numel() for k in theta0 if k.startswith(f"layers.{i}.")
        )


def test_default_gate_from_the_documented_formulas():
    # docs/method.md, "Composite score and gates": w_ℓ = e^1 · (ℓ/L)^0.5 / (sp(z(c)) + 1),
    # tiered at the 1/3 and 2/3 empirical quantiles
    theta0 = make_state(num_layers=6)
    res = compute_larv_scales(theta0, perturb(theta0), LarvSettings(), progress=False)
    e = np.array([r.e for r in res.layers])
    c = np.array([r.c for r in res.layers])
    z = (c - c.mean()) / c.std()
    w = e * np.sqrt(np.arange(1, 7) / 6) / (np.log1p(np.exp(z)) + 1)
    assert [r.w for r in res.layers] == pytest.approx(w.tolist(), rel=1e-9)
    srt = np.sort(w)
    t1, t2 = srt[1], srt[3]  # ⌈6/3⌉ = 2nd and ⌈12/3⌉ = 4th smallest
    assert res.thresholds == pytest.approx((t1, t2))
    assert res.scales == [0.5 if x <= t1 else 1.0 if x <= t2 else 1.5 for x in w]


def test_apply_scales_composes_in_place_in_float64():
    theta0 = {"layers.0.w": torch.randn(3, 3, dtype=torch.float64)}
    merged = {"layers.0.w": theta0["layers.0.w"] + torch.randn(3, 3, dtype=torch.float64)}
    target = merged["layers.0.w"]
    want = theta0["layers.0.w"] + 0.3 * (target - theta0["layers.0.w"])
    apply_scales(theta0, merged, {"layers.0.w": 0.3})
    assert merged["layers.0.w"] is target  # updated in place (the model's own tensor)
    torch.testing.assert_close(target, want, rtol=0, atol=1e-15)
    apply_scales(theta0, merged, {"layers.0.w": 0.0})
    assert torch.equal(target, theta0["layers.0.w"])  # a freeze row: exactly θ_0


def test_freeze_schedule_restores_theta0_in_those_layers():
    theta0 = make_state(num_layers=6)
    merged = perturb(theta0)
    base = {k: v.clone() for k, v in merged.items()}
    s = LarvSettings(gate="schedule", schedule="custom", schedule_scales=[0.0, 1.0, 1.0])
    res = compute_larv_scales(theta0, merged, s, progress=False)
    assert res.scales == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    apply_scales(theta0, merged, res.param_scale)
    for k in merged:
        if k.startswith(("layers.0.", "layers.1.", "embed.")):  # embed follows layer 1 (nearest)
            assert torch.equal(merged[k], theta0[k]), k
        else:
            assert torch.equal(merged[k], base[k]), k


def test_neutral_policy_leaves_outside_parameters_bit_identical():
    theta0 = make_state()
    merged = perturb(theta0)
    base = {k: v.clone() for k, v in merged.items()}
    res = compute_larv_scales(
        theta0, merged, LarvSettings(outside_blocks="neutral"), progress=False
    )
    apply_scales(theta0, merged, res.param_scale)
    assert torch.equal(merged["embed.weight"], base["embed.weight"])
    assert torch.equal(merged["norm.weight"], base["norm.weight"])
    assert {o["name"]: o["scale"] for o in res.outside} == {"embed.weight": 1.0, "norm.weight": 1.0}


def test_outside_parameters_do_not_enter_the_statistics():
    # a huge, odd update of the embedding changes neither the layers' scores nor their scales
    theta0 = make_state()
    merged = perturb(theta0)
    a = compute_larv_scales(theta0, merged, LarvSettings(), progress=False)
    merged["embed.weight"] = merged["embed.weight"] + 100 * torch.randn(10, 8)
    b = compute_larv_scales(theta0, merged, LarvSettings(), progress=False)
    assert [r.w for r in a.layers] == [r.w for r in b.layers] and a.scales == b.scales
    out = {o["name"]: o for o in b.outside}
    assert out["embed.weight"]["position"] == "before" and out["embed.weight"]["layer"] == 1
    assert out["norm.weight"]["position"] == "after" and out["norm.weight"]["layer"] == 6


def test_a_layer_without_update_has_e_zero_and_the_lowest_tier():
    theta0 = make_state()
    merged = perturb(theta0)
    for k in merged:
        if k.startswith("layers.4."):
            merged[k] = theta0[k].clone()
    res = compute_larv_scales(theta0, merged, LarvSettings(), progress=False)
    rec = res.layers[4]
    assert rec.e == 0.0 and rec.c == 0.0 and rec.w == 0.0 and rec.s == 0.5
    assert all(r.e > 0 for i, r in enumerate(res.layers) if i != 4)
    assert res.warnings == []  # only an all-zero update warns


def test_report_is_json_ready():
    theta0 = make_state()
    d = compute_larv_scales(theta0, perturb(theta0), LarvSettings(), progress=False).to_dict()
    d2 = json.loads(json.dumps(d))
    assert d2["layer_pattern"] and d2["num_layers"] == 6 and len(d2["thresholds"]) == 2
    for rec in d2["layers"]:
        assert {"index", "prefix", "e", "c", "r", "w", "s"} <= set(rec)
    assert [rec["index"] for rec in d2["layers"]] == list(range(1, 7))
    assert isinstance(d2["diagnostics_seconds"], float) and d2["warnings"] == []


def test_user_layer_pattern_setting():
    theta0 = {f"stage{i}.w": torch.randn(4, 4) for i in range(3)}
    res = compute_larv_scales(
        theta0, perturb(theta0), LarvSettings(layer_pattern=r"^stage(?P<idx>\d+)\."), progress=False
    )
    assert [r.prefix for r in res.layers] == ["stage0.", "stage1.", "stage2."]


def test_extra_key_in_merged_raises():
    theta0 = make_state()
    merged = perturb(theta0)
    merged["layers.0.new.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="only in merged"):
        compute_larv_scales(theta0, merged, LarvSettings())


def test_low_precision_composition_matches_float32_rounding():
    theta0 = make_state(dtype=torch.bfloat16)
    merged = perturb(theta0)
    base = {k: v.clone() for k, v in merged.items()}
    scales = {k: 0.5 for k in theta0 if theta0[k].is_floating_point()}
    apply_scales(theta0, merged, scales)
    for k, s in scales.items():
        want = (theta0[k].float() + s * (base[k].float() - theta0[k].float())).to(torch.bfloat16)
        assert merged[k].dtype == torch.bfloat16 and torch.equal(merged[k], want)


# -- tied weights --------------------------------------------------------------------------------
def test_tied_weights_are_scaled_once():
    # one tensor under two names (a tied embedding and output head), on either side of the blocks:
    # it takes the first name's scale, once, instead of the product of both
    theta0 = make_state()
    merged = perturb(theta0)
    tied = merged["embed.weight"]
    merged["head.weight"] = tied  # same tensor object
    theta0["head.weight"] = theta0["embed.weight"].clone()
    before = tied.clone()
    res = compute_larv_scales(theta0, merged, LarvSettings(), progress=False)
    first = res.layers[0].s
    assert res.param_scale["embed.weight"] == res.param_scale["head.weight"] == first
    assert {o["name"]: o["scale"] for o in res.outside}["head.weight"] == first
    apply_scales(theta0, merged, res.param_scale)
    want = theta0["embed.weight"] + first * (before - theta0["embed.weight"])
    torch.testing.assert_close(merged["head.weight"], want, rtol=0, atol=1e-7)


def test_tied_t5_embeddings_get_one_scale():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2
    )
    torch.manual_seed(0)
    base, tuned = T5ForConditionalGeneration(cfg), T5ForConditionalGeneration(cfg)
    theta0 = {k: v.clone() for k, v in base.state_dict().items()}
    merged = tuned.state_dict()
    tied = (
        "shared.weight",
        "encoder.embed_tokens.weight",
        "decoder.embed_tokens.weight",
        "lm_head.weight",
    )
    assert len({merged[k].data_ptr() for k in tied}) == 1
    delta = merged["shared.weight"] - theta0["shared.weight"]
    res = compute_larv_scales(
        theta0, merged, LarvSettings(gate="schedule", schedule="linear"), progress=False
    )
    assert {res.param_scale[k] for k in tied} == {0.5}  # `shared.weight` comes first: layer 1
    apply_scales(theta0, merged, res.param_scale)
    torch.testing.assert_close(merged["lm_head.weight"], theta0["shared.weight"] + 0.5 * delta)


# -- one definition of a zero update -------------------------------------------------------------
def test_pipeline_and_rank_contrast_agree_on_zero_updates():
    # one matrix per layer (float64: updates near 1e-10·‖θ_0‖ are representable), with
    # ‖Δ‖ / ‖θ_0‖ on both sides of the 1e-10 threshold: the pipeline's e (and c) is 0 exactly where
    # rank_contrast's is and is_zero_update says so
    from fusion_bench_larv.core.diagnostics import is_zero_update, rank_contrast

    g = torch.Generator().manual_seed(4)
    ratios = [0.0, 0.5e-10, 0.9e-10, 1.1e-10, 3e-10, 1e-4]
    theta0, merged = {}, {}
    for i, ratio in enumerate(ratios):
        x = torch.randn(6, 4, generator=g, dtype=torch.float64)
        d = torch.randn(6, 4, generator=g, dtype=torch.float64)
        theta0[f"layers.{i}.w"] = x
        merged[f"layers.{i}.w"] = x + ratio * x.norm() / d.norm() * d
    res = compute_larv_scales(theta0, merged, LarvSettings(), progress=False)
    for i, (ratio, rec) in enumerate(zip(ratios, res.layers, strict=True)):
        k = f"layers.{i}.w"
        delta = merged[k] - theta0[k]
        zero = bool(is_zero_update((delta**2).sum(), (theta0[k] ** 2).sum()))
        assert zero == (ratio < 1e-10)
        assert (rec.e == 0.0) == zero == (rank_contrast(theta0[k], delta) == 0.0)
        assert (rec.c == 0.0) == zero
        if not zero:  # the pipeline's e is the single-matrix function's
            assert rec.e == pytest.approx(rank_contrast(theta0[k], delta), rel=1e-12)
    assert res.warnings == []

    # every update (biases too) under the threshold: the "zero everywhere" warning, by that rule
    tiny = {k: v + 0.5e-10 * v.norm() / v.numel() ** 0.5 for k, v in theta0.items()}
    tiny_theta0 = dict(theta0, **{"layers.0.b": torch.ones(4, dtype=torch.float64)})
    tiny["layers.0.b"] = tiny_theta0["layers.0.b"] + 0.5e-10
    res = compute_larv_scales(tiny_theta0, tiny, LarvSettings(), progress=False)
    assert all(r.e == 0.0 for r in res.layers)
    assert any("zero everywhere" in w for w in res.warnings)
    # ...but a bias over it is an update: no warning, although every matrix's e is 0
    tiny["layers.0.b"] = tiny_theta0["layers.0.b"] + 1e-6
    res = compute_larv_scales(tiny_theta0, tiny, LarvSettings(), progress=False)
    assert all(r.e == 0.0 for r in res.layers) and res.warnings == []


# -- streamed layer diagnostics against per-matrix naive formulas (tests/oracles.py) ------------
@pytest.mark.parametrize(
    "spectrum,tail", [("exact", "none"), ("randomized", "none"), ("randomized", "uniform")]
)
def test_layer_diagnostics_match_naive_formulas(spectrum, tail):
    theta0, merged = make_pair()
    s = LarvSettings(spectrum=spectrum, spectrum_tail=tail)
    e_ref, c_ref = naive_layers(theta0, merged, s)
    res = compute_larv_scales(theta0, merged, s, progress=False)
    e = [rec.e for rec in res.layers]
    c = [rec.c for rec in res.layers]
    np.testing.assert_allclose(e, e_ref, rtol=1e-4)
    np.testing.assert_allclose(c, c_ref, rtol=1e-4)
    # the tiered gate depends on the order of w only: the scales are the same, bit for bit
    _, s_ref, _ = gate_scores(e_ref, c_ref, s)
    assert res.scales == s_ref


def test_float64_models_are_diagnosed_in_float64():
    # Δ is formed in the model's compute dtype: a float64 model matches the float64 formulas to
    # round-off (a float32 Δ would leave ~1e-6 relative errors)
    theta0, merged = make_pair(seed=8)
    theta0 = {k: v.double() for k, v in theta0.items()}
    rng = np.random.default_rng(9)
    merged = {
        k: theta0[k] + 1e-3 * torch.tensor(rng.normal(size=v.shape)) for k, v in merged.items()
    }
    s = LarvSettings()
    e_ref, c_ref = naive_layers(theta0, merged, s, exact_delta=True)
    res = compute_larv_scales(theta0, merged, s, progress=False)
    np.testing.assert_allclose([r.e for r in res.layers], e_ref, rtol=1e-9)
    np.testing.assert_allclose([r.c for r in res.layers], c_ref, rtol=1e-9)


@pytest.mark.parametrize("spectrum", ["exact", "randomized"])
def test_stacking_does_not_change_the_result(spectrum):
    # one matrix per stack, the default budget, one stack per shape: the same e, c and scales
    theta0, merged = make_pair(num_layers=6, seed=3)
    s = LarvSettings(spectrum=spectrum)
    ref = compute_larv_scales(theta0, merged, s, progress=False, batch_bytes=1)
    for batch_bytes in (None, 2**40):
        res = compute_larv_scales(theta0, merged, s, progress=False, batch_bytes=batch_bytes)
        assert [r.e for r in res.layers] == pytest.approx([r.e for r in ref.layers], rel=1e-12)
        assert [r.c for r in res.layers] == pytest.approx([r.c for r in ref.layers], rel=1e-12)
        assert res.scales == ref.scales


def test_shape_batches_group_by_shape_and_dtype_within_the_budget(monkeypatch):
    # blocks 0..2 with an 8×8 (256 B in float32) and a 24×8 (768 B), and a float64 8×8 (counted as
    # float32: 256 B) after them; θ_0 is 3328 B in all, so the default budget is 3328 // 8 = 416 B
    g = torch.Generator().manual_seed(0)
    theta0 = {}
    for i in range(3):
        theta0[f"b.{i}.q"] = torch.randn(8, 8, generator=g)
        theta0[f"b.{i}.fc"] = torch.randn(24, 8, generator=g)
    theta0["b.2.q64"] = torch.randn(8, 8, generator=g, dtype=torch.float64)
    names = list(theta0)
    delta = _LazyDelta(theta0, theta0, names)
    q, fc = [f"b.{i}.q" for i in range(3)], [f"b.{i}.fc" for i in range(3)]
    one_each = [[q[0]], [fc[0]], [q[1]], [fc[1]], [q[2]], [fc[2]], ["b.2.q64"]]
    # on the CPU the default is one matrix per stack (CPU_BATCH_BYTES)
    assert veneer.shape_batches(names, theta0, delta) == one_each
    monkeypatch.setattr(veneer, "CPU_BATCH_BYTES", 600)
    assert veneer.shape_batches(names, theta0, delta)[0] == [q[0], q[1]]
    # elsewhere (a device other than the CPU; nothing is allocated) min(BATCH_BYTES, θ_0 / 8)
    assert veneer.shape_batches(names, theta0, delta, "meta") == one_each  # 2 × 256 B > 416 B
    # 600 B: two 8×8 per stack; a 24×8 is over the budget alone and still gets its own stack;
    # the float64 8×8 never joins the float32 ones; stacks in the order of their first matrix
    assert veneer.shape_batches(names, theta0, delta, batch_bytes=600) == [
        [q[0], q[1]], [fc[0]], [fc[1]], [q[2]], [fc[2]], ["b.2.q64"]
    ]  # fmt: skip
    assert veneer.shape_batches(names, theta0, delta, batch_bytes=2**40) == [q, fc, ["b.2.q64"]]
    # the default is also capped by BATCH_BYTES
    monkeypatch.setattr(veneer, "BATCH_BYTES", 2**40)
    monkeypatch.setattr(veneer, "BATCH_FRACTION", 1)
    assert veneer.shape_batches(names, theta0, delta, "meta") == [q, fc, ["b.2.q64"]]
    monkeypatch.setattr(veneer, "BATCH_BYTES", 600)
    assert veneer.shape_batches(names, theta0, delta, "meta")[0] == [q[0], q[1]]


def test_lazy_delta_is_the_update_and_holds_no_copy():
    theta0, merged = make_pair(num_layers=1)
    lazy = _LazyDelta(theta0, merged, list(theta0))
    k = "layers.0.fc1.weight"
    torch.testing.assert_close(lazy[k], merged[k] - theta0[k], rtol=0, atol=0)
    assert len(lazy) == len(theta0) and not vars(lazy).get("_cache")
