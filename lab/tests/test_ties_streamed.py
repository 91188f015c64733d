"""The streamed TIES (larv_lab.testbed.ties_streamed) equals FusionBench's TiesMergingAlgorithm bit
for bit: the oracle is FusionBench's own code, run on the same models."""

from __future__ import annotations

import pytest
import torch
from fusion_bench.method import TiesMergingAlgorithm
from torch import nn

from larv_lab.testbed.ties_streamed import StreamedTiesMergingAlgorithm, ties_merge


def tiny_lm(seed: int) -> nn.Module:
    """A tiny model with a tied embedding / output matrix (as SmolLM2's), seeded."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Embedding(11, 6), nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 11, bias=False)
    )
    model[3].weight = model[0].weight
    return model


def pool(n_tasks: int = 4) -> dict[str, nn.Module]:
    base = tiny_lm(0)
    models = {"_pretrained_": base}
    for t in range(n_tasks):
        ft = tiny_lm(0)
        torch.manual_seed(100 + t)
        with torch.no_grad():
            for p in ft.parameters():
                # sparse-ish updates: some entries exactly 0, so ties and zero signs occur
                p.add_(torch.randn_like(p) * (torch.rand_like(p) > 0.3))
        models[f"task{t}"] = ft
    return models


def fusion_bench_merge(models, **config) -> dict[str, torch.Tensor]:
    fresh = {name: tiny_lm(0) for name in models}
    for name, m in models.items():
        fresh[name].load_state_dict(m.state_dict())
    return TiesMergingAlgorithm(**config).run(fresh).state_dict()


@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
@pytest.mark.parametrize("threshold", [20, 0.5, 99])
def test_streamed_ties_equals_fusion_bench(merge_func, threshold):
    models = pool()
    config = dict(scaling_factor=0.3, threshold=threshold, remove_keys=[], merge_func=merge_func)
    expected = fusion_bench_merge(models, **config)
    ours = StreamedTiesMergingAlgorithm(**config).run(models).state_dict()
    assert expected.keys() == ours.keys()
    for key in expected:
        assert torch.equal(expected[key], ours[key]), key
    # the merge did something: not θ_0, and the tie survived
    assert not torch.equal(ours["1.weight"], tiny_lm(0).state_dict()["1.weight"])
    assert torch.equal(ours["0.weight"], ours["3.weight"])


def test_trim_keeps_the_top_fraction_of_each_task_vector():
    """Hand-derived: one task, entries 1..10, threshold 30 % → κ = the (10 − 3)-th smallest = 7,
    and |τ| ≥ κ keeps 7, 8, 9, 10 (⌊d·k⌋ + 1 entries, as FusionBench keeps them); with one task
    every kept entry agrees with γ, and λ = 1."""
    pre = {"w": torch.zeros(10)}
    ft = {"w": torch.arange(1.0, 11.0)}
    merged = ties_merge(pre, [ft], scaling_factor=1.0, threshold=30)
    assert merged["w"].tolist() == [0.0] * 6 + [7.0, 8.0, 9.0, 10.0]


def test_disjoint_merge_follows_the_elected_sign():
    """Hand-derived, threshold 99 (κ = the smallest |τ|: nothing trimmed): entry 0 has +3 and −1 → γ = + and the sum
    keeps 3 (mean 3, max 3); entry 1 has +1 and −1 → γ = 0, replaced by the majority sign of γ
    over all entries (+, from entry 0 and 2) → keeps +1; entry 2: +2, +2 → 4 (mean 2)."""
    pre = {"w": torch.zeros(3)}
    a, b = {"w": torch.tensor([3.0, 1.0, 2.0])}, {"w": torch.tensor([-1.0, -1.0, 2.0])}
    merge = {
        f: ties_merge(pre, [a, b], scaling_factor=1.0, threshold=99, merge_func=f)["w"]
        for f in ("sum", "mean", "max")
    }
    assert merge["sum"].tolist() == [3.0, 1.0, 4.0]
    assert merge["mean"].tolist() == [3.0, 1.0, 2.0]
    assert merge["max"].tolist() == [3.0, 1.0, 2.0]


def test_unknown_merge_func_is_refused():
    with pytest.raises(ValueError, match="not defined"):
        ties_merge(
            {"w": torch.zeros(2)},
            [{"w": torch.ones(2)}],
            scaling_factor=1.0,
            threshold=20,
            merge_func="median",
        )
