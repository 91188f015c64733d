"""The offline tiny CLIP suite the end-to-end tests stand on: a real CLIPModel with a tokenizer
that matches open_clip, genuinely fine-tuned towers, FusionBench configs that load."""

from __future__ import annotations

import open_clip
import torch
from transformers import CLIPProcessor, CLIPVisionModel

from fusion_bench_larv.layers import group_layers
from fusion_bench_larv.testing.tiny_clip import build_tiny_clip_suite


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
