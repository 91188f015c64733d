"""``larv-mergekit`` without mergekit (docs/mergekit.md): mergekit's merged update on hand-derived
cases, the ``lambda`` setting read the way mergekit 0.1.4 reads it, and the command on tiny random
Llamas against LARV run on the same models loaded by transformers. mergekit itself runs in the
lab's opt-in test (lab/tests/test_mergekit_e2e.py)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from tiny_llama import LAYERS, save_tiny_llamas

from fusion_bench_larv.core.mergekit import lambda_setting, magnitude_trim, merged_update
from fusion_bench_larv.core.settings import LarvSettings
from fusion_bench_larv.core.veneer import compute_larv_scales
from fusion_bench_larv.errors import LarvInputError
from fusion_bench_larv.export.mergekit import main

T = torch.tensor


# -- mergekit's merged update, by hand -------------------------------------------------------------
def test_magnitude_trim_keeps_the_largest_entries_of_the_tensor():
    d = T([[0.1, -0.5], [0.3, -0.2]])
    assert torch.equal(magnitude_trim(d, 0.5), T([[0.0, -0.5], [0.3, 0.0]]))  # k = ⌊0.5·4⌋ = 2
    assert torch.equal(magnitude_trim(d, 0.3), T([[0.0, -0.5], [0.0, 0.0]]))  # k = ⌊1.2⌋ = 1
    assert magnitude_trim(d, 1.0) is d
    with pytest.raises(LarvInputError, match="0 entries of tensor 'w'"):
        magnitude_trim(d, 0.2, "w")  # ⌊0.8⌋ = 0: mergekit asserts k > 0


def test_ties_elects_the_sign_of_the_sum_and_averages_the_agreeing_entries():
    d1, d2, d3 = T([1.0, -2.0, 0.0, 3.0]), T([-1.0, -1.0, 2.0, 1.0]), T([2.0, 1.0, 0.0, -5.0])
    # sums [2, -2, 2, -1]: signs + − + −; a zero entry agrees with no sign
    got = merged_update("ties", [d1, d2, d3], [1.0, 1.0, 1.0])
    assert torch.allclose(got, T([1.5, -1.5, 2.0, -5.0]))
    # weights 2, 1, 1: weighted sums [3, −4, 2, 2]; u = Σ w δ [agree] / Σ w [agree]
    got = merged_update("ties", [d1, d2, d3], [2.0, 1.0, 1.0])
    assert torch.allclose(got, T([4 / 3, -5 / 3, 2.0, 7 / 3]))
    # a zero sum elects +; nothing agreeing leaves 0 (divisor read as 1)
    assert torch.equal(
        merged_update("ties", [T([1.0, 0.0]), T([-1.0, 0.0])], [1.0, 1.0]), T([1.0, 0.0])
    )


def test_ties_trims_each_tensor_before_the_election():
    d1, d2 = T([4.0, -1.0, 0.5, 0.1]), T([-3.0, 2.0, -0.2, 0.3])
    # density 0.5: d1 keeps 4, −1; d2 keeps −3, 2; sums [1, 1, 0, 0] elect +
    got = merged_update("ties", [d1, d2], [1.0, 1.0], density=0.5)
    assert torch.equal(got, T([4.0, 2.0, 0.0, 0.0]))


def test_task_arithmetic_is_the_weighted_sum():
    got = merged_update("task_arithmetic", [T([1.0, -2.0]), T([3.0, 1.0])], [0.5, 2.0])
    assert torch.allclose(got, T([6.5, 1.0]))


# -- the lambda setting, read as mergekit 0.1.4 reads it ----------------------------------------------
def mergekit_value(setting, name: str, t: float):
    """mergekit 0.1.4's ``config.evaluate_setting``: the first entry whose filter is a substring
    of the name (no filter: any name); a list of numbers interpolated linearly at t."""
    for entry in setting:
        if entry.get("filter") is None or entry["filter"] in name:
            value = entry["value"]
            if isinstance(value, list):
                x = t * (len(value) - 1)
                i0 = int(x)
                i1 = min(len(value) - 1, i0 + 1)
                return (1 - (x - i0)) * value[i0] + (x - i0) * value[i1]
            return value
    return None


def llama_names(layers: int) -> tuple[list[str], list[list[str]]]:
    blocks = [[f"model.layers.{i}.{p}.weight" for p in ("input_layernorm", "self_attn.q_proj",
                                                         "mlp.down_proj")] for i in range(layers)]  # fmt: skip
    return [f"model.layers.{i}." for i in range(layers)], blocks


@pytest.mark.parametrize("base_lambda", [1.0, 0.7])
def test_every_tensor_reads_its_own_scale(base_lambda):
    prefixes, blocks = llama_names(5)
    s = [0.5, 1.5, 1.0, 0.5, 1.5]
    param_scale = {n: s[i] for i, b in enumerate(blocks) for n in b}
    param_scale |= {"model.embed_tokens.weight": s[0], "model.norm.weight": s[-1],
                    "lm_head.weight": s[-1]}  # fmt: skip
    setting = lambda_setting(prefixes, blocks, param_scale, base_lambda)
    assert [e.get("filter") for e in setting] == [
        "model.embed_tokens",
        "model.norm",
        "lm_head",
        None,
    ]
    for i, block in enumerate(blocks):  # the planner reads layer i at t = i / (L − 1)
        for name in block:
            assert mergekit_value(setting, name, i / 4) == pytest.approx(base_lambda * s[i])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        # outside tensors are read at t = 0: without their filter they would get s_1
        assert mergekit_value(setting, name, 0.0) == base_lambda * param_scale[name]


def test_a_setting_that_cannot_be_written_is_refused():
    prefixes, blocks = llama_names(3)
    scale = {n: 1.0 for b in blocks for n in b}
    with pytest.raises(LarvInputError, match="one stack of layers"):  # T5: two stacks
        lambda_setting(["encoder.block.0.", "encoder.block.1.", "decoder.block.0."],
                       blocks, scale)  # fmt: skip
    with pytest.raises(LarvInputError, match="2 scales"):
        lambda_setting(prefixes, blocks, {**scale, blocks[1][0]: 0.5})


# -- the command on tiny Llamas --------------------------------------------------------------------
def _state(folder) -> dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder).state_dict()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_command_writes_larvs_scales_of_the_merge(tmp_path, tied):
    base, models = save_tiny_llamas(tmp_path, tied=tied)
    out, report = tmp_path / "merge.yaml", tmp_path / "larv.json"
    rc = main([str(base), *map(str, models), "-o", str(out), "--weight", "0.3",
               "--report", str(report)])  # fmt: skip
    assert rc == 0
    config = yaml.safe_load(out.read_text())
    assert config["merge_method"] == "task_arithmetic" and config["dtype"] == "float32"
    assert config["base_model"] == str(base.resolve())
    assert [m["model"] for m in config["models"]] == [str(m.resolve()) for m in models]
    assert all(m["parameters"] == {"weight": 0.3} for m in config["models"])
    assert config["parameters"]["normalize"] is False

    # the oracle: LARV on the models as transformers loads them, merged as Task Arithmetic
    theta0 = _state(base)
    tvs = [{k: v - theta0[k] for k, v in _state(m).items()} for m in models]
    merged = {k: theta0[k] + 0.3 * sum(tv[k] for tv in tvs) for k in theta0}
    if tied:  # one tensor under two names, as in the loaded model
        merged["lm_head.weight"] = merged["model.embed_tokens.weight"]
    want = compute_larv_scales(theta0, merged, LarvSettings())
    assert len(set(want.scales)) > 1  # the blocks differ: a list that ignored them would fail
    setting = config["parameters"]["lambda"]
    assert setting[-1] == {"value": want.scales}
    for name, s in want.param_scale.items():
        layer = int(name.split(".")[2]) if ".layers." in name else 0
        assert mergekit_value(setting, name, layer / (LAYERS - 1)) == pytest.approx(s, abs=1e-12)
    # the head follows the last block, or the embedding it is tied to
    head = want.scales[0] if tied else want.scales[-1]
    assert mergekit_value(setting, "lm_head.weight", 0.0) == head
    assert [rec["s"] for rec in json.loads(report.read_text())["layers"]] == want.scales


def test_ties_and_bad_options(tmp_path, capsys):
    base, models = save_tiny_llamas(tmp_path, tasks=2)
    out = tmp_path / "ties.yaml"
    args = [str(base), *map(str, models), "-o", str(out), "--method", "ties"]
    assert main(args) == 2
    assert "ties needs --density" in capsys.readouterr().err
    assert main([*args, "--density", "0.5", "--set", "placement=task_vectors"]) == 2
    assert "placement: merged" in capsys.readouterr().err
    assert main([*args, "--density", "0.5", "--lambda", "0.8", "--set", "gate=continuous"]) == 0
    config = yaml.safe_load(out.read_text())
    assert config["parameters"]["normalize"] is True
    assert all(m["parameters"] == {"weight": 1.0, "density": 0.5} for m in config["models"])
    layers = config["parameters"]["lambda"][-1]["value"]
    assert len(layers) == LAYERS and all(0.8 * 0.5 <= v <= 0.8 * 1.5 for v in layers)
