"""End to end through the real `fusion_bench` CLI (subprocess), offline, on the tiny CLIP suite:
FusionBench's model pool loads the fine-tuned towers from disk, LARV wraps the base merger, the
merged model is saved and evaluated by `CLIPVisionModelTaskPool`, and the reports are read back
and checked against an independent recomputation from the saved models. The generic route
(`method=larv method@method.base_method=<option>`) runs FusionBench's own method configs (Task
Arithmetic) and refuses EMR by name before writing anything. DARE's seeded drops under LARV, bit for
bit, are checked in process (tests/test_algorithm.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionModel

from fusion_bench_larv.core.settings import LarvSettings
from fusion_bench_larv.core.veneer import compute_larv_scales
from larv_lab.testbed.tiny_clip import run_fusion_bench

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(suite, method_args, log_dir: Path, cwd: Path) -> dict:
    args = [
        *suite.cli_args(),
        *method_args,
        f"merged_model_save_path={log_dir / 'merged'}",
    ]
    return run_fusion_bench(args, cwd=cwd, log_dir=log_dir)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return CLIPVisionModel.from_pretrained(str(path)).state_dict()


@pytest.fixture(scope="module")
def base_run(ta_cli_run):
    return ta_cli_run  # conftest.py: `fusion_bench method=task_arithmetic`, once per test run


def _generic(option: str) -> list[str]:
    """The generic route: LARV over FusionBench's method config ``option``, chosen with one
    override (config/method/larv.yaml)."""
    return ["method=larv", f"method@method.base_method={option}"]


# the named config, and the generic route over FusionBench's own task_arithmetic.yaml (the same
# scaling factor, 0.3)
ROUTES = {"larv_ta": ["method=larv_ta"], "generic": _generic("task_arithmetic")}


# each CLI run costs seconds of FusionBench's start-up: two runs cover both gates, both working
# directories and both routes
@pytest.mark.parametrize(
    ("gate", "cwd", "route"), [("tiered", "repo", "larv_ta"), ("continuous", "tmp", "generic")]
)
def test_larv_ta_cli_run_writes_correct_layer_report(
    tiny_clip_suite, base_run, tmp_path, gate, cwd, route
):
    base_dir, base_report = base_run
    log_dir = tmp_path / "larv"
    report = _run(
        tiny_clip_suite,
        [*ROUTES[route], f"method.gate={gate}"],
        log_dir,
        REPO if cwd == "repo" else tmp_path,
    )
    tasks = list(tiny_clip_suite.tasks)
    for rep in (report, base_report):
        for task in tasks:
            assert 0.0 <= rep[task]["accuracy"] <= 1.0
    # the per-layer report sits next to FusionBench's report
    layers_path = log_dir / "larv_layers.json"
    assert (log_dir / "program_report.json").is_file() and layers_path.is_file()
    larv = json.loads(layers_path.read_text())
    assert larv["settings"]["gate"] == gate
    assert larv["base_method"]["_target_"] == "fusion_bench.method.TaskArithmeticAlgorithm"
    assert larv["num_layers"] == tiny_clip_suite.num_layers == len(larv["layers"])

    # independent recomputation from the saved models: θ_0, the base merge, the LARV merge
    theta0 = _state(tiny_clip_suite.pretrained_path)
    base = _state(base_dir / "merged")
    got = _state(log_dir / "merged")
    expected = compute_larv_scales(theta0, base, LarvSettings(gate=gate), progress=False)
    for rec, exp in zip(larv["layers"], expected.layers, strict=True):
        assert rec["prefix"] == exp.prefix
        for key in ("e", "c", "r", "w", "s"):
            assert rec[key] == pytest.approx(getattr(exp, key), rel=1e-5, abs=1e-7), (
                rec["index"],
                key,
            )
    scales = [rec["s"] for rec in larv["layers"]]
    if gate == "tiered":
        assert sorted(set(scales)) == [0.5, 1.0, 1.5]
    outside = {o["name"]: o for o in larv["outside_blocks"]}
    assert outside["vision_model.post_layernorm.weight"]["layer"] == larv["num_layers"]
    assert outside["vision_model.embeddings.patch_embedding.weight"]["layer"] == 1
    for name, t0 in theta0.items():
        if not t0.is_floating_point():
            continue
        s = next((r["s"] for r in larv["layers"] if name.startswith(r["prefix"])), None)
        s = outside[name]["scale"] if s is None else s
        torch.testing.assert_close(got[name], t0 + s * (base[name] - t0), rtol=0, atol=1e-6)


# the named config whose FusionBench original saves its own checkpoint (under LARV it must not);
# the plugin's tests run every merger bit for bit under LARV in process (tests/test_algorithm.py,
# DARE's random drops with the same seed included) and compose every config
# (tests/test_configs.py), and the generic route runs above
@pytest.mark.parametrize("method", ["larv_model_stock"])
def test_other_larv_methods_run_through_the_cli(tiny_clip_suite, tmp_path, method):
    report = _run(tiny_clip_suite, [f"method={method}"], tmp_path, tmp_path)
    assert all(0.0 <= report[t]["accuracy"] <= 1.0 for t in tiny_clip_suite.tasks)
    larv = json.loads((tmp_path / "larv_layers.json").read_text())
    assert len(larv["layers"]) == tiny_clip_suite.num_layers
    # Model Stock's own checkpoint of the un-rescaled merge is off under LARV
    assert not (tmp_path / "checkpoint").exists()


def test_generic_route_refuses_emr_by_name_and_writes_nothing(tiny_clip_suite, tmp_path):
    # EMR returns a task-modulated wrapper, not one model of the pretrained architecture
    log_dir = tmp_path / "emr"
    with pytest.raises(RuntimeError) as err:
        _run(tiny_clip_suite, _generic("emr_merging/emr_merging"), log_dir, tmp_path)
    text = " ".join(str(err.value).split())  # rich wraps the traceback's lines
    assert (
        "LarvInputError: LARV cannot rescale the output of the base merger EMRMerging "
        "(fusion_bench.method.emr_merging.EMRMerging): it returned EMRModulatedModel "
        "(fusion_bench.method.emr_merging.utils.EMRModulatedModel), not one model of the "
        "pretrained architecture (CLIPVisionModel)" in text
    )
    # only Hydra's own files of the run's start: no report, no layer report, no model
    assert {p.name for p in log_dir.iterdir()} <= {
        "cli.log", "config.yaml", "hydra.yaml", "overrides.yaml",
    }  # fmt: skip
