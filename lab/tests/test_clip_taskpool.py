"""The recording CLIP task pool (fusion_bench_larv.evaluation.clip_taskpool): FusionBench's report number for
number, plus per-sample correctness whose mean is the reported accuracy; its configs are
FusionBench's but for the class; through the CLI its per_sample.json lands beside the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fusion_bench_larv.evaluation import per_sample
from fusion_bench_larv.evaluation.clip_taskpool import RecordingCLIPVisionModelTaskPool

RECORDING = "fusion_bench_larv.RecordingCLIPVisionModelTaskPool"


@pytest.mark.parametrize("tasks", ["TA8", "TALL14", "TALL20"])
def test_recording_configs_are_fusion_benchs_but_for_the_class(tasks):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from larv_lab.reproduce.registry import fusion_bench_config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(fusion_bench_config_dir()), version_base=None):
        ours, theirs = (
            OmegaConf.to_container(
                compose("fabric_model_fusion", overrides=[f"taskpool={choice}"]).taskpool
            )
            for choice in (
                f"CLIPVisionModelTaskPool/larv_recording_{tasks}",
                f"CLIPVisionModelTaskPool/clip-vit-classification_{tasks}",
            )
        )
    GlobalHydra.instance().clear()
    assert ours.pop("_target_") == RECORDING
    assert theirs.pop("_target_") == "fusion_bench.taskpool.CLIPVisionModelTaskPool"
    assert ours == theirs


def _pools(suite):
    import lightning as L
    from fusion_bench import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(suite.taskpool_config_path)
    pools = []
    for target in ("fusion_bench.taskpool.CLIPVisionModelTaskPool", RECORDING):
        cfg._target_ = target
        pool = instantiate(cfg, _recursive_=False)
        pool._fabric_instance = L.Fabric(accelerator="cpu", devices=1)
        pools.append(pool)
    return pools


def test_same_report_and_per_sample_correctness(tiny_clip_suite):
    from transformers import CLIPVisionModel

    plain, recording = _pools(tiny_clip_suite)
    assert isinstance(recording, RecordingCLIPVisionModelTaskPool)
    tasks = list(tiny_clip_suite.tasks)
    for model_path in (tiny_clip_suite.pretrained_path, tiny_clip_suite.finetuned_paths[tasks[0]]):
        model = CLIPVisionModel.from_pretrained(str(model_path)).eval()
        want = plain.evaluate(model)
        got = recording.evaluate(model)
        assert got == want  # FusionBench's numbers, unchanged
    evaluations = per_sample.take(recording)
    assert len(evaluations) == 2 and per_sample.take(recording) == []
    for t in tasks:
        entry = evaluations[-1][t]
        labels = np.asarray(tiny_clip_suite.load_dataset(t, "test")["label"])
        assert entry["n"] == len(labels)
        assert entry["labels_sha256"] == per_sample.labels_digest(labels)
        correct = per_sample.decode_task(entry)
        # the mean of the recorded correctness is the reported accuracy (torchmetrics: float32)
        assert correct.mean() == pytest.approx(got[t]["accuracy"], abs=1e-6)
    assert 0 < sum(int(evaluations[-1][t]["correct"]) for t in tasks)


@pytest.mark.slow
def test_cli_writes_per_sample_beside_the_report(tiny_clip_suite, tmp_path):
    from larv_lab.testbed.tiny_clip import run_fusion_bench

    log_dir = tmp_path / "logs"
    report = run_fusion_bench(
        [*tiny_clip_suite.cli_args(), "method=simple_average", f"taskpool._target_={RECORDING}"],
        cwd=tmp_path / "cwd",
        log_dir=log_dir,
    )
    assert report == json.loads((log_dir / "program_report.json").read_text())
    (evaluation,) = per_sample.read(log_dir / per_sample.FILE)
    assert set(evaluation) == set(tiny_clip_suite.tasks)
    for t, correct in evaluation.items():
        assert correct.mean() == pytest.approx(report[t]["accuracy"], abs=1e-6)
