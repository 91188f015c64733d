"""Per-block scales fitted on labelled data (core/fitted_scales.py): the fit recovers scales
derived by hand, θ(s) is the parametrisation it claims, and λ of a merge θ_0 + λ Σ τ_t is found."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fusion_bench_larv.core.fitted_scales import (
    call_with,
    common_coefficient,
    compose,
    fit_block_scales,
    group_of,
)
from fusion_bench_larv.core.layers import group_layers


class Blocks(nn.Module):
    """Two one-weight blocks and a weight outside them, each reading its own input feature:
    logit of class 1 = Σ_b w_b x_b (class 0's logit is 0)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(1, 1, bias=False) for _ in range(2)])
        self.head = nn.Linear(1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.layers[0](x[:, :1]) + self.layers[1](x[:, 1:2]) + self.head(x[:, 2:3])
        return torch.cat([torch.zeros_like(z), z], dim=1)


def _case():
    model = Blocks()
    names = [k for k, _ in model.named_parameters()]
    group = group_of(group_layers(names), names)
    theta0 = {"layers.0.weight": torch.tensor([[0.0]]), "layers.1.weight": torch.tensor([[0.0]]),
              "head.weight": torch.tensor([[0.3]])}  # fmt: skip
    delta = {"layers.0.weight": torch.tensor([[0.5]]), "layers.1.weight": torch.tensor([[-1.0]]),
             "head.weight": torch.tensor([[0.6]])}  # fmt: skip
    # input type b (one-hot in feature b) carries label 1 with frequency p_b: 3/4, 1/4, 1/2
    x = torch.eye(3).repeat_interleave(4, dim=0)
    y = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0, 1, 1, 0, 0])
    return model, group, theta0, delta, x, y


def test_groups_are_the_blocks_then_everything_outside():
    _, group, *_ = _case()
    assert group == {"layers.0.weight": 0, "layers.1.weight": 1, "head.weight": 2}


def test_the_fit_recovers_the_hand_derived_optimum():
    # Cross-entropy of a logit w on inputs whose label is 1 with frequency p is minimised at
    # w* = log(p / (1 − p)); w_b = θ_0,b + s_b Δ_b, so s_b* = (log(p_b / (1 − p_b)) − θ_0,b) / Δ_b:
    # block 0: log 3 / 0.5 = 2 log 3; block 1: −log 3 / −1 = log 3; outside: (0 − 0.3) / 0.6 = −½
    model, group, theta0, delta, x, y = _case()

    def loss(params, step):
        return nn.functional.cross_entropy(call_with(model, params)(x), y)

    fit = fit_block_scales(theta0, [delta], group, 3, loss, steps=300, lr=0.1)
    expected = [2 * math.log(3), math.log(3), -0.5]
    assert fit.scales[0] == pytest.approx(expected, abs=1e-4)
    assert fit.steps == 300 and fit.curve[-1] < fit.curve[0]
    # the curve starts at the base merge, s = 1
    z = [0.5, -1.0, 0.9]  # θ_0 + Δ per feature
    base = nn.functional.cross_entropy(torch.stack([torch.zeros(12), x @ torch.tensor(z)], 1), y)
    assert fit.curve[0] == pytest.approx(float(base), rel=1e-6)


def test_compose_is_theta0_plus_each_source_scaled_per_block():
    _, group, theta0, delta, *_ = _case()
    other = {k: torch.full_like(v, 2.0) for k, v in delta.items() if k != "head.weight"}
    s = torch.tensor([[2.0, 3.0, 4.0], [-1.0, 0.5, 7.0]])
    out = compose(theta0, [delta, other], group, s)
    assert float(out["layers.0.weight"]) == pytest.approx(0.0 + 2 * 0.5 - 1 * 2.0)
    assert float(out["layers.1.weight"]) == pytest.approx(0.0 + 3 * -1.0 + 0.5 * 2.0)
    assert float(out["head.weight"]) == pytest.approx(0.3 + 4 * 0.6)  # no second source there


def test_one_source_per_task_with_one_task_is_the_per_block_fit():
    # per-task reading with a single task vector: Δ_1 = λ τ_1 is the merged update itself
    model, group, theta0, delta, x, y = _case()
    lam = 0.4
    tau = {k: v / lam for k, v in delta.items()}
    merged = {k: theta0[k] + delta[k] for k in theta0}
    got_lam, resid = common_coefficient(theta0, merged, [tau], list(theta0))
    assert got_lam == pytest.approx(lam) and resid < 1e-6

    def loss(params, step):
        return nn.functional.cross_entropy(call_with(model, params)(x), y)

    one = fit_block_scales(theta0, [delta], group, 3, loss, steps=20, lr=0.05)
    per_task = fit_block_scales(theta0, [{k: got_lam * v for k, v in tau.items()}], group, 3,
                                loss, steps=20, lr=0.05)  # fmt: skip
    assert per_task.scales[0] == pytest.approx(one.scales[0], abs=1e-6)


def test_common_coefficient_finds_lambda_and_rejects_other_merges():
    g = torch.Generator().manual_seed(0)
    theta0 = {"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)}
    taus = [{k: torch.randn(v.shape, generator=g) for k, v in theta0.items()} for _ in range(3)]
    ta = {k: theta0[k] + 0.3 * sum(t[k] for t in taus) for k in theta0}
    lam, resid = common_coefficient(theta0, ta, taus, ["a", "b"])
    assert lam == pytest.approx(0.3, rel=1e-6) and resid < 1e-6
    # an element-wise max of the task vectors (not θ_0 + λ Σ τ): a residual far from 0
    mx = {k: theta0[k] + torch.stack([t[k] for t in taus]).amax(0) for k in theta0}
    assert common_coefficient(theta0, mx, taus, ["a", "b"])[1] > 0.3


def test_the_fit_leaves_its_inputs_alone_and_refuses_bad_settings():
    model, group, theta0, delta, x, y = _case()
    kept = {k: v.clone() for k, v in delta.items()}

    def loss(params, step):
        return nn.functional.cross_entropy(call_with(model, params)(x), y)

    fit_block_scales(theta0, [delta], group, 3, loss, steps=3, lr=0.1)
    assert all(torch.equal(delta[k], kept[k]) for k in delta)
    with pytest.raises(ValueError, match="lr"):
        fit_block_scales(theta0, [delta], group, 3, loss, steps=3, lr=0.0)
    with pytest.raises(ValueError, match="outside"):
        fit_block_scales(theta0, [delta], group, 2, loss, steps=3, lr=0.1)
