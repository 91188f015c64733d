"""LiNeS as its authors define it (docs/method.md, "LiNeS (faithful)"): α and λ_ℓ against hand
computations, the adapter against a straightforward re-computation, and the configs."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import fusion_bench
import pytest
import torch
from fusion_bench import BaseModelPool
from fusion_bench.method import SimpleAverageAlgorithm, TiesMergingAlgorithm
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from fusion_bench_larv.core.layers import group_layers
from fusion_bench_larv.core.settings import LarvConfigError
from fusion_bench_larv.core.veneer import apply_scales
from fusion_bench_larv.errors import LarvInputError, LarvWarning
from fusion_bench_larv.methods.lines import (
    l1_norm,
    lines_alpha,
    lines_param_scales,
    lines_scales,
    sum_task_vectors,
)
from fusion_bench_larv.methods.lines_algorithm import LiNeSAlgorithm

FB_CONFIG = str(Path(fusion_bench.__file__).resolve().parent.parent / "fusion_bench_config")
TA = "fusion_bench.method.TaskArithmeticAlgorithm"


# -- the pure functions, by hand -----------------------------------------------------------------
def test_alpha_by_hand():
    tau1 = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([[0.5]])}
    tau2 = {"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([[-1.5]])}
    mtv = {"a": torch.tensor([2.0, -1.0]), "b": torch.tensor([[-1.0]])}
    # Σ τ = a: [4, -1], b: [[-1]]  ->  ‖Σ τ‖₁ = 4 + 1 + 1 = 6
    # ‖τ_MTV‖₁ = 2 + 1 + 1 = 4;  T = 2  ->  α = 6 / (2 · 4) = 0.75
    assert lines_alpha([tau1, tau2], mtv) == 0.75
    summed, count = sum_task_vectors([tau1, tau2])
    assert count == 2 and l1_norm(summed.values()) == 6.0 and l1_norm(mtv.values()) == 4.0


def test_alpha_of_sum_and_of_average():
    taus = [{"w": torch.tensor([1.0, -2.0, 0.5])}, {"w": torch.tensor([0.0, 1.0, 2.5])},
            {"w": torch.tensor([-3.0, 1.0, 1.0])}]  # fmt: skip
    summed = {"w": taus[0]["w"] + taus[1]["w"] + taus[2]["w"]}  # [-2, 0, 4]
    assert lines_alpha(taus, summed) == pytest.approx(1 / 3)  # Task Arithmetic, coefficient 1
    assert lines_alpha(taus, {"w": summed["w"] / 3}) == pytest.approx(1.0)  # simple average


def test_alpha_errors():
    with pytest.raises(ValueError, match="τ_MTV = θ_merged − θ_0 is zero"):
        lines_alpha([{"w": torch.ones(2)}], {"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="at least one task vector"):
        lines_alpha([], {"w": torch.ones(2)})
    with pytest.raises(ValueError, match="other keys"):
        lines_alpha([{"w": torch.ones(2)}, {"v": torch.ones(2)}], {"w": torch.ones(2)})


def test_lambdas_by_hand():
    # L = 4, α = 0.5, β = 1: λ_ℓ = 0.5 + ℓ/3 for ℓ = 0, 1, 2, 3
    assert lines_scales(4, 0.5, 1.0) == pytest.approx([0.5, 0.5 + 1 / 3, 0.5 + 2 / 3, 1.5])
    assert lines_scales(2, 0.25, 0.0) == [0.25, 0.25]
    with pytest.raises(ValueError, match="at least 2 blocks"):
        lines_scales(1, 0.5, 1.0)
    with pytest.raises(ValueError, match="beta"):
        lines_scales(4, 0.5, float("nan"))


NAMES = ["embed.weight", "layers.0.w", "layers.0.b", "layers.1.w", "layers.2.w", "head.weight"]


def test_outside_blocks_get_alpha_and_blocks_the_ramp():
    groups = group_layers(NAMES)
    scales, lambdas = lines_param_scales(NAMES, groups, alpha=0.2, beta=0.6)
    assert lambdas == pytest.approx([0.2, 0.5, 0.8])  # 0.2 + 0.6 · ℓ/2
    assert scales == pytest.approx({"embed.weight": 0.2, "layers.0.w": 0.2, "layers.0.b": 0.2,
                                    "layers.1.w": 0.5, "layers.2.w": 0.8, "head.weight": 0.2})  # fmt: skip


def test_alpha_one_beta_zero_reproduces_the_sum_exactly():
    g = torch.Generator().manual_seed(0)
    theta0 = {n: torch.randn(3, 2, generator=g) for n in NAMES}
    taus = [{n: torch.randn(3, 2, generator=g) for n in NAMES} for _ in range(3)]
    merged = {n: theta0[n] + (taus[0][n] + taus[1][n] + taus[2][n]) for n in NAMES}
    expected = {n: t.clone() for n, t in merged.items()}
    scales, _ = lines_param_scales(NAMES, group_layers(NAMES), alpha=1.0, beta=0.0)
    apply_scales(theta0, merged, scales)
    for n in NAMES:
        assert torch.equal(merged[n], expected[n]), n  # bit for bit


# -- the adapter ---------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)


class Net(nn.Module):
    """Parameters outside the blocks before (embed) and after (head) them."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(2, 3)
        self.layers = nn.ModuleList(Block() for _ in range(4))
        self.head = nn.Linear(3, 2)


def tiny_pool(seed=0, tasks=3):
    torch.manual_seed(seed)
    pre = Net()
    models = {"_pretrained_": pre}
    for i in range(tasks):
        m = copy.deepcopy(pre)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
        models[f"t{i}"] = m
    return models


def fresh(models):
    return BaseModelPool({k: copy.deepcopy(v) for k, v in models.items()})


def sd(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def naive_lines(models, merged_base, beta, block_rx):
    """Straightforward LiNeS: flatten everything, α from the flat L1 norms, then every key in
    block i (the regex's group) scaled by α + β·i/(L−1), every other key by α."""
    theta0 = sd(models["_pretrained_"])
    keys = list(theta0)
    flat0 = torch.cat([theta0[k].double().reshape(-1) for k in keys])
    flat_t = [
        torch.cat([v.state_dict()[k].double().reshape(-1) for k in keys]) - flat0
        for n, v in models.items()
        if n != "_pretrained_"
    ]
    flat_m = torch.cat([merged_base[k].double().reshape(-1) for k in keys]) - flat0
    alpha = float(torch.stack(flat_t).sum(0).abs().sum() / (len(flat_t) * flat_m.abs().sum()))
    idx = {k: int(m.group(1)) for k in keys if (m := re.search(block_rx, k))}
    num = max(idx.values()) + 1
    out = {}
    for k in keys:
        lam = alpha + beta * idx[k] / (num - 1) if k in idx else alpha
        out[k] = theta0[k].double() + lam * (merged_base[k].double() - theta0[k].double())
    return out, alpha


def test_end_to_end_task_arithmetic_tiny_model(tmp_path):
    models = tiny_pool()
    alg = LiNeSAlgorithm(base_method={"_target_": TA, "scaling_factor": 1.0}, beta=0.7,
                         report_dir=tmp_path)  # fmt: skip
    out = alg.run(fresh(models))
    theta0 = sd(models["_pretrained_"])
    summed = {k: theta0[k] + sum(sd(models[f"t{i}"])[k] - theta0[k] for i in range(3))
              for k in theta0}  # fmt: skip
    expected, alpha = naive_lines(models, summed, 0.7, r"^layers\.(\d+)\.")
    assert alpha == pytest.approx(1 / 3, rel=1e-5)  # τ_MTV = Σ τ_t
    assert alg.last_report["alpha"] == pytest.approx(alpha, rel=1e-6)
    got = out.state_dict()
    for k in expected:
        torch.testing.assert_close(got[k].double(), expected[k], rtol=1e-5, atol=1e-6)
    # outside the blocks: θ_0 + α·τ_MTV
    for k in ("embed.weight", "head.bias"):
        torch.testing.assert_close(got[k], theta0[k] + alpha * (summed[k] - theta0[k]))
    report = json.loads((tmp_path / "lines_layers.json").read_text())
    assert report == json.loads(json.dumps(alg.last_report))
    assert report["beta"] == 0.7 and report["num_tasks"] == 3 and report["num_blocks"] == 4
    assert [b["lambda"] for b in report["blocks"]] == pytest.approx(
        [alpha + 0.7 * i / 3 for i in range(4)], rel=1e-6
    )
    assert report["outside_blocks"]["parameters"] == [
        "embed.weight", "embed.bias", "head.weight", "head.bias"
    ]  # fmt: skip


def test_a_reused_base_merge_gives_the_same_model_and_is_left_untouched():
    models = tiny_pool(seed=3)
    base = {"_target_": TA, "scaling_factor": 1.0}
    want = LiNeSAlgorithm(base_method=base, beta=0.7).run(fresh(models)).state_dict()
    base_merge = instantiate(base).run(fresh(models))
    kept = copy.deepcopy(base_merge.state_dict())
    alg = LiNeSAlgorithm(base_method=base, beta=0.7)
    got = alg.run(fresh(models), base_merge=base_merge).state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
        assert torch.equal(base_merge.state_dict()[k], kept[k])  # rescaled a copy
    assert alg.last_report["base_merge"] == "reused"


def test_beta_zero_over_task_arithmetic_is_the_simple_average():
    models = tiny_pool(seed=1)
    out = LiNeSAlgorithm(base_method={"_target_": TA, "scaling_factor": 1.0}, beta=0.0).run(
        fresh(models)
    )
    avg = SimpleAverageAlgorithm().run(fresh(models))
    for k, v in avg.state_dict().items():
        torch.testing.assert_close(out.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_coefficient_other_than_one_warns_and_acts_as_scaled_beta():
    models = tiny_pool(seed=2)
    with pytest.warns(LarvWarning, match="acts as β = 0.5·0.8"):
        half = LiNeSAlgorithm(base_method={"_target_": TA, "scaling_factor": 0.5}, beta=0.8)
        got = half.run(fresh(models)).state_dict()
    ref = LiNeSAlgorithm(base_method={"_target_": TA, "scaling_factor": 1.0}, beta=0.4)
    want = ref.run(fresh(models)).state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def clip_models():
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        image_size=32, patch_size=8,
    )  # fmt: skip
    pre = CLIPVisionModel(cfg).eval()
    models = {"_pretrained_": pre}
    for i in range(3):
        m = copy.deepcopy(pre)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        models[f"t{i}"] = m
    return models


def test_end_to_end_ties_mean_on_tiny_clip(clip_models):
    base = {"_target_": "fusion_bench.method.TiesMergingAlgorithm", "scaling_factor": 1.0,
            "threshold": 20, "merge_func": "mean", "remove_keys": []}  # fmt: skip
    alg = LiNeSAlgorithm(base_method=base, beta=1.0)
    out = alg.run(fresh(clip_models))
    ties = TiesMergingAlgorithm(scaling_factor=1.0, threshold=20, remove_keys=[], merge_func="mean")
    merged_base = sd(ties.run(fresh(clip_models)))
    expected, alpha = naive_lines(clip_models, merged_base, 1.0, r"encoder\.layers\.(\d+)\.")
    assert alg.last_report["alpha"] == pytest.approx(alpha, rel=1e-5)
    assert alg.last_report["num_blocks"] == 4
    got = out.state_dict()
    for k, v in expected.items():
        if got[k].is_floating_point():
            torch.testing.assert_close(got[k].double(), v, rtol=1e-5, atol=1e-6)
    outside = set(alg.last_report["outside_blocks"]["parameters"])
    assert "vision_model.embeddings.patch_embedding.weight" in outside
    assert "vision_model.post_layernorm.weight" in outside


def test_construction_errors():
    base = {"_target_": TA, "scaling_factor": 1.0}
    with pytest.raises(LarvConfigError, match="needs `beta`"):
        LiNeSAlgorithm(base_method=base)
    with pytest.raises(LarvConfigError, match="β ≥ 0"):
        LiNeSAlgorithm(base_method=base, beta=-0.1)
    with pytest.raises(LarvConfigError, match="`bta`.*did you mean `beta`"):
        LiNeSAlgorithm(base_method=base, beta=0.5, bta=1)
    with pytest.raises(LarvConfigError, match="base_method"):
        LiNeSAlgorithm(beta=0.5)


def test_merger_that_changes_nothing_is_a_clear_error():
    models = tiny_pool()
    alg = LiNeSAlgorithm(base_method={"_target_": TA, "scaling_factor": 0.0}, beta=0.5)
    with pytest.warns(LarvWarning), pytest.raises(LarvInputError, match="τ_MTV .* is zero"):
        alg.run(fresh(models))


# -- configs -------------------------------------------------------------------------------------
@pytest.fixture
def hydra_ctx():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=FB_CONFIG, version_base=None):
        yield
    GlobalHydra.instance().clear()


POOLS = [
    "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8",
    "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
]


@pytest.mark.parametrize(
    ("overrides", "cls", "hparams"),
    [
        (["method=lines_ta"], "TaskArithmeticAlgorithm", {"scaling_factor": 1.0}),
        (["method=lines_ties"], "TiesMergingAlgorithm",
         {"scaling_factor": 1.0, "threshold": 20, "merge_func": "mean"}),
        (["method=lines", "method@method.base_method=ties_merging"], "TiesMergingAlgorithm",
         {"threshold": 20}),
    ],
)  # fmt: skip
def test_configs_compose_and_instantiate(hydra_ctx, overrides, cls, hparams):
    cfg = compose(config_name="fabric_model_fusion", overrides=[*overrides, *POOLS])
    assert cfg.method.beta is None  # no default: the authors choose β on validation data
    with pytest.raises(Exception, match="needs `beta`"):
        instantiate(cfg.method, _recursive_=False)
    cfg = compose(config_name="fabric_model_fusion",
                  overrides=[*overrides, *POOLS, "method.beta=0.5"])  # fmt: skip
    alg = instantiate(cfg.method, _recursive_=False)
    assert isinstance(alg, LiNeSAlgorithm) and alg.beta == 0.5
    assert alg.report_name == "lines_layers.json" and alg.layer_pattern is None
    base = instantiate(cfg.method.base_method, _recursive_=False)
    assert type(base).__name__ == cls
    for key, value in hparams.items():
        assert cfg.method.base_method[key] == value


def test_signed_depth_ramp_config_takes_a_negative_beta(hydra_ctx):
    # the labelled extension (not LiNeS): its own method config, β of either sign
    from fusion_bench_larv import SignedDepthRamp

    over = ["method=signed_depth_ramp", "method@method.base_method=task_arithmetic",
            "method.base_method.scaling_factor=1.0", "method.beta=-0.5", *POOLS]  # fmt: skip
    alg = instantiate(compose(config_name="fabric_model_fusion", overrides=over).method,
                      _recursive_=False)  # fmt: skip
    assert type(alg) is SignedDepthRamp and alg.beta == -0.5
    assert alg.report_name == "signed_depth_ramp_layers.json"
