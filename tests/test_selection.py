"""Choosing on validation data (docs/method.md, "Choosing on validation data"): LiNeS's β, the
signed depth ramp's β and guarded LARV's δ, each against the same method run with the chosen value
given by hand; the grid's growing rule, the coverage of every task and the guard on hand-derived
cases (scripted stand-in task pools whose verdicts are written out per value)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fusion_bench import BaseModelPool
from test_lines import TA, fresh, sd, tiny_pool

from fusion_bench_larv.adapter.algorithm import LARVAlgorithm
from fusion_bench_larv.adapter.selection import (
    GrowRule,
    check_validation,
    choose,
    grow_grid,
    validation_score,
)
from fusion_bench_larv.core.correctness import encode_task
from fusion_bench_larv.core.settings import LarvConfigError
from fusion_bench_larv.errors import LarvInputError, LarvWarning
from fusion_bench_larv.methods.lines_algorithm import LiNeSAlgorithm, SignedDepthRamp

TASKS = ("t0", "t1", "t2")  # tiny_pool's fine-tuned models


class DistancePool:
    """A stand-in validation task pool: the score is −‖θ − target‖² (higher is closer), so the
    best candidate is known without any data; records every model it saw."""

    def __init__(self, target: dict[str, torch.Tensor]):
        self.target, self.seen = target, []

    def evaluate(self, model):
        state = sd(model)
        self.seen.append(state)
        d = sum(float(((state[k] - v) ** 2).sum()) for k, v in self.target.items())
        return {**{t: {"accuracy": -d} for t in TASKS}, "average": {"accuracy": -d}}


class ScriptedPool:
    """A stand-in validation task pool whose verdicts are written by hand: ``script(v)`` gives
    each task's per-example correctness for the value ``v`` the algorithm holds when it is asked
    (``value(alg)``); it records them as the recording task pools do."""

    def __init__(self, script, value):
        self.script, self.value, self.alg, self.asked = script, value, None, []
        self.per_sample_evaluations = []

    def evaluate(self, model):
        v = self.value(self.alg)
        self.asked.append(v)
        correct = {t: np.asarray(c, dtype=bool) for t, c in self.script(v).items()}
        self.per_sample_evaluations.append({t: encode_task(c) for t, c in correct.items()})
        accs = {t: float(c.mean()) for t, c in correct.items()}
        return {**{t: {"accuracy": a} for t, a in accs.items()},
                "average": {"accuracy": sum(accs.values()) / len(accs)}}  # fmt: skip


def delta_of(alg):
    return round(alg.settings.levels[2] - 1.0, 9)


def beta_of(alg):
    return alg.beta


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
        ({"taskpool": {"_target_": "x"}, "grid": [0.1], "gird": 1}, "must be null or"),
        ({"taskpool": {"_target_": "x"}, "grid": []}, "non-empty list"),
        ({"taskpool": {"_target_": "x"}, "grid": [0.1, float("nan")]}, "finite"),
        ({"taskpool": {"_target_": "x"}, "grid": [-0.1]}, "≥ 0"),
        ({"taskpool": {"_target_": "x"}, "grid": [0.1, 0.1]}, "repeats"),
        ({"taskpool": {"recipe": "full"}, "grid": [0.1]}, "_target_"),
        ({"taskpool": {"_target_": "x"}, "grid": [0.1], "grow": {"step": 0}}, "grow must be"),
        (
            {
                "taskpool": {"_target_": "x"},
                "grid": [0.1],
                "grow": {"step": 0, "bounds": [0, 1], "max_values": 9},
            },
            "positive number",
        ),  # fmt: skip
        (
            {
                "taskpool": {"_target_": "x"},
                "grid": [0.1],
                "grow": {"step": 0.1, "bounds": [-1, 1], "max_values": 9},
            },
            "β ≥ 0",
        ),  # fmt: skip
        (
            {
                "taskpool": {"_target_": "x"},
                "grid": [0.5],
                "grow": {"step": 0.1, "bounds": [0, 0.4], "max_values": 9},
            },
            "within grow.bounds",
        ),  # fmt: skip
        ({"taskpool": {"_target_": "x"}, "grid": [0.1], "uncovered": "skip"}, "one of"),
        ({"taskpool": {"_target_": "x"}, "grid": [0.1], "guard": True}, "guard: false"),
        ({"taskpool": {"_target_": "x"}, "grid": [0.1], "uncovered": "base"}, "has none"),
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
    grow = {"step": 0.5, "bounds": [0.0, 1.0], "max_values": 10}  # 0.5 is interior: no growth
    alg = LiNeSAlgorithm(base_method=ta, report_dir=tmp_path,
                         validation={"taskpool": pool, "grid": [0.0, 0.5, 1.0], "grow": grow})  # fmt: skip
    out = alg.run(fresh(models))
    assert alg.beta == 0.5 and len(pool.seen) == 3
    for k, v in target.items():
        torch.testing.assert_close(out.state_dict()[k], v)
    report = json.loads((tmp_path / "lines_layers.json").read_text())
    v = report["validation"]
    assert v["grid"] == [0.0, 0.5, 1.0] and v["beta"] == 0.5 and report["beta"] == 0.5
    assert v["scores"][1] == max(v["scores"]) and v["scores"][1] > v["scores"][0]
    assert v["stopped"] == "interior" and v["tasks"] == list(TASKS) and v["uncovered_tasks"] == []


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
    alg = _larv(models, validation={"taskpool": pool, "grid": [0.0, 0.25, 0.5], "guard": False},
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
    alg = _larv(models, validation={"taskpool": pool, "grid": [0.0, 0.25, 0.5], "guard": False})
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
    _larv(models, validation={"taskpool": pool, "grid": [0.0, 0.5], "guard": False}).run(
        BaseModelPool(dict(models))
    )
    for n, m in models.items():
        for k, v in sd(m).items():
            assert torch.equal(v, before[n][k]), (n, k)


# -- the grid's growing rule, by hand ---------------------------------------------------------------
RULE = GrowRule(step=0.25, bounds=(0.0, 1.0), max_values=10)


@pytest.mark.parametrize(
    "values, scores, rule, expected",
    [
        # best interior: the search is over
        ([0.0, 0.25, 0.5], [1, 3, 2], RULE, ([], "interior")),
        # best at the top edge: one step beyond it
        ([0.0, 0.25, 0.5], [1, 2, 3], RULE, ([0.75], "")),
        # best at the top, one step would pass the bound: the bound itself
        ([0.0, 0.5, 0.9], [1, 2, 3], RULE, ([1.0], "")),
        # best at the top, which is the bound: stop there
        ([0.0, 0.5, 1.0], [1, 2, 3], RULE, ([], "bound")),
        # best at the bottom, which is the bound (LiNeS's β = 0)
        ([0.0, 0.5, 1.0], [3, 2, 1], RULE, ([], "bound")),
        # best at an open bottom: one step below
        ([0.0, 0.5], [3, 1], GrowRule(0.5, (None, 2.0), 10), ([-0.5], "")),
        # ties go to the value listed first: 0.5 (interior), not 1.0
        ([0.0, 0.5, 1.0, 0.25], [1, 3, 3, 0], RULE, ([], "interior")),
        # a single value is both edges
        ([0.5], [1], RULE, ([0.75, 0.25], "")),
        # the grid is full
        ([0.0, 0.25], [1, 2], GrowRule(0.25, (0.0, 1.0), 2), ([], "max_values")),
        # no rule: the grid as given
        ([0.0, 0.25], [1, 2], None, ([], "fixed grid")),
        # steps of 0.1 add up to round numbers
        ([0.1, 0.2], [1, 2], GrowRule(0.1, (0.0, 1.0), 10), ([0.3], "")),
    ],
)
def test_grow_grid_by_hand(values, scores, rule, expected):
    assert grow_grid(values, scores, rule) == expected


def _peak(at):
    """A scripted score for three tasks of 100 examples each: k(v) = 100 − round(40 (v − at)²)
    correct examples per task, so the validation accuracy peaks at v = ``at``."""

    def script(v):
        k = 100 - round(40 * (v - at) ** 2)
        return {t: [True] * k + [False] * (100 - k) for t in TASKS}

    return script


def test_lines_grid_grows_until_its_best_beta_is_interior(tmp_path):
    # peak at β = 1.3: the grid 0, 0.5, 1.0 is best at its top, grows to 1.5 (best, top again)
    # and to 2.0 (worse): 1.5 is interior and chosen
    models = tiny_pool(seed=7)
    ta = {"_target_": TA, "scaling_factor": 1.0}
    pool = ScriptedPool(_peak(1.3), beta_of)
    grow = {"step": 0.5, "bounds": [0.0, 4.0], "max_values": 10}
    alg = LiNeSAlgorithm(base_method=ta, report_dir=tmp_path,
                         validation={"taskpool": pool, "grid": [0.0, 0.5, 1.0], "grow": grow})  # fmt: skip
    pool.alg = alg
    alg.run(fresh(models))
    v = json.loads((tmp_path / "lines_layers.json").read_text())["validation"]
    assert v["grid"] == [0.0, 0.5, 1.0, 1.5, 2.0] and v["initial_grid"] == [0.0, 0.5, 1.0]
    # 1 − round(40 (β − 1.3)²) / 100
    assert v["scores"] == pytest.approx([0.32, 0.74, 0.96, 0.98, 0.80])
    assert v["beta"] == v["best"] == 1.5 and v["stopped"] == "interior" and alg.beta == 1.5
    assert v["grow"] == grow


def test_lines_grid_stops_at_its_stated_bound():
    models = tiny_pool(seed=7)
    ta = {"_target_": TA, "scaling_factor": 1.0}
    pool = ScriptedPool(_peak(1.3), beta_of)
    grow = {"step": 0.5, "bounds": [0.0, 1.25], "max_values": 10}
    alg = LiNeSAlgorithm(base_method=ta,
                         validation={"taskpool": pool, "grid": [0.0, 0.5, 1.0], "grow": grow})  # fmt: skip
    pool.alg = alg
    alg.run(fresh(models))
    v = alg.last_report["validation"]
    assert v["grid"] == [0.0, 0.5, 1.0, 1.25] and v["beta"] == 1.25 and v["stopped"] == "bound"


def test_signed_ramp_goes_below_zero_where_lines_stops_at_it():
    # peak at β = −0.7: LiNeS stops at its bound β = 0 (0.80 against 0.42 at 0.5); the signed
    # ramp grows down to −0.5 (0.98) and −1.0 (0.96), which leaves −0.5 interior
    models = tiny_pool(seed=8)
    ta = {"_target_": TA, "scaling_factor": 1.0}
    grow = {"step": 0.5, "bounds": [None, 4.0], "max_values": 10}
    chosen = {}
    for cls in (LiNeSAlgorithm, SignedDepthRamp):
        pool = ScriptedPool(_peak(-0.7), beta_of)
        alg = cls(base_method=ta, validation={"taskpool": pool, "grid": [0.0, 0.5], "grow": grow})
        pool.alg = alg
        alg.run(fresh(models))
        chosen[cls.method] = alg.last_report["validation"]
    assert chosen["LiNeS"]["grid"] == [0.0, 0.5] and chosen["LiNeS"]["stopped"] == "bound"
    signed = chosen["signed depth ramp"]
    assert signed["grid"] == [0.0, 0.5, -0.5, -1.0] and signed["beta"] == -0.5
    assert signed["stopped"] == "interior"
    with pytest.raises(LarvConfigError, match="β ≥ 0"):
        LiNeSAlgorithm(base_method=ta, beta=-0.5)
    assert SignedDepthRamp(base_method=ta, beta=-0.5).beta == -0.5


# -- coverage -------------------------------------------------------------------------------------
def _covering(tasks, at=0.25):
    """Scripted verdicts on ``tasks`` only (the others have no validation examples)."""
    peak = _peak(at)
    return lambda v: {t: c for t, c in peak(v).items() if t in tasks}


def test_an_uncovered_task_is_refused_by_default():
    models = tiny_pool(seed=9)
    pool = ScriptedPool(_covering(("t0",)), delta_of)
    alg = _larv(models, validation={"taskpool": pool, "grid": [0.0, 0.25], "guard": False})
    pool.alg = alg
    with pytest.raises(LarvInputError, match=r"no examples of task\(s\) \['t1', 't2'\]"):
        alg.run(fresh(models))
    assert pool.asked == [0.0]  # refused after the first evaluation showed the gap


def test_uncovered_base_keeps_the_base_merger_and_says_so():
    models = tiny_pool(seed=9)
    base = sd(_larv(models, gate="schedule", schedule="uniform").run(fresh(models)))
    pool = ScriptedPool(_covering(("t0", "t2")), delta_of)
    alg = _larv(models, validation={"taskpool": pool, "grid": [0.0, 0.25], "uncovered": "base"})
    pool.alg = alg
    with pytest.warns(LarvWarning, match=r"\['t1'\].*keeping the base merger"):
        out = alg.run(fresh(models))
    for k, v in base.items():
        assert torch.equal(out.state_dict()[k], v), k
    v = alg.last_report["validation"]
    assert v["uncovered_tasks"] == ["t1"] and v["tasks"] == ["t0", "t2"] and v["delta"] == 0.0
    assert v["stopped"] == "uncovered: base"


def test_uncovered_choose_chooses_on_the_covered_tasks_and_says_so():
    models = tiny_pool(seed=9)
    pool = ScriptedPool(_covering(("t0",)), delta_of)
    alg = _larv(models, validation={"taskpool": pool, "grid": [0.0, 0.25, 0.5],
                                    "uncovered": "choose", "guard": False})  # fmt: skip
    pool.alg = alg
    with pytest.warns(LarvWarning, match=r"\['t1', 't2'\].*choosing on \['t0'\] only"):
        alg.run(fresh(models))
    v = alg.last_report["validation"]
    assert v["delta"] == 0.25 and v["uncovered_tasks"] == ["t1", "t2"]
    assert v["uncovered"] == "choose"


# -- the guard ------------------------------------------------------------------------------------
def _gain(extra):
    """δ = 0: 100 of 200 examples correct on each task; δ > 0: ``extra[task]`` more, none
    fewer (the first ``extra`` wrong examples become right)."""

    def script(v):
        return {t: [True] * (100 + (extra.get(t, 0) if v > 0 else 0))
                + [False] * (100 - (extra.get(t, 0) if v > 0 else 0)) for t in TASKS}  # fmt: skip

    return script


def test_guard_keeps_the_base_merger_when_the_gain_is_one_example():
    # δ = 0.25 scores best by one example in 600: its paired interval [0, +1/600] reaches 0
    # (no discordant example is drawn in about (1 − 1/200)^200 ≈ 37 % of the resamples), so
    # the guard keeps the base merger bit for bit
    models = tiny_pool(seed=10)
    base = sd(_larv(models, gate="schedule", schedule="uniform").run(fresh(models)))
    pool = ScriptedPool(_gain({"t1": 1}), delta_of)
    alg = _larv(models, validation={"taskpool": pool, "grid": [0.0, 0.25]})
    pool.alg = alg
    # a fixed grid whose best value is its top, short of δ's bound 1: said, not hidden
    with pytest.warns(LarvWarning, match=r"best δ = 0.25 is at the edge of the grid searched"):
        out = alg.run(fresh(models))
    v = alg.last_report["validation"]
    assert v["best"] == 0.25 and v["delta"] == 0.0 and v["guard"]["significant"] is False
    assert v["guard"]["gain"] == pytest.approx(1 / 600) and v["guard"]["interval"][0] <= 0
    for k, t in base.items():
        assert torch.equal(out.state_dict()[k], t), k


def test_guard_keeps_a_significant_gain():
    # 40 more of 200 on every task, none fewer: Δ̄ = 0.2, far from 0
    models = tiny_pool(seed=10)
    # (δ = 0.5 scores as 0.25 does: the first of equals, 0.25, interior)
    pool = ScriptedPool(_gain(dict.fromkeys(TASKS, 40)), delta_of)
    alg = _larv(models, validation={"taskpool": pool, "grid": [0.0, 0.25, 0.5]})
    pool.alg = alg
    alg.run(fresh(models))
    v = alg.last_report["validation"]
    assert v["delta"] == 0.25 and v["guard"]["significant"] is True
    assert v["guard"]["gain"] == pytest.approx(0.2) and v["guard"]["interval"][0] > 0.1
    assert alg.settings.levels == (0.75, 1.0, 1.25)


def test_guard_needs_per_example_correctness():
    models = tiny_pool(seed=10)
    alg = _larv(models, validation={"taskpool": DistancePool({}), "grid": [0.0, 0.25]})
    with pytest.raises(LarvInputError, match="guard needs each example's correctness"):
        alg.run(fresh(models))
    with pytest.raises(LarvConfigError, match=r"grid must hold δ = 0"):
        _larv(models, validation={"taskpool": DistancePool({}), "grid": [0.25, 0.5]})
