"""`diagnostics: per_task` (docs/method.md, "Per-task diagnostics"): every task vector gets its own
scales from its own diagnostics, and the base merger runs once on θ_0 + s_ℓ,t·τ_t. Checked against
FusionBench's own mergers, against Task Arithmetic written out here, and against
`compute_larv_scales` run on one task alone."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from fusion_bench import BaseModelPool
from fusion_bench.method import TaskArithmeticAlgorithm, TiesMergingAlgorithm
from torch import nn

from fusion_bench_larv import LARVAlgorithm, LarvConfigError, LarvInputError, LarvSettings
from fusion_bench_larv.adapter.pool_view import PoolView
from fusion_bench_larv.core.veneer import compute_larv_scales

TA = {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3}
TIES = {
    "_target_": "fusion_bench.method.TiesMergingAlgorithm",
    "scaling_factor": 0.3,
    "threshold": 20,
    "remove_keys": [],
    "merge_func": "sum",
}
PER_TASK = {"placement": "task_vectors", "diagnostics": "per_task"}
UNIT = {"gate": "schedule", "schedule": "uniform", "schedule_scales": [1.0]}
NUM_LAYERS = 4


class Tiny(nn.Module):
    """An embedding, four blocks `layers.{i}` (a square and a rectangular matrix, a bias) and a
    head: the generic layer pattern finds L = 4 blocks."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.embed = nn.Linear(d, d)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"q": nn.Linear(d, d), "fc": nn.Linear(d, 2 * d)})
            for _ in range(NUM_LAYERS)
        )
        self.head = nn.Linear(2 * d, 3)


def _finetune(pretrained: nn.Module, blocks: set[int] | None, seed: int) -> nn.Module:
    """A copy whose update is a rank-2 matrix plus noise in every matrix of ``blocks`` (all
    parameters when None) and exactly zero elsewhere."""
    model = copy.deepcopy(pretrained)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if blocks is not None and not any(name.startswith(f"layers.{i}.") for i in blocks):
                continue
            if p.ndim == 2:
                m, n = p.shape
                low = torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g)
                p.add_(0.05 * low + 0.01 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def disjoint():
    """θ_0 and two tasks: `a` moves blocks 1–2 only, `b` blocks 3–4 only (ℓ counted from 1)."""
    torch.manual_seed(0)
    pretrained = Tiny().eval()
    return pretrained, {
        "a": _finetune(pretrained, {0, 1}, 1),
        "b": _finetune(pretrained, {2, 3}, 2),
    }


@pytest.fixture(scope="module")
def dense():
    """θ_0 and three tasks that move every parameter."""
    torch.manual_seed(1)
    pretrained = Tiny().eval()
    return pretrained, {t: _finetune(pretrained, None, 10 + i) for i, t in enumerate("abc")}


def pool(models) -> BaseModelPool:
    pretrained, tasks = models
    return BaseModelPool(
        {
            "_pretrained_": copy.deepcopy(pretrained),
            **{t: copy.deepcopy(m) for t, m in tasks.items()},
        }
    )


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def block_of(name: str) -> int | None:
    """0-based block of a parameter; None outside the blocks."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "layers" else None


# -- unit scales: the base merger bit for bit ----------------------------------------------------
@pytest.mark.parametrize(
    ("base", "direct"),
    [
        (TA, lambda: TaskArithmeticAlgorithm(scaling_factor=0.3)),
        (TIES, lambda: TiesMergingAlgorithm(0.3, 20, [], "sum")),
    ],
)
def test_unit_scales_for_every_task_reproduce_the_base_merger_exactly(dense, base, direct):
    expected = state(direct().run(pool(dense)))
    alg = LARVAlgorithm(base_method=base, **UNIT, **PER_TASK)
    got = state(alg.run(pool(dense)))
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
    assert set(alg.last_report["tasks"]) == {"a", "b", "c"}
    for task in alg.last_report["tasks"].values():
        assert [rec["s"] for rec in task["layers"]] == [1.0] * NUM_LAYERS


# -- task vectors in different blocks: different scales per task -------------------------------
def test_disjoint_task_vectors_get_their_own_scales_and_merge_like_task_arithmetic(disjoint):
    pretrained, tasks = disjoint
    alg = LARVAlgorithm(base_method=TA, **PER_TASK)
    got = state(alg.run(pool(disjoint)))
    report = alg.last_report["tasks"]
    s = {t: [rec["s"] for rec in report[t]["layers"]] for t in ("a", "b")}
    # tiered gate, L = 4: t_1 = w_(2), t_2 = w_(3). A task's two untouched blocks have e = 0, so
    # w = 0 <= t_1 (0.5); its two moved blocks take 1.0 and 1.5 in the order of their w
    assert s["a"][2:] == [0.5, 0.5] and sorted(s["a"][:2]) == [1.0, 1.5]
    assert s["b"][:2] == [0.5, 0.5] and sorted(s["b"][2:]) == [1.0, 1.5]
    assert s["a"] != s["b"]
    for t, blocks in (("a", (2, 3)), ("b", (0, 1))):  # the untouched blocks' diagnostics are 0
        assert all(report[t]["layers"][i]["e"] == report[t]["layers"][i]["c"] == 0 for i in blocks)

    # the oracle, written out: θ_0 + 0.3·Σ_t s_ℓ,t·(θ_t − θ_0); outside the blocks the nearest
    # block's scale (the embedding before block 1, the head after block L)
    theta0 = state(pretrained)
    want = {}
    for k, v in theta0.items():
        li = block_of(k)
        li = li if li is not None else (0 if k.startswith("embed.") else NUM_LAYERS - 1)
        update = sum(s[t][li] * (state(tasks[t])[k] - v) for t in ("a", "b"))
        want[k] = v + 0.3 * update
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)

    # one scale per block, read from the merged update, gives another model
    shared = LARVAlgorithm(base_method=TA, placement="task_vectors")
    other = state(shared.run(pool(disjoint)))
    assert "tasks" not in shared.last_report
    assert any(not torch.allclose(other[k], got[k], atol=1e-6) for k in got)


def test_each_tasks_scales_are_compute_larv_scales_on_that_task_alone(dense):
    pretrained, tasks = dense
    theta0 = state(pretrained)
    for gate in ("tiered", "continuous"):
        alg = LARVAlgorithm(base_method=TA, gate=gate, **PER_TASK)
        alg.run(pool(dense))
        for t, model in tasks.items():
            tau = {k: state(model)[k] - v for k, v in theta0.items()}
            alone = compute_larv_scales(
                theta0, {k: theta0[k] + tau[k] for k in theta0}, alg.settings
            )
            mine = alg.last_result.tasks[t]
            assert [r.s for r in mine.layers] == pytest.approx(alone.scales, rel=1e-5)
            assert [r.e for r in mine.layers] == pytest.approx(
                [r.e for r in alone.layers], rel=1e-4
            )
            assert [r.c for r in mine.layers] == pytest.approx(
                [r.c for r in alone.layers], rel=1e-4
            )
            assert [r.w for r in mine.layers] == pytest.approx(
                [r.w for r in alone.layers], rel=1e-4
            )
            if gate == "tiered":  # the tiers themselves, exactly
                assert [r.s for r in mine.layers] == alone.scales


# -- the report ----------------------------------------------------------------------------------
def test_report_records_every_task_and_the_means_over_tasks(dense, tmp_path):
    alg = LARVAlgorithm(base_method=TA, report_dir=str(tmp_path), **PER_TASK)
    alg.run(pool(dense))
    data = json.loads((tmp_path / "larv_layers.json").read_text())
    assert data == alg.last_report
    assert data["settings"]["diagnostics"] == "per_task"
    assert list(data["tasks"]) == ["a", "b", "c"]
    for task in data["tasks"].values():
        assert len(task["layers"]) == NUM_LAYERS and task["thresholds"] is not None
        assert {"e", "c", "r", "w", "s"} <= set(task["layers"][0])
    assert data["thresholds"] is None  # each task has its own
    for i, rec in enumerate(data["layers"]):  # the top-level layers: means over the tasks
        for key in ("e", "c", "w", "s"):
            vals = [data["tasks"][t]["layers"][i][key] for t in "abc"]
            assert rec[key] == pytest.approx(sum(vals) / 3, rel=1e-12)
        assert rec["r"] == (i + 1) / NUM_LAYERS
    # the default report has no per-task key
    plain = LARVAlgorithm(base_method=TA)
    plain.run(pool(dense))
    assert "tasks" not in plain.last_report
    assert plain.last_report["settings"]["diagnostics"] == "merged"


# -- config errors -------------------------------------------------------------------------------
def test_per_task_requires_the_task_vector_placement():
    with pytest.raises(LarvConfigError, match="`diagnostics`.*placement: task_vectors"):
        LarvSettings(diagnostics="per_task")
    with pytest.raises(LarvConfigError, match="`diagnostics`"):
        LARVAlgorithm(base_method=TA, diagnostics="per_task", placement="merged")
    assert LarvSettings(**PER_TASK).diagnostics == "per_task"
    assert LarvSettings().diagnostics == "merged"


def test_misspelt_diagnostics_gets_a_suggestion():
    with pytest.raises(LarvConfigError, match="did you mean `per_task`"):
        LarvSettings(placement="task_vectors", diagnostics="per-task")
    with pytest.raises(LarvConfigError, match="one of merged, per_task"):
        LarvSettings(diagnostics=3)


def test_precomputed_base_merge_cannot_be_reused_with_per_task(dense):
    base = TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool(dense))
    alg = LARVAlgorithm(base_method=TA, **PER_TASK)
    with pytest.raises(LarvConfigError, match="`base_merge` cannot be reused.*per_task"):
        alg.run(pool(dense), base_merge=base)
    assert alg.last_report is None


def test_pool_without_fine_tuned_models_is_a_clear_error(dense):
    alg = LARVAlgorithm(base_method=TA, **PER_TASK)
    with pytest.raises(LarvInputError, match="needs fine-tuned models"):
        alg.run(BaseModelPool({"_pretrained_": copy.deepcopy(dense[0])}))


def test_pool_view_with_per_model_scales_refuses_a_model_without_scales(dense):
    theta0 = state(dense[0])
    ones = dict.fromkeys(theta0, 1.0)
    view = PoolView(pool(dense), theta0, {"a": ones, "b": ones})
    view.load_model("a")
    with pytest.raises(LarvInputError, match="model `c`, which has no per-task scales"):
        view.load_model("c")
    with pytest.raises(TypeError, match="not a mix"):
        PoolView(pool(dense), theta0, {"a": ones, "embed.weight": 1.0})


def test_theta0_statistics_are_computed_once_for_all_tasks(dense, monkeypatch, tmp_path):
    from fusion_bench_larv.core import veneer

    calls = []
    real = veneer.theta0_statistics
    monkeypatch.setattr(veneer, "theta0_statistics", lambda *a: calls.append(1) or real(*a))
    alg = LARVAlgorithm(base_method=TA, **PER_TASK)
    alg.run(pool(dense))
    per_task = len(calls)
    calls.clear()
    LARVAlgorithm(base_method=TA).run(pool(dense))  # one diagnostic pass over the merged update
    assert per_task == len(calls) > 0  # three tasks, θ_0's statistics computed once
    # with the disk cache: filled by the first task, read back by a later run, same scales
    calls.clear()
    cached = LARVAlgorithm(base_method=TA, stats_cache_dir=str(tmp_path), **PER_TASK)
    cached.run(pool(dense))
    assert len(calls) == per_task and list(tmp_path.glob("larv-theta0-*.pt"))
    calls.clear()
    again = LARVAlgorithm(base_method=TA, stats_cache_dir=str(tmp_path), **PER_TASK)
    again.run(pool(dense))
    assert calls == []
    assert again.last_report["tasks"] == cached.last_report["tasks"] == alg.last_report["tasks"]
