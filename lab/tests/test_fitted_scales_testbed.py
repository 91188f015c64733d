"""Per-block scales fitted on validation labels (the ceiling of per-block rescaling): the adapter
on tiny in-memory models (the merged model is the fitted θ(s); the per-task reading with one
task is the per-block one; a merge that is not θ_0 + λ Σ τ_t is refused for it), and the
harness's cell on the ``ci`` testbed, which fits on the validation split without reading a
test example."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from fusion_bench import BaseModelPool
from torch import nn

from fusion_bench_larv.core.fitted_scales import group_of
from fusion_bench_larv.errors import LarvConfigError, LarvInputError
from larv_lab.testbed.fitted_scales import OUTSIDE, TestbedFittedBlockScales

FAST = {"steps": 3, "lr": 0.01, "batch_size": 4, "seed": 0, "linear_tolerance": 1e-3}
TA = {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3}


class Tower(nn.Module):
    """Three blocks between an input projection and a norm (outside the blocks)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.layers = nn.ModuleList([nn.Linear(6, 6) for _ in range(3)])
        self.norm = nn.LayerNorm(6)

    def forward(self, pixel_values):
        h = self.embed(pixel_values)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.norm(h)


class Head(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, pixel_values):
        return self.head(self.backbone(pixel_values))


class ValidationPool:
    """The part of the testbed's validation task pool the fit reads: labelled examples and the
    tasks' frozen heads."""

    split = "validation"
    modality = "image"  # a classification testbed: the fit goes through the heads

    def __init__(self, tasks, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.data = {t: ({"pixel_values": torch.randn(12, 4, generator=g)},
                         torch.randint(0, 3, (12,), generator=g)) for t in tasks}  # fmt: skip
        self.heads = {t: nn.Linear(6, 3) for t in tasks}
        self.testbed = self
        self.tasks = tuple(tasks)
        self.read = []

    def examples(self, task):
        self.read.append(task)
        return self.data[task]

    def classifier(self, task, backbone):
        return Head(backbone, self.heads[task])


def _pool(tasks):
    torch.manual_seed(0)
    base = Tower()
    models = {"_pretrained_": base}
    for t in tasks:
        tuned = copy.deepcopy(base)
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(0.3 * torch.randn_like(p))
        models[t] = tuned
    return BaseModelPool(models)


def _run(pool, tasks, base=TA, **keys):
    alg = TestbedFittedBlockScales(base, validation_taskpool=ValidationPool(tasks),
                                   **{**FAST, **keys})  # fmt: skip
    return alg, alg.run(pool)


def test_the_merged_model_is_the_base_merge_rescaled_by_the_fitted_scales():
    tasks = ["a", "b"]
    theta0 = {k: v.clone() for k, v in _pool(tasks).load_model("_pretrained_").state_dict().items()}
    from fusion_bench.method import TaskArithmeticAlgorithm

    ta = TaskArithmeticAlgorithm(scaling_factor=0.3).run(_pool(tasks)).state_dict()
    alg, merged = _run(_pool(tasks), tasks)
    rep = alg.last_report
    assert rep["groups"] == ["layers.0.", "layers.1.", "layers.2.", OUTSIDE]
    assert rep["fit"]["steps"] == 3 and len(rep["fit"]["curve"]) == 3
    (scales,) = rep["scales"]
    assert all(s != 1.0 for s in scales)  # three Adam steps moved every group
    group = group_of(alg.open(_pool(tasks)).groups, list(theta0))
    assert group["embed.weight"] == group["norm.bias"] == 3  # one scale outside the blocks
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, theta0[k] + scales[group[k]] * (ta[k] - theta0[k]))
    assert rep["validation"]["examples"] == {"a": 12, "b": 12}


def test_per_task_with_one_task_is_the_per_block_fit():
    out = {}
    for per_task in (False, True):
        alg, model = _run(_pool(["a"]), ["a"], per_task=per_task)
        out[per_task] = (alg.last_report, model.state_dict())
    assert out[True][0]["sources"] == ["a"] and out[True][0]["lambda"] == pytest.approx(0.3)
    assert out[True][0]["scales"][0] == pytest.approx(out[False][0]["scales"][0], abs=1e-5)
    for k, v in out[False][1].items():
        torch.testing.assert_close(out[True][1][k], v)


def test_per_task_gives_each_task_vector_its_own_scales():
    alg, _ = _run(_pool(["a", "b", "c"]), ["a", "b", "c"], per_task=True)
    rows = alg.last_report["scales"]
    assert len(rows) == 3 and len({tuple(r) for r in rows}) == 3
    assert alg.last_report["lambda"] == pytest.approx(0.3, rel=1e-5)


def test_per_task_refuses_a_merge_that_is_not_a_sum_of_task_vectors():
    ties = {"_target_": "fusion_bench.method.TiesMergingAlgorithm", "scaling_factor": 0.3,
            "threshold": 20, "remove_keys": [], "merge_func": "sum"}  # fmt: skip
    with pytest.raises(LarvInputError, match="θ_0 \\+ λ Σ_t τ_t"):
        _run(_pool(["a", "b"]), ["a", "b"], base=ties, per_task=True)


def test_a_task_without_validation_examples_is_named_and_left_out_of_the_fit():
    tasks = ["a", "b"]
    val = ValidationPool(tasks)
    val.data["b"] = ({"pixel_values": torch.zeros(0, 4)}, torch.zeros(0, dtype=torch.long))
    alg = TestbedFittedBlockScales(TA, validation_taskpool=val, **FAST)
    with pytest.warns(UserWarning, match="no labelled validation examples"):
        alg.run(_pool(tasks))
    assert alg.last_report["validation"]["uncovered_tasks"] == ["b"]


def test_only_a_validation_split_is_accepted_and_every_setting_is_stated():
    pool = {"_target_": "larv_lab.testbed.pools.TestbedTaskPool", "recipe": "ci"}
    with pytest.raises(LarvConfigError, match="never fitted on"):
        TestbedFittedBlockScales(TA, validation_taskpool={**pool, "split": "test"}, **FAST)
    with pytest.raises(LarvConfigError, match="validation_taskpool"):
        TestbedFittedBlockScales(TA, **FAST)
    with pytest.raises(LarvConfigError, match="`steps`, `lr`"):
        TestbedFittedBlockScales(TA, validation_taskpool={**pool, "split": "validation"})


@pytest.mark.slow
def test_the_harness_cell_fits_on_validation_and_never_reads_a_test_example(
    ci_testbed, ci_testbed_cache, tmp_path, monkeypatch
):
    from hydra.utils import instantiate
    from test_data_using_rows import _cell_method

    from larv_lab.reproduce import experiments as X
    from larv_lab.testbed import build as B
    from larv_lab.testbed.pools import TestbedModelPool

    (cell,) = X.map_pools([X.Cell(X.BENCH, "ta", X.FITTED)],
                          X.parse_pool(f"testbed:ci:{ci_testbed_cache}"))  # fmt: skip
    method = _cell_method(cell, tmp_path / "sweep")
    assert method["_target_"].endswith("TestbedFittedBlockScales")
    # the merger as its base cell runs it (not at LiNeS's coefficient 1), fitted on validation
    _, base = X.Cell(cell.suite, "ta", X.BASE).method()
    assert method["base_method"]["scaling_factor"] == pytest.approx(base["scaling_factor"])
    assert method["validation_taskpool"]["split"] == "validation"
    assert method["validation_taskpool"]["cache_dir"] == str(ci_testbed_cache.resolve())
    method.update(steps=2, batch_size=4)
    method["validation_taskpool"]["val_size"] = 8
    alg = instantiate(method, _recursive_=False)
    alg.report_dir = str(tmp_path)

    def refuse(self, task):
        raise AssertionError(f"the test set of {task} was read")

    monkeypatch.setattr(B.Testbed, "test_set", refuse)
    tasks = ["sklearn_digits", "opencv_digits"]  # the two with the quickest sources
    alg.run(TestbedModelPool(testbed_dir=str(ci_testbed.root), tasks=tasks))
    report = json.loads((tmp_path / "fitted_block_scales.json").read_text())
    assert report["method"] == "per-block scales fitted on validation labels"
    assert len(report["scales"][0]) == len(report["groups"]) == 12 + 1
    assert report["validation"]["examples"] == {t: 8 for t in tasks}
    assert len(report["fit"]["curve"]) == 2
