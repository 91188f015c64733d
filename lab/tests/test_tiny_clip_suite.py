"""The offline tiny CLIP suite the end-to-end tests stand on: a real CLIPModel with a tokenizer
that matches open_clip, genuinely fine-tuned towers, FusionBench configs that load."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from transformers import CLIPProcessor, CLIPVisionModel

from fusion_bench_larv.core.layers import group_layers
from larv_lab.testbed.tiny_clip import (
    build_tiny_clip_suite,
    zero_shot_accuracy,
)


def test_tokenizer_matches_open_clip(tiny_clip_suite):
    processor = CLIPProcessor.from_pretrained(str(tiny_clip_suite.pretrained_path))
    for text in ["a photo of the number: 7.", "A centered satellite photo of Pasture Land!"]:
        ours = processor.tokenizer(text)["input_ids"]
        ref = open_clip.tokenize([text])[0]
        assert ours == ref[: len(ours)].tolist() and int(ref[len(ours) :].abs().sum()) == 0


def test_finetuned_towers_differ_from_pretrained_in_every_block(tiny_clip_suite):
    theta0 = CLIPVisionModel.from_pretrained(str(tiny_clip_suite.pretrained_path)).state_dict()
    groups = group_layers([k for k, v in theta0.items() if v.is_floating_point()])
    assert groups.num_layers == tiny_clip_suite.num_layers >= 3
    for task, path in tiny_clip_suite.finetuned_paths.items():
        ft = CLIPVisionModel.from_pretrained(str(path)).state_dict()
        for members in groups.members:
            assert any(not torch.equal(ft[k], theta0[k]) for k in members), (task, members[0])


def test_finetuning_beats_pretrained_zero_shot(tiny_clip_suite):
    for task in tiny_clip_suite.tasks:
        st = tiny_clip_suite.stats[task]
        assert st["finetuned_accuracy"] > st["pretrained_accuracy"], task
        assert st["last_loss"] < st["first_loss"], task


def test_build_is_cached(tiny_clip_suite):
    # configs are rewritten on reuse (they hold absolute paths); models and data must not be
    files = [p for p in tiny_clip_suite.root.rglob("*") if p.is_file() and p.suffix != ".yaml"]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    again = build_tiny_clip_suite(tiny_clip_suite.root)
    assert {p: p.stat().st_mtime_ns for p in files} == stamps  # nothing rebuilt or rewritten
    assert again.stats == tiny_clip_suite.stats
    assert again.recipe == tiny_clip_suite.recipe


def test_vision_tower_and_datasets_load_like_fusion_bench_loads_them(tiny_clip_suite):
    pre = CLIPVisionModel.from_pretrained(str(tiny_clip_suite.pretrained_path))
    assert pre.config.num_hidden_layers == tiny_clip_suite.num_layers
    for task in tiny_clip_suite.tasks:
        ds = tiny_clip_suite.load_dataset(task, "test")
        assert set(ds.column_names) == {"image", "label"}
        assert ds.features["label"].num_classes == 10
        assert ds[0]["image"].size == (32, 32)
        assert set(ds["label"]) == set(range(10))
    for path in (tiny_clip_suite.modelpool_config_path, tiny_clip_suite.taskpool_config_path):
        assert path.is_file()


def test_zero_shot_accuracy_measures_the_finetuning_gain(tiny_clip_suite):
    # measured again from the files on disk, through FusionBench's own zero-shot head
    for task in tiny_clip_suite.tasks:
        st = tiny_clip_suite.stats[task]
        pre = zero_shot_accuracy(tiny_clip_suite, task)
        ft = zero_shot_accuracy(tiny_clip_suite, task, task)
        assert (pre, ft) == (st["pretrained_accuracy"], st["finetuned_accuracy"])
        assert ft >= pre + 0.3, (task, pre, ft)


@pytest.mark.slow
def test_task_arithmetic_cli_report(tiny_clip_suite, ta_cli_run):
    log_dir, report = ta_cli_run  # conftest.py: `fusion_bench method=task_arithmetic`
    # the program's report and the task pool's own report.json, both in the log dir
    assert report == json.loads((log_dir / "program_report.json").read_text())
    assert report == json.loads((log_dir / "report.json").read_text())
    assert report["model_info"]["all_params"] > 0
    accs = [report[task]["accuracy"] for task in tiny_clip_suite.tasks]
    assert all(0.0 <= a <= 1.0 for a in accs)
    assert report["average"]["accuracy"] == pytest.approx(sum(accs) / len(accs))
    # the CLI evaluated the whole test split, exactly like zero_shot_accuracy does
    merged = CLIPVisionModel.from_pretrained(str(log_dir / "merged"))
    for task in tiny_clip_suite.tasks:
        expected = zero_shot_accuracy(tiny_clip_suite, task, merged)
        assert report[task]["accuracy"] == pytest.approx(expected, abs=1e-6), task
