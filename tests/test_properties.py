"""Property-based tests (hypothesis) over random shapes, scales and seeds for the
maths (invariances, bounds, tier counts), and a randomized test over configurations and inputs that
must end in either a valid merge or one of the documented errors, with the output directory as it
was."""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from fusion_bench import BaseAlgorithm, BaseModelPool
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from fusion_bench_larv import LARVAlgorithm, LarvConfigError, LarvInputError, LarvSettings
from fusion_bench_larv.core.diagnostics import commutator_conflict, effective_rank, rank_contrast
from fusion_bench_larv.core.gates import (
    TIER_LEVELS,
    composite_score,
    continuous_gate,
    standardize,
    tiered_gate,
)
from fusion_bench_larv.core.layers import group_layers
from fusion_bench_larv.core.registry import depth_schedule
from fusion_bench_larv.core.veneer import apply_scales, compute_larv_scales

FAST = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
SQRT2 = math.sqrt(2.0)

dims = st.integers(min_value=2, max_value=9)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
positive = st.floats(min_value=1e-3, max_value=1e3)


def randn(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def perm(n, seed):
    return torch.eye(n, dtype=torch.float64)[
        torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    ]


# -- diagnostics -------------------------------------------------------------------------------------
@FAST
@given(m=dims, n=dims, seed=seeds, k=positive)
def test_effective_rank_bounds_and_invariances(m, n, seed, k):
    a = randn((m, n), seed)
    r = effective_rank(a)
    assert 1.0 - 1e-9 <= r <= min(m, n) + 1e-9
    assert effective_rank(k * a) == pytest.approx(r, rel=1e-9)  # scale invariant
    assert effective_rank(a.T) == pytest.approx(r, rel=1e-9)
    assert effective_rank(perm(m, seed) @ a @ perm(n, seed + 1)) == pytest.approx(r, rel=1e-9)
    u = randn((m, 1), seed + 2) @ randn((1, n), seed + 3)  # rank one: exactly one direction
    assert effective_rank(u) == pytest.approx(1.0, abs=1e-6)


@FAST
@given(m=dims, n=dims, seed=seeds, k=positive, k0=positive)
def test_rank_contrast_is_scale_free_and_zero_without_update(m, n, seed, k, k0):
    t0, d = randn((m, n), seed), randn((m, n), seed + 1)
    e = rank_contrast(t0, d, eps=0.0)
    assert e > 0 and e == pytest.approx(rank_contrast(k0 * t0, k * d, eps=0.0), rel=1e-9)
    assert e == pytest.approx(effective_rank(t0) / effective_rank(d), rel=1e-12)
    assert rank_contrast(t0, torch.zeros(m, n, dtype=torch.float64)) == 0.0


@FAST
@given(m=dims, n=dims, seed=seeds, k=positive, k0=positive, same=st.booleans())
def test_conflict_bounds_symmetry_and_invariances(m, n, seed, k, k0, same):
    n = m if same else n
    x, y = randn((m, n), seed), randn((m, n), seed + 1)
    c = commutator_conflict(x, y, eps=0.0)
    # ‖XY − YX‖ ≤ √2‖X‖‖Y‖ (Böttcher–Wenzel) for square; for the Gram commutators
    # ‖XYᵀ − YXᵀ‖ ≤ Σ_j ‖x_j y_jᵀ − y_j x_jᵀ‖ ≤ √2 Σ_j ‖x_j‖‖y_j‖ ≤ √2‖X‖‖Y‖ (columns x_j, y_j)
    assert 0.0 <= c <= SQRT2 + 1e-9
    # the rectangular norms come from Gram traces (a difference of sums): absolute error ~1e-8
    tol = {"rel": 1e-7, "abs": 1e-6}
    assert commutator_conflict(y, x, eps=0.0) == pytest.approx(c, **tol)
    assert commutator_conflict(k0 * x, k * y, eps=0.0) == pytest.approx(c, **tol)
    assert commutator_conflict(x, -2.5 * x, eps=0.0) == pytest.approx(0.0, **tol)
    p = perm(m, seed + 2)
    q = p.T if m == n else perm(n, seed + 3)  # square: a similarity; rectangular: any two
    assert commutator_conflict(p @ x @ q, p @ y @ q, eps=0.0) == pytest.approx(c, **tol)


# -- gates -------------------------------------------------------------------------------------------
scores = st.lists(st.floats(min_value=0.0, max_value=50.0), min_size=1, max_size=40)


@FAST
@given(w=st.lists(st.floats(min_value=0.0, max_value=50.0), min_size=1, max_size=40, unique=True),
       alpha=st.floats(0.05, 0.45), beta=st.floats(0.55, 0.95))  # fmt: skip
def test_tiered_gate_tier_counts_and_monotonicity(w, alpha, beta):
    levels = (0.5, 1.0, 1.5)
    s, (t1, t2) = tiered_gate(w, alpha, beta, levels)
    n = len(w)
    k1, k2 = max(1, math.ceil(alpha * n - 1e-9)), max(1, math.ceil(beta * n - 1e-9))
    # distinct scores: exactly the k1 smallest get the low level, up to the k2-th the middle one
    assert s.count(0.5) == k1 and s.count(1.0) == k2 - k1 and s.count(1.5) == n - k2
    by_w = [si for _, si in sorted(zip(w, s, strict=True))]
    assert by_w == sorted(by_w) and t1 <= t2


@FAST
@given(w=scores, gamma=positive)
def test_continuous_gate_bounds_and_monotonicity(w, gamma):
    s = continuous_gate(w, gamma)
    assert all(0.5 <= x <= 1.5 for x in s)
    by_w = [si for _, si in sorted(zip(w, s, strict=True))]
    assert by_w == sorted(by_w)
    assert continuous_gate([1.0], gamma) == [1.0]


@FAST
@given(e=st.lists(st.floats(0.0, 20.0), min_size=1, max_size=30), seed=seeds,
       eta=st.floats(0.0, 3.0), rho=st.floats(0.0, 3.0), zeta=st.floats(0.0, 3.0))  # fmt: skip
def test_composite_score_bounds_and_switches(e, seed, eta, rho, zeta):
    c = randn((len(e),), seed).abs().tolist()
    w = composite_score(e, c, eta, rho, zeta)
    assert all(x >= 0 and math.isfinite(x) for x in w)
    assert composite_score(e, c, eta, rho, zeta, False, False, False) == [1.0] * len(e)
    # only e on: w = e^η, so w is monotone in e
    only_e = composite_score(e, c, eta, rho, zeta, True, False, False)
    assert only_e == pytest.approx([x**eta for x in e])
    # the conflict penalty (sp(z) + 1)^ζ is ≥ 1 for every z (sp > 0): it never raises a score
    no_c = composite_score(e, c, eta, rho, zeta, True, True, False)
    assert all(a <= b + 1e-12 for a, b in zip(w, no_c, strict=True))
    z = standardize(c)
    if any(abs(v) > 0 for v in z):
        assert sum(z) == pytest.approx(0.0, abs=1e-9)
        assert sum(v * v for v in z) / len(z) == pytest.approx(1.0, rel=1e-9)


@FAST
@given(num_layers=st.integers(1, 48), name=st.sampled_from(sorted(TIER_LEVELS) + ["custom"]))
def test_depth_schedule_tier_counts(num_layers, name):
    levels = TIER_LEVELS.get(name, (0.5, 1.0, 1.5))
    s = depth_schedule(name, num_layers)
    assert len(s) == num_layers and s == sorted(s) and set(s) <= set(levels)
    k = len(levels)
    for level in levels:  # proportional tiers: ⌊L/K⌋ or ⌈L/K⌉ layers each
        assert s.count(level) in (num_layers // k, -(-num_layers // k))
    if 2 * num_layers > k:
        assert s[0] == levels[0] and s[-1] == levels[-1]


@FAST
@given(num_layers=st.integers(2, 48), a=st.floats(-2, 2), b=st.floats(-2, 2))
def test_linear_and_lines_schedule_endpoints(num_layers, a, b):
    lin = depth_schedule("linear", num_layers)
    assert lin[0] == 0.5 and lin[-1] == pytest.approx(1.5)
    lines = depth_schedule("lines", num_layers, (a, b))
    assert lines[0] == a and lines[-1] == pytest.approx(a + b)


# -- composition and grouping ------------------------------------------------------------------------
@FAST
@given(m=dims, n=dims, seed=seeds, s=st.floats(0.0, 3.0),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))  # fmt: skip
def test_apply_scales_is_theta0_plus_scaled_update(m, n, seed, s, dtype):
    t0 = randn((m, n), seed).to(dtype)
    merged = {"w": (t0.double() + randn((m, n), seed + 1)).to(dtype)}
    base = merged["w"].clone()
    apply_scales({"w": t0}, merged, {"w": s})
    assert merged["w"].dtype == dtype
    if s == 1.0:
        want = base
    elif dtype == torch.bfloat16:  # combined in float32, rounded once
        want = (t0.float() + s * (base.float() - t0.float())).to(dtype)
    else:
        want = t0 + s * (base - t0)
    assert torch.equal(merged["w"], want)
    merged = {"w": base.clone()}
    apply_scales({"w": t0}, merged, {"w": 1.0})
    assert torch.equal(merged["w"], base)  # unit scale: bit-identical
    apply_scales({"w": t0}, merged, {"w": 0.0})
    assert torch.equal(merged["w"], t0)  # zero: exactly θ_0


@FAST
@given(
    num_layers=st.integers(1, 30),
    stack=st.sampled_from(["layers", "blocks", "h", "encoder.layers"]),
)
def test_group_layers_finds_every_block_in_depth_order(num_layers, stack):
    names = ["embed.weight"]
    for i in range(num_layers):
        names += [f"{stack}.{i}.attn.weight", f"{stack}.{i}.mlp.bias"]
    names.append("norm.weight")
    g = group_layers(names)
    assert g.num_layers == num_layers
    assert g.prefixes == [f"{stack}.{i}." for i in range(num_layers)]
    assert g.outside == {"embed.weight": 0, "norm.weight": num_layers - 1}


def _model_state(num_layers, width, seed):
    sd = {"embed.weight": randn((width, width), seed, torch.float32)}
    for i in range(num_layers):
        sd[f"layers.{i}.a.weight"] = randn((width, width), seed + 10 * i + 1, torch.float32)
        sd[f"layers.{i}.b.weight"] = randn((2 * width, width), seed + 10 * i + 2, torch.float32)
        sd[f"layers.{i}.b.bias"] = randn((2 * width,), seed + 10 * i + 3, torch.float32)
    return sd


@FAST
@given(num_layers=st.integers(2, 9), width=st.integers(2, 7), seed=seeds, k=st.floats(0.01, 100),
       spectrum=st.sampled_from(["exact", "randomized"]))  # fmt: skip
def test_scales_depend_on_the_direction_of_the_update_not_its_size(num_layers, width, seed, k,
                                                                   spectrum):  # fmt: skip
    theta0 = _model_state(num_layers, width, seed)
    update = {n: 0.1 * randn(t.shape, seed + 7, torch.float32) for n, t in theta0.items()}
    s = LarvSettings(gate="continuous", spectrum=spectrum, rank=1, seed=seed % 1000, eps=1e-30)
    a = compute_larv_scales(theta0, {n: theta0[n] + update[n] for n in theta0}, s, progress=False)
    b = compute_larv_scales(theta0, {n: theta0[n] + k * update[n] for n in theta0}, s,
                            progress=False)  # fmt: skip
    assert len(a.layers) == num_layers
    # float32 round-off of θ_0 + k·Δ − θ_0 is the only difference
    assert [r.e for r in b.layers] == pytest.approx([r.e for r in a.layers], rel=2e-2)
    assert [r.c for r in b.layers] == pytest.approx([r.c for r in a.layers], rel=2e-2, abs=1e-5)
    tiered = compute_larv_scales(theta0, {n: theta0[n] + update[n] for n in theta0},
                                 LarvSettings(spectrum=spectrum, rank=1), progress=False)  # fmt: skip
    n = num_layers
    k1, k2 = math.ceil(n / 3 - 1e-9), math.ceil(2 * n / 3 - 1e-9)
    if len({r.w for r in tiered.layers}) == n:  # distinct scores: exact tier counts
        assert tiered.scales.count(0.5) == k1 and tiered.scales.count(1.5) == n - k2


# -- randomized configurations and inputs: a valid merge or a documented error -------------------------
class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.proj = nn.Linear(width, width, bias=False)


class Tiny(nn.Module):
    def __init__(self, num_layers=4, width=5):
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)


class Average(BaseAlgorithm):
    """θ_0 + mean task vector on fresh copies: never modifies what it loads."""

    def run(self, modelpool):
        pre = modelpool.load_model("_pretrained_")
        out = copy.deepcopy(pre)
        sds = [modelpool.load_model(n).state_dict() for n in modelpool.model_names]
        with torch.no_grad():
            for k, v in out.state_dict().items():
                v.add_(sum(sd[k] - pre.state_dict()[k] for sd in sds) / len(sds))
        return out


BASES = {
    "ta": {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3},
    "average": {"_target_": f"{__name__}.Average"},
}


def _pair(valid, invalid):
    """(value, is_valid), a valid value about four times as often as an invalid one (so that
    most drawn configurations get to run)."""
    weight = max(1, 4 * len(invalid) // max(1, len(valid)))
    return st.sampled_from([(v, True) for v in valid] * weight + [(v, False) for v in invalid])


KEY_VALUES = {
    "gate": _pair(["tiered", "continuous"], ["Tiered", "sigmoid", 3, None]),
    "gamma": _pair([0.5, 3.0, 10], [0, -1.0, float("nan"), "3"]),
    "eta": _pair([0.0, 1.0, 2.5], [-0.5, float("inf")]),
    "rho": _pair([0.0, 0.5], [-1]),
    "zeta": _pair([0, 1.0], [-2.0, True]),
    "levels": _pair(
        [[0.5, 1.0, 1.5], [0, 1, 2], (0.2, 0.2, 0.2)],
        [[0.5, 1.5], [0.5, -1, 1.5], "0.5,1,1.5", [1, None, 2]],
    ),  # fmt: skip
    "use_info": _pair([True, False], ["yes", 1]),
    "use_depth_prior": _pair([True, False], [None]),
    "use_conflict": _pair([True, False], [0]),
    "placement": _pair(["merged", "task_vectors"], ["both", ""]),
    "spectrum": _pair(["exact", "randomized"], ["lanczos"]),
    "rank": _pair([1, 2, 5], [0, -1, 1.5, True]),
    "oversample": _pair([0, 3, 10], [-1, 2.5]),
    "seed": _pair([0, 7, -3], ["0", 1.5]),
    "outside_blocks": _pair(["nearest", "neutral"], ["drop"]),
    "layer_pattern": _pair(
        [None, r"^layers\.(?P<idx>\d+)\.", r"^layers\.(\d+)\."],
        [r"layers\.(\d+", r"layers\.\d+\.", "", 5],
    ),  # fmt: skip
    "eps": _pair([1e-8, 1e-3], [0, -1e-8]),
    "report_name": _pair(["larv_layers.json", "r.json"], ["a/b.json", "", ".."]),
    "gama": _pair([], [3.0]),  # typos are never valid
}
_GOOD_SCHEDULES = [
    ("uniform", None), ("uniform", [1.0]), ("uniform", [0.0]), ("uniform", [0.7]),
    ("linear", None), ("tier2", None), ("tier3", None), ("tier6", None), ("tier12", None),
    ("custom", None), ("custom", [0, 1, 1]), ("custom", [0.5, 1.0, 1.5]),
    ("lines", None), ("lines", [0.5, 1.0]), ("lines", [-1, 3]),
    ("tier3", [0.1, 0.2, 0.3]),
]  # fmt: skip
_BAD_SCHEDULES = [
    ("custom", [1, 2]), ("uniform", [1, 2]), ("lines", [1]), ("linear", [1.0]), ("tier3", [1, 2]),
    ("tier12", [1.0]), ("custom", [0, -1, 1]), ("nope", None), ("uniform", "1"),
]  # fmt: skip
SCHEDULES = _pair(_GOOD_SCHEDULES, _BAD_SCHEDULES)
VARIANTS = ["good", "good", "good", "nan_pretrained", "inf_finetuned", "one_block",
            "no_pretrained", "pattern_mismatch"]  # fmt: skip


@st.composite
def scenario(draw):
    others = sorted(set(KEY_VALUES) - {"gate", "placement"})
    keys = ["gate", "placement"] + draw(st.lists(st.sampled_from(others), max_size=3, unique=True))
    cfg, invalid = {}, []
    for k in keys:
        value, ok = draw(KEY_VALUES[k])
        cfg[k] = value
        if not ok:
            invalid.append(k)
    (alpha, beta), ok = draw(_pair([(1 / 3, 2 / 3), (0.1, 0.9), (0.25, 0.5)],
                                   [(0.5, 0.5), (0.7, 0.3), (0.0, 0.5), (0.2, 1.0)]))  # fmt: skip
    if draw(st.booleans()):
        cfg["alpha"], cfg["beta"] = alpha, beta
        assert ok == (0 < alpha < beta < 1)
        if not ok:
            invalid += ["alpha", "beta"]
    if draw(st.booleans()):
        (sched, scales), ok = draw(SCHEDULES)
        cfg.update(gate="schedule", schedule=sched, schedule_scales=scales)
        if not ok:
            invalid += ["schedule", "schedule_scales"]
        elif "gate" in invalid:
            invalid.remove("gate")  # overwritten with a valid gate
    return cfg, invalid, draw(st.sampled_from(VARIANTS)), draw(st.sampled_from(sorted(BASES)))


_COUNTER = itertools.count()


def _snapshot(d: Path):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _models(variant, seed=0):
    torch.manual_seed(seed)
    n = 1 if variant == "one_block" else 4
    pre = Tiny(n)
    tuned = {}
    for i in range(2):
        m = copy.deepcopy(pre)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * randn(p.shape, seed + i, torch.float32))
        tuned[f"t{i}"] = m
    with torch.no_grad():
        if variant == "nan_pretrained":
            pre.layers[0].fc.weight[0, 0] = float("nan")
        if variant == "inf_finetuned":
            tuned["t1"].layers[-1].proj.weight[1, 1] = float("inf")
    pool = {"_pretrained_": pre, **tuned}
    if variant == "no_pretrained":
        pool.pop("_pretrained_")
    return pool


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(case=scenario())
def test_random_configurations_end_in_a_valid_merge_or_a_documented_error(tmp_path, case):
    cfg, invalid, variant, base_name = case
    if variant == "pattern_mismatch":
        if "layer_pattern" in invalid:
            variant = "good"
        else:
            cfg["layer_pattern"] = r"^blocks\.(?P<idx>\d+)\."
    out = tmp_path / f"out{next(_COUNTER)}"
    out.mkdir()
    (out / "larv_layers.json").write_text('{"old": true}')
    (out / "r.json").write_text('{"old": true}')
    before = _snapshot(out)
    pool = _models(variant)
    callers = {k: {n: v.clone() for n, v in m.state_dict().items()} for k, m in pool.items()}

    try:
        alg = LARVAlgorithm(base_method=BASES[base_name], report_dir=str(out), **cfg)
    except LarvConfigError as err:
        assert invalid, f"a valid config was rejected: {cfg} -> {err}"
        assert any(f"`{k}`" in str(err) for k in invalid), (str(err), invalid)
        event("LarvConfigError")
        assert _snapshot(out) == before
        return
    assert not invalid, f"invalid keys {invalid} were accepted: {cfg}"

    try:
        merged = alg.run(pool)
    except LarvInputError as err:
        assert variant != "good", f"a good model was refused: {cfg} -> {err}"
        event(f"{type(err).__name__} ({variant})")
        assert _snapshot(out) == before
        # every input problem here is found before the base merger runs: callers untouched
        for k, m in pool.items():
            for n, v in m.state_dict().items():
                assert torch.equal(v, callers[k][n]) or not torch.isfinite(v).all(), (k, n)
        return
    assert variant == "good", f"bad input {variant} was merged: {cfg}"
    event(f"merged ({alg.settings.gate}, {alg.settings.placement})")

    report_name = cfg.get("report_name", "larv_layers.json")
    report = json.loads((out / report_name).read_text())
    assert report["settings"] == alg.settings.to_dict()
    assert report["num_layers"] == 4
    assert all(torch.isfinite(v).all() for v in merged.state_dict().values())
    if alg.settings.placement == "merged":
        # exactly θ_0 + s·(θ_base − θ_0) with the reported scales
        base = BaseModelPool({k: copy.deepcopy(_models("good")[k]) for k in pool})
        if base_name == "ta":
            from fusion_bench.method import TaskArithmeticAlgorithm

            ref = TaskArithmeticAlgorithm(scaling_factor=0.3).run(base).state_dict()
        else:
            ref = Average().run(base).state_dict()
        theta0 = callers["_pretrained_"]
        by_layer = {rec["prefix"]: rec["s"] for rec in report["layers"]}
        for k, s in alg.last_result.param_scale.items():
            prefix = next((p for p in by_layer if k.startswith(p)), None)
            if prefix is not None:
                assert s == by_layer[prefix]
            want = theta0[k] + s * (ref[k] - theta0[k])
            torch.testing.assert_close(merged.state_dict()[k], want, rtol=0, atol=1e-6)
