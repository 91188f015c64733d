"""`fusion_bench method=larv_wudi` end to end on the tiny CLIP suite: WUDI optimises with autograd
inside LARV (a shortened ``iter_num``; FusionBench's default is 400), the saved model is LARV over
WUDI as computed in process, and the report is its accuracy."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import CLIPVisionModel

from fusion_bench_larv import LARVAlgorithm
from larv_lab.testbed.tiny_clip import run_fusion_bench, zero_shot_accuracy

pytestmark = pytest.mark.slow

ITERS = 5
WUDI = {"_target_": "fusion_bench.method.WUDIMerging", "iter_num": ITERS, "exclude_keys": None}


def test_cli_larv_wudi(tiny_clip_suite, tmp_path):
    log_dir = tmp_path / "logs"
    report = run_fusion_bench(
        [
            *tiny_clip_suite.cli_args(),
            "method=larv_wudi",
            f"method.base_method.iter_num={ITERS}",
            f"merged_model_save_path={tmp_path / 'merged'}",
        ],
        cwd=tmp_path,
        log_dir=log_dir,
    )
    saved = CLIPVisionModel.from_pretrained(str(tmp_path / "merged")).state_dict()
    layers = json.loads((log_dir / "larv_layers.json").read_text())
    assert layers["base_method"]["_target_"] == WUDI["_target_"]
    assert layers["base_method"]["iter_num"] == ITERS
    assert layers["settings"]["gate"] == "tiered"

    pool = instantiate(OmegaConf.load(tiny_clip_suite.modelpool_config_path), _recursive_=False)
    larv = LARVAlgorithm(base_method=WUDI)
    ours = larv.run(pool).state_dict()
    for k, v in saved.items():
        torch.testing.assert_close(v, ours[k], rtol=1e-6, atol=1e-6)
    assert [r["s"] for r in larv.last_report["layers"]] == [r["s"] for r in layers["layers"]]

    # WUDI did optimise: its 2-D updates moved away from its starting point, the task-vector sum
    pre = pool.load_pretrained_model().state_dict()
    fts = [pool.load_model(t).state_dict() for t in pool.model_names]
    wudi = LARVAlgorithm(base_method=WUDI, gate="schedule", schedule="uniform",
                         schedule_scales=[1.0]).run(pool).state_dict()  # fmt: skip
    key = next(k for k, v in pre.items() if v.dim() == 2 and "layers.0." in k)
    start = pre[key] + sum(ft[key] - pre[key] for ft in fts)
    assert not torch.allclose(wudi[key], start, atol=1e-7)

    for task in tiny_clip_suite.tasks:
        model = CLIPVisionModel.from_pretrained(str(tmp_path / "merged"))
        acc = zero_shot_accuracy(tiny_clip_suite, task, model)
        assert report[task]["accuracy"] == pytest.approx(acc, abs=1e-6)
