"""Choosing on validation data (docs/method.md, "Choosing on validation data"): LiNeS's β and
guarded LARV's δ, each against the same method run with the chosen value given by hand."""

from __future__ import annotations

import json

import pytest
import torch
from fusion_bench import BaseModelPool
from test_lines import TA, fresh, sd, tiny_pool

from fusion_bench_larv.adapter.algorithm import LARVAlgorithm
from fusion_bench_larv.adapter.selection import check_validation, choose, validation_score
from fusion_bench_larv.core.settings import LarvConfigError
from fusion_bench_larv.methods.lines_algorithm import LiNeSAlgorithm


class DistancePool:
    """A stand-in validation task pool: the score is −‖θ − target‖² (higher is closer), so the
    best candidate is known without any data; records every model it saw."""

    def __init__(self, target: dict[str, torch.Tensor]):
        self.target, self.seen = target, []

    def evaluate(self, model):
        state = sd(model)
        self.seen.append(state)
        d = sum(float(((state[k] - v) ** 2).sum()) for k, v in self.target.items())
        return {"t0": {"accuracy": -d}, "average": {"accuracy": -d}}


def test_choose_takes_the_first_of_equals():
    assert choose([0.5, 0.7, 0.7, 0.1]) == 1
    assert choose([0.3]) == 0
    with pytest.raises(ValueError):
        choose([])


def test_validation_score_reads_the_average_or_the_tasks():
    assert validation_score({"average": {"accuracy": 0.25}, "a": {"accuracy": 1.0}}) == 0.25
    assert validation_score({"a": {"accuracy": 0.5}, "b": {"accuracy": 1.0}}) == 0.75
    with pytest.raises(ValueError, match="no accuracy"):
        validation_score({"model_info": {}})


@pytest.mark.parametrize(
    "value, match",
    [
        ({"taskpool": {"_target_": "x"}}, "must be null or"),
        ({"taskpool": {"_target_": "x"}, "grid": []}, "non-empty list"),
        ({"taskpool": {"_target_": "x"}, "grid": [0.1, float("nan")]}, "finite"),
        ({"taskpool": {"_target_": "x"}, "grid": [-0.1]}, "≥ 0"),
        ({"taskpool": {"_target_": "x"}, "grid": [0.1, 0.1]}, "repeats"),
        ({"taskpool": {"recipe": "full"}, "grid": [0.1]}, "_target_"),
    ],
)
def test_bad_validation_configs(value, match):
    with pytest.raises(LarvConfigError, match=match):
        check_validation(value, "LiNeS", "β")


def test_lines_chooses_beta_and_equals_lines_with_that_beta(tmp_path):
    models = tiny_pool(seed=3)
    ta = {"_target_": TA, "scaling_factor": 1.0}
    # the target: LiNeS with β = 0.5, so the grid's 0.5 is the unique best
    target = sd(LiNeSAlgorithm(base_method=ta, beta=0.5).run(fresh(models)))
    pool = DistancePool(target)
    alg = LiNeSAlgorithm(base_method=ta, validation={"taskpool": pool, "grid": [0.0, 0.5, 1.0]},
                         report_dir=tmp_path)  # fmt: skip
    out = alg.run(fresh(models))
    assert alg.beta == 0.5 and len(pool.seen) == 3
    for k, v in target.items():
        torch.testing.assert_close(out.state_dict()[k], v)
    report = json.loads((tmp_path / "lines_layers.json").read_text())
    v = report["validation"]
    assert v["grid"] == [0.0, 0.5, 1.0] and v["beta"] == 0.5 and report["beta"] == 0.5
    assert v["scores"][1] == max(v["scores"]) and v["scores"][1] > v["scores"][0]


def test_lines_needs_beta_or_validation_not_both():
    ta = {"_target_": TA, "scaling_factor": 1.0}
    pool = DistancePool({})
    with pytest.raises(LarvConfigError, match="not both"):
        LiNeSAlgorithm(base_method=ta, beta=0.5, validation={"taskpool": pool, "grid": [0.5]})
    with pytest.raises(LarvConfigError, match="needs `beta`.*; or `validation"):
        LiNeSAlgorithm(base_method=ta)


def _larv(models, **kw):
    return LARVAlgorithm(base_method={"_target_": TA, "scaling_factor": 0.3}, **kw)


def test_guarded_larv_refuses_to_rescale_when_the_base_merger_scores_best(tmp_path):
    models = tiny_pool(seed=4)
    base = sd(_larv(models, gate="schedule", schedule="uniform").run(fresh(models)))
    pool = DistancePool(base)  # the base merger itself is the target
    alg = _larv(models, validation={"taskpool": pool, "grid": [0.0, 0.25, 0.5]},
                report_dir=tmp_path)  # fmt: skip
    out = alg.run(fresh(models))
    for k, v in base.items():
        assert torch.equal(out.state_dict()[k], v), k  # δ = 0: the base merger bit for bit
    report = json.loads((tmp_path / "larv_layers.json").read_text())
    assert report["validation"]["delta"] == 0.0 and report["validation"]["levels"] == [1, 1, 1]
    assert len(pool.seen) == 3


def test_guarded_larv_equals_larv_with_the_chosen_levels():
    models = tiny_pool(seed=5)
    target = sd(_larv(models, levels=[0.75, 1.0, 1.25]).run(fresh(models)))
    pool = DistancePool(target)
    alg = _larv(models, validation={"taskpool": pool, "grid": [0.0, 0.25, 0.5]})
    out = alg.run(fresh(models))
    assert alg.last_report["validation"]["delta"] == 0.25
    assert alg.settings.levels == (0.75, 1.0, 1.25)
    for k, v in target.items():
        torch.testing.assert_close(out.state_dict()[k], v)


def test_guarded_larv_config_errors():
    pool = DistancePool({})
    with pytest.raises(LarvConfigError, match="gate: tiered"):
        _larv(None, gate="continuous", validation={"taskpool": pool, "grid": [0.0, 0.5]})
    with pytest.raises(LarvConfigError, match="δ ≤ 1"):
        _larv(None, validation={"taskpool": pool, "grid": [0.0, 1.5]})


def test_guarded_larv_leaves_in_memory_models_alone():
    models = tiny_pool(seed=6)
    before = {n: sd(m) for n, m in models.items()}
    pool = DistancePool({})
    _larv(models, validation={"taskpool": pool, "grid": [0.0, 0.5]}).run(
        BaseModelPool(dict(models))
    )
    for n, m in models.items():
        for k, v in sd(m).items():
            assert torch.equal(v, before[n][k]), (n, k)
