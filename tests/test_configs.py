"""The public config interface: every `larv_*` method composes with FusionBench's own pools for
all nine paper suites and instantiates offline; the `fusion_bench` CLI finds our configs with no
extra flag from the repository root and from an unrelated directory."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import fusion_bench
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from fusion_bench_larv import LARVAlgorithm, lot_algorithm
from fusion_bench_larv.core.settings import LarvSettings

REPO = Path(__file__).resolve().parents[1]
FB_CONFIG = str(Path(fusion_bench.__file__).resolve().parent.parent / "fusion_bench_config")
METHODS = {
    "larv_ta": ("TaskArithmeticAlgorithm", {"scaling_factor": 0.3}),
    "larv_ties": (
        "TiesMergingAlgorithm",
        {"scaling_factor": 0.3, "threshold": 20, "merge_func": "sum"},
    ),
    "larv_iso_c": ("ISO_C_Merge", {}),  # scaling depends on the backbone, checked below
    "larv_iso_cts": ("ISO_CTS_Merge", {"scaling_factor": 1.5, "common_space_fraction": 0.8}),
    "larv_tsvm": ("TaskSingularVectorMerging", {"alpha": 1}),
    "larv_wudi": ("WUDIMerging", {"iter_num": 400}),
    "larv_simple_average": ("SimpleAverageAlgorithm", {}),
    # this package's LOT Merging (not in fusion_bench.method)
    "larv_lot": ("LOTMergingAlgorithm", {"num_exemplars": 32, "regularization": "pinv"}),
    # opt-in mergers beyond the paper's, with FusionBench's own defaults
    "larv_dare_ta": ("DareTaskArithmetic", {"scaling_factor": 0.3, "sparsity_ratio": 0.5}),
    "larv_dare_ties": (
        "DareTiesMerging",
        {"scaling_factor": 0.5, "sparsity_ratio": 0.5, "threshold": 20, "merge_func": "sum"},
    ),
    "larv_dare_simple_average": ("DareSimpleAverage", {"sparsity_ratio": 0.5}),
    "larv_magmax": ("MagMaxAlgorithm", {"scaling_factor": 0.5}),
    # no checkpoint of the un-rescaled base merge (FusionBench's config saves one)
    "larv_model_stock": ("ModelStock", {"model_save_path": None}),
    "larv_doge_ta": ("DOGE_TA_Algorithm", {"subspace": 6, "K": 30, "lamda": 0.07}),
    # FusionBench's causal-LM mergers: they save their merge (LARV holds that back and saves the
    # rescaled model there instead, docs/causal-lm.md)
    "larv_ta_for_causallm": (
        "TaskArithmeticForCausalLM",
        {"scaling_factor": 0.3, "model_save_path": "LOG/checkpoint"},
    ),
    "larv_ties_for_causallm": (
        "TiesMergingForCausalLM",
        {
            "scaling_factor": 0.3,
            "threshold": 20,
            "merge_func": "sum",
            "model_save_path": "LOG/checkpoint",
        },
    ),  # fmt: skip
    "larv_simple_average_for_causallm": (
        "SimpleAverageForCausalLM",
        {"merge_backbone": False, "model_save_path": "LOG/checkpoint"},
    ),
    # not exported by fusion_bench.method: its dotted path
    "larv_svc_ta": (
        "fusion_bench.method.singular_value_calibration.task_arithmetic."
        "SingularValueCalibrationArithmeticTask",
        {"scaling_factor": 0.3, "alpha": 0.1},
    ),
}
# `fusion_bench --cfg job`, a subprocess of seconds, once per working directory: the in-process
# composes above cover every config's content; the CLI checks that it finds our configs at all,
# with no extra flag, from the repo root (whose config/ folder FusionBench makes its primary
# config path) and from elsewhere. (overrides, the wrapped merger's `_target_`) per directory: a
# named config whose FusionBench original saves a checkpoint, and the generic route (LARV over any
# FusionBench method config)
CLI_CASES = {
    "elsewhere": (["method=larv_model_stock"], "fusion_bench.method.model_stock.ModelStock"),
    "repo_root": (
        ["method=larv", "method@method.base_method=dare/ties_merging"],
        "fusion_bench.method.dare.DareTiesMerging",
    ),
}  # fmt: skip
BACKBONES = {"base-patch32": 1.30, "base-patch16": 1.40, "large-patch14": 1.50}
TASKPOOL = {
    ("base-patch32", "TA8"): "TA8",
    ("base-patch16", "TA8"): "TA8_B16",
    ("large-patch14", "TA8"): "TA8_L14",
}
SUITES = [(b, t) for b in BACKBONES for t in ("TA8", "TALL14", "TALL20")]


@pytest.fixture(scope="module")
def hydra_ctx():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=FB_CONFIG, version_base=None):
        yield
    GlobalHydra.instance().clear()


@pytest.mark.parametrize(("backbone", "tasks"), SUITES)
def test_suite_composes_and_instantiates_every_method(hydra_ctx, backbone, tasks):
    n_tasks = {"TA8": 8, "TALL14": 14, "TALL20": 20}[tasks]
    # every method on one suite; on the others the one method that reads a suite value (Iso-C's
    # scaling) and Task Arithmetic: the suite's pools do not depend on the method
    first = (backbone, tasks) == SUITES[0]
    for method, (cls_name, hparams) in METHODS.items():
        if not first and method not in ("larv_ta", "larv_iso_c"):
            continue
        cfg = compose(
            config_name=f"larv_clip-vit-{backbone}_{tasks}",
            overrides=[f"method={method}", "path.log_dir=LOG"],  # the CLI's run dir, outside it
        )
        # the suite pairs FusionBench's model pool with the matching task pool and backbone
        assert cfg.modelpool.models._pretrained_ == f"openai/clip-vit-{backbone}"
        assert len([m for m in cfg.modelpool.models if m != "_pretrained_"]) == n_tasks
        assert len(cfg.taskpool.test_datasets) == n_tasks
        assert cfg.taskpool.base_model == f"openai/clip-vit-{backbone}"
        assert set(cfg.taskpool.test_datasets) == set(cfg.modelpool.test_datasets)

        alg = instantiate(cfg.method, _recursive_=False)
        assert isinstance(alg, LARVAlgorithm)
        assert alg.settings == LarvSettings()  # the paper's defaults: tiered gate, η=1, ρ=.5, ζ=1
        base = alg.build_base_method()
        if "." in cls_name:
            module, _, attr = cls_name.rpartition(".")
            expected = getattr(importlib.import_module(module), attr)
        else:
            expected = getattr(fusion_bench.method, cls_name, None) or getattr(
                lot_algorithm, cls_name
            )
        assert type(base) is expected
        for key, value in hparams.items():
            assert getattr(base, key) == value, (method, key)
        if method == "larv_iso_c":
            assert base.scaling_factor == pytest.approx(BACKBONES[backbone])


def test_plain_method_override_uses_paper_defaults(hydra_ctx):
    cfg = compose(
        config_name="fabric_model_fusion",
        overrides=[
            "method=larv_iso_c",
            "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8",
            "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
            "method.gate=continuous",
        ],
    )
    alg = instantiate(cfg.method, _recursive_=False)
    assert alg.settings.gate == "continuous"
    assert alg.build_base_method().scaling_factor == pytest.approx(1.30)


def _fusion_bench_cfg_job(cwd: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("fusion_bench")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HYDRA_FULL_ERROR="1")
    return subprocess.run(
        [
            str(exe), "--cfg", "job", *overrides,
            "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8",
            "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
        ],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("where", list(CLI_CASES))
def test_cli_composes_with_no_extra_flag(where, tmp_path):
    cwd = REPO if where == "repo_root" else tmp_path
    overrides, target = CLI_CASES[where]
    proc = _fusion_bench_cfg_job(cwd, overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "_target_: fusion_bench_larv.LARVAlgorithm" in out
    assert f"_target_: {target}" in out
    assert "gate: tiered" in out
    # Model Stock's own checkpoint of its (un-rescaled) merge, ${path.log_dir}/checkpoint in
    # FusionBench's config, is off under LARV: the program saves LARV's model
    assert "/checkpoint" not in out


def test_generic_route_asks_for_the_merger(hydra_ctx):
    # `method=larv` alone: Hydra names the one override that picks the merger
    with pytest.raises(Exception, match="You must specify 'method@method.base_method'"):
        compose(config_name="fabric_model_fusion", overrides=["method=larv"])
