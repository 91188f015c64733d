"""The gate and schedule registry (fusion_bench_larv.core.registry): a gate or schedule added as
one entry (its function, its keys, its checks) is checked by the settings and run by LARV, with
nothing else edited; the built-in entries reproduce the functions they name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusion_bench_larv import (
    Gate,
    GateOutput,
    LARVAlgorithm,
    LarvConfigError,
    LarvSettings,
    Schedule,
    register_gate,
    register_schedule,
)
from fusion_bench_larv.core import registry
from fusion_bench_larv.core.gates import continuous_gate, tiered_gate

TA = {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.5}


class Net(nn.Module):
    """Four blocks `layers.{i}.fc` and a head: a model LARV can split into blocks."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Sequential() for _ in range(4))
        for block in self.layers:
            block.add_module("fc", nn.Linear(6, 6))
        self.head = nn.Linear(6, 2)


@pytest.fixture
def clean_registry():
    """The registry as it was after the test: entries added by a test do not leak."""
    gates, schedules = dict(registry.GATES), dict(registry.SCHEDULES)
    yield
    registry.GATES.clear()
    registry.GATES.update(gates)
    registry.SCHEDULES.clear()
    registry.SCHEDULES.update(schedules)


def _by_rank(w: list[float], settings) -> GateOutput:
    """A toy gate: s = 1 − γ/10 for the block of lowest w, rising evenly to 1 + γ/10 for the
    block of highest w (ties in the order of the blocks)."""
    order = sorted(range(len(w)), key=lambda i: w[i])
    step = 2 * settings.gamma / 10 / (len(w) - 1)
    s = [0.0] * len(w)
    for rank, i in enumerate(order):
        s[i] = 1 - settings.gamma / 10 + rank * step
    return GateOutput(s)


def _check_gamma_small(values) -> dict:
    if not 0 < values["gamma"] <= 5:
        raise LarvConfigError(f"the rank gate needs 0 < gamma <= 5, got {values['gamma']}")
    return {}


def test_a_gate_added_through_the_registry_alone_runs(clean_registry):
    with pytest.raises(LarvConfigError, match="`gate` = 'by_rank'.*one of tiered, continuous"):
        LarvSettings(gate="by_rank")
    register_gate(Gate("by_rank", _by_rank, keys=("gamma",), check=_check_gamma_small))

    # the settings read the entry: the name is allowed, and its check runs on every settings
    assert LarvSettings(gate="by_rank", gamma=2.0).gate == "by_rank"
    with pytest.raises(LarvConfigError, match="0 < gamma <= 5"):
        LarvSettings(gate="tiered", gamma=8.0)

    # LARV runs it: every parameter of block ℓ is θ_0 + s_ℓ·(θ_TA − θ_0), s_ℓ by the rank of w_ℓ
    pre, tuned = Net(0), [Net(i) for i in (1, 2)]
    theta0 = {k: v.clone() for k, v in pre.state_dict().items()}
    base = LARVAlgorithm(base_method=TA, gate="schedule", schedule="uniform").run(
        {"_pretrained_": Net(0), "a": Net(1), "b": Net(2)}
    )
    alg = LARVAlgorithm(base_method=TA, gate="by_rank", gamma=2.0)
    out = alg.run({"_pretrained_": pre, "a": tuned[0], "b": tuned[1]}).state_dict()
    w = [rec.w for rec in alg.last_result.layers]
    assert len(set(w)) == 4  # distinct scores: the ranks are the order of w
    want_s = {i: 0.8 + 0.4 * sorted(w).index(w[i]) / 3 for i in range(4)}
    assert [rec.s for rec in alg.last_result.layers] == pytest.approx([want_s[i] for i in range(4)])
    for i in range(4):
        for k in (f"layers.{i}.fc.weight", f"layers.{i}.fc.bias"):
            want = theta0[k] + want_s[i] * (base.state_dict()[k] - theta0[k])
            torch.testing.assert_close(out[k], want, rtol=1e-6, atol=1e-7)
    assert alg.last_report["settings"]["gate"] == "by_rank"


def test_a_schedule_added_through_the_registry_alone_runs(clean_registry):
    halves = Schedule("halves", lambda n, s: [s[0]] * (n // 2) + [s[1]] * (n - n // 2), 2,
                      default=(0.5, 1.5))  # fmt: skip
    with pytest.raises(LarvConfigError, match="`schedule` = 'halves'"):
        LarvSettings(gate="schedule", schedule="halves")
    register_schedule(halves)
    assert registry.depth_schedule("halves", 5) == [0.5, 0.5, 1.5, 1.5, 1.5]
    s = LarvSettings(gate="schedule", schedule="halves", schedule_scales=[0, 2])
    assert s.schedule_scales == (0.0, 2.0)
    # its number of values and their sign are checked from the entry
    with pytest.raises(LarvConfigError, match="exactly 2 numbers, got 3"):
        LarvSettings(gate="schedule", schedule="halves", schedule_scales=[1, 1, 1])
    with pytest.raises(LarvConfigError, match="scales must be >= 0"):
        LarvSettings(gate="schedule", schedule="halves", schedule_scales=[-1, 1])

    pre = Net(0)
    theta0 = {k: v.clone() for k, v in pre.state_dict().items()}
    alg = LARVAlgorithm(base_method=TA, gate="schedule", schedule="halves", schedule_scales=[0, 2])
    base = LARVAlgorithm(base_method=TA, gate="schedule", schedule="uniform").run(
        {"_pretrained_": Net(0), "a": Net(1), "b": Net(2)}
    )
    out = alg.run({"_pretrained_": pre, "a": Net(1), "b": Net(2)}).state_dict()
    assert alg.last_result.scales == [0.0, 0.0, 2.0, 2.0]
    for i, s_i in enumerate([0.0, 0.0, 2.0, 2.0]):
        k = f"layers.{i}.fc.weight"
        want = theta0[k] + s_i * (base.state_dict()[k] - theta0[k])
        torch.testing.assert_close(out[k], want, rtol=1e-6, atol=1e-7)


def test_built_in_gates_are_the_gate_functions():
    w = [0.3, 1.2, 0.9, 2.0, 0.1, 1.1]
    s = LarvSettings()
    assert registry.apply_gate(w, s) == GateOutput(*tiered_gate(w, s.alpha, s.beta, s.levels))
    c = LarvSettings(gate="continuous", gamma=2.0)
    assert registry.apply_gate(w, c).scales == continuous_gate(w, 2.0)


def test_every_registered_gate_and_schedule_is_a_config_choice():
    # the documented choices in the default config name exactly the registered entries
    from fusion_bench_larv.config_paths import larv_config_dir

    text = (larv_config_dir() / "larv" / "defaults.yaml").read_text()
    gate_line = next(line for line in text.splitlines() if line.startswith("gate:"))
    sched_line = next(line for line in text.splitlines() if line.startswith("schedule:"))
    assert gate_line.split("#")[1].strip().split(" | ") == list(registry.GATES)
    assert sched_line.split("#")[1].split(":")[1].strip().split("|") == list(registry.SCHEDULES)
