"""Testbed sources beyond the built-in five: derived tasks, user-registered sources (colour
included), and the paper-regime pieces (prototype head, L2 pooling, RGB pre-processing)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from larv_lab.testbed import build as B
from larv_lab.testbed import sources as S
from larv_lab.testbed import toolkit as K


def _need(*names: str) -> None:
    for name in names:
        try:
            S.locate_source(name)
        except S.SourceMissingError as exc:
            pytest.skip(f"source {name} missing (lab/scripts/install_testbed_sources.sh): {exc}")


# --------------------------------------------------------------------------- paper-regime pieces


def test_prototype_head_hand_case():
    # class 0 shots at e1, class 1 shots at e2: prototypes e1, e2, their mean (.5, .5), centred
    # (.5, -.5) and (-.5, .5), normalised (1, -1)/sqrt 2 and (-1, 1)/sqrt 2, times head_scale
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = np.array([0, 0, 1, 1])
    recipe = B.Recipe(head="prototype", head_scale=10.0)
    head, stats = K.prototype_head(feats, labels, 2, recipe)
    r = 10.0 / math.sqrt(2.0)
    assert torch.allclose(head.weight, torch.tensor([[r, -r], [-r, r]]))
    assert torch.equal(head.bias, torch.zeros(2))
    assert stats["head_train_acc"] == 1.0 and stats["head_shots_per_class"] == [2, 2]
    assert not head.weight.requires_grad


def test_shots_are_seeded_and_capped():
    labels = np.array([0] * 5 + [1] * 2 + [2] * 9)
    idx = K.shots(labels, 3, shots=3, seed=7)
    assert np.bincount(labels[idx]).tolist() == [3, 2, 3]  # class 1 has only two
    assert np.array_equal(idx, K.shots(labels, 3, shots=3, seed=7))
    assert not np.array_equal(idx, K.shots(labels, 3, shots=3, seed=8))
    with pytest.raises(ValueError, match="class 3 has no training image"):
        K.shots(labels, 4, shots=3, seed=0)


def test_l2_pooling_has_unit_norm_and_keeps_direction():
    hidden = torch.randn(4, 5, 6)
    for base in ("cls", "cls_mean"):
        raw = B.pool_features(hidden, base)
        unit = B.pool_features(hidden, base + "_l2")
        assert torch.allclose(unit.norm(dim=-1), torch.ones(4))
        assert torch.allclose(unit * raw.norm(dim=-1, keepdim=True), raw, atol=1e-6)


def test_preprocess_colour_and_grey():
    rgb = np.zeros((2, 14, 14, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 0, 51
    x = B.preprocess(rgb, 14)
    mean = torch.tensor(B.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(B.IMAGENET_STD).view(1, 3, 1, 1)
    pixels = x * std + mean
    assert torch.allclose(pixels[:, :, 3, 3], torch.tensor([[1.0, 0.0, 0.2]] * 2), atol=1e-6)
    grey = np.random.default_rng(0).integers(0, 256, (3, 14, 14), dtype=np.uint8)
    assert torch.equal(B.preprocess(grey, 28), B.preprocess(np.repeat(grey[..., None], 3, -1), 28))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        B.preprocess(np.zeros((2, 14, 14, 4), np.uint8), 14)


def test_regime_recipes_are_the_same_regime():
    full, seed1, quick = (B.RECIPES[n] for n in ("full", "full_seed1", "quick"))
    assert len(full.tasks) >= 8 and full.head == "prototype" and full.pooling.endswith("_l2")
    assert full.replace(name="full_seed1", seed=1) == seed1
    # the demo's recipe: the same regime (tasks, heads, learning rate), smaller and shorter
    same = ("tasks", "resolution", "pooling", "head", "head_shots", "head_scale", "finetune_lr")
    assert all(getattr(quick, k) == getattr(full, k) for k in same)
    assert quick.finetune_steps < full.finetune_steps and quick.n_train < full.n_train
    with pytest.raises(ValueError, match="head must be one of"):
        B.Recipe(head="zero_shot")


# --------------------------------------------------------------------------- derived sources


def test_derived_sources_are_functions_of_their_base():
    _need("mnist", "fashion_mnist")
    mnist, inv = S.load_source("mnist"), S.load_source("mnist_inverted")
    assert np.array_equal(inv.test_inputs, 255 - mnist.test_inputs)
    assert np.array_equal(inv.train_labels, mnist.train_labels)
    assert np.array_equal(inv.train_exclude, mnist.train_exclude)
    fashion, rot = S.load_source("fashion_mnist"), S.load_source("fashion_rot90")
    assert np.array_equal(rot.train_inputs[5], np.rot90(fashion.train_inputs[5]))
    coarse = S.load_source("fashion_coarse")
    assert coarse.class_names == ("upper body", "lower or full body", "footwear", "bag")
    for new, olds in enumerate(S.FASHION_COARSE.values()):
        assert set(fashion.test_labels[coarse.test_labels == new]) == set(olds)
    assert np.array_equal(coarse.test_inputs, fashion.test_inputs)
    # another task name, another split: the derived task is not its base's copy
    r = B.RECIPES["ci"]
    assert not np.array_equal(K.split(inv, r)[1], K.split(mnist, r)[1])


# --------------------------------------------------------------------------- registered sources


def _stripes(n: int, seed: int, colour: bool):
    """Class c: a bright bar at row 2 + 3c (grey) or a colour c of three (RGB), plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = rng.integers(0, 40, (n, 12, 12), dtype=np.uint8)
    if colour:
        images = np.repeat(images[..., None], 3, -1)
        for i, c in enumerate(labels):
            images[i, ..., c] = 220
    else:
        for i, c in enumerate(labels):
            images[i, 2 + 3 * c : 4 + 3 * c] = 230
    return images, labels


@pytest.fixture
def registered(monkeypatch):
    """Two user sources (one colour with an official split, one grey without), unregistered
    afterwards."""
    monkeypatch.setattr(S, "SOURCES", dict(S.SOURCES))
    monkeypatch.setattr(S, "_REGISTERED", {})

    def colour():
        x, y = _stripes(80, 0, colour=True)
        xt, yt = _stripes(30, 1, colour=True)
        names = ("red", "green", "blue")
        return {"train_images": x, "train_labels": y, "test_images": xt, "test_labels": yt,
                "class_names": names}  # fmt: skip

    def grey():
        x, y = _stripes(100, 2, colour=False)
        return {"train_images": x, "train_labels": y}

    S.register_source("user_colour", colour, description="colour stripes", licence="CC0")
    S.register_source("user_grey", grey)
    return ("user_colour", "user_grey")


def test_register_source_validates(registered):
    with pytest.raises(ValueError, match="exists"):
        S.register_source("user_grey", lambda: {})
    with pytest.raises(ValueError, match="letters, digits"):
        S.register_source("bad name", lambda: {})
    with pytest.raises(TypeError, match="callable"):
        S.register_source("x", 3)
    S.register_source("bad_keys", lambda: {"images": np.zeros((1, 2, 2), np.uint8)})
    with pytest.raises(ValueError, match="'train_labels' and exactly one of 'train_images'"):
        S.load_source("bad_keys")
    S.register_source("bad_shape", lambda: {"train_images": np.zeros((2, 4, 4, 2), np.uint8),
                                            "train_labels": np.array([0, 1])})  # fmt: skip
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        S.load_source("bad_shape")
    S.register_source("half_split", lambda: {
        "train_images": np.zeros((2, 4, 4), np.uint8), "train_labels": np.array([0, 1]),
        "test_images": np.zeros((2, 4, 4), np.uint8)})  # fmt: skip
    with pytest.raises(ValueError, match="both test_images and test_labels"):
        S.load_source("half_split")
    d = S.load_source("user_grey")
    assert d.class_names == ("0", "1", "2") and d.test_inputs is None
    assert S.load_source("user_colour").image_shape == (12, 12, 3)


def test_registered_source_fingerprint_follows_its_data(registered):
    first = S.source_fingerprint("user_grey")
    assert first == S.source_fingerprint("user_grey")
    S.register_source(
        "user_grey", lambda: dict(zip(("train_images", "train_labels"), _stripes(100, 9, False), strict=True)),
        overwrite=True,
    )  # fmt: skip
    assert S.source_fingerprint("user_grey") != first


def test_registered_sources_build_a_testbed_and_run_the_benchmark(registered, tmp_path):
    """A user's own sources (no package edit): build a tiny testbed over them, then the `bench`
    experiment on that folder, offline, in this process."""
    from larv_lab.testbed import missing_requirements

    if (reason := missing_requirements()) and "onnx" in reason.lower():
        pytest.skip(reason)
    recipe = B.RECIPES["ci"].replace(
        name="mine", tasks=registered, head="prototype", pooling="cls_mean_l2", head_shots=4,
        n_train=40, n_test=30,
    )  # fmt: skip
    testbed = B.build_testbed(recipe, tmp_path / "cache", progress=False, num_threads=1)
    assert testbed.tasks == registered
    assert testbed.class_names["user_colour"] == ("red", "green", "blue")
    images, labels = testbed.test_set("user_colour")
    assert images.shape == (30, 12, 12, 3) and len(labels) == 30  # the official split, all of it
    assert len(testbed.test_set("user_grey")[1]) == 30  # a seeded share of 100 images

    # a second build seed: two pools side by side in one benchmark folder
    seed1 = B.build_testbed(
        recipe.replace(seed=1), tmp_path / "cache", progress=False, num_threads=1
    )
    assert seed1.root != testbed.root

    from larv_lab.reproduce import __main__ as cli
    from larv_lab.reproduce.experiments import pool_slug

    out = tmp_path / "out"
    specs = [f"testbed:{testbed.root}", f"testbed:{seed1.root}"]
    argv = ["bench", "--pools", *specs, "--launcher", "inprocess",
            "--merger", "ta", "pretrained", "finetuned", "--variant", "base", "tiered",
            "--out", str(out), "-o", "fabric.accelerator=cpu", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    suites = [f"bench-{pool_slug(s)}" for s in specs]
    for suite, tb in zip(suites, (testbed, seed1), strict=True):
        runs = out / "runs" / suite
        for cell in ("ta/base", "ta/larv-tiered", "pretrained/base", "finetuned/base"):
            report = json.loads((runs / cell / "program_report.json").read_text())
            assert set(registered) <= set(report)
        pre = json.loads((runs / "pretrained/base/program_report.json").read_text())
        assert pre["user_colour"]["accuracy"] == pytest.approx(
            tb.report["tasks"]["user_colour"]["pretrained_probe_acc"]
        )
        card = json.loads((out / "artefacts" / f"regime_{suite}.json").read_text())
        ta = json.loads((runs / "ta/base/program_report.json").read_text())
        assert card["num_tasks"] == 2
        assert card["pretrained_head_average"] == pytest.approx(
            100 * sum(pre[t]["accuracy"] for t in registered) / 2
        )
        assert card["base_averages"]["ta"] == pytest.approx(
            100 * sum(ta[t]["accuracy"] for t in registered) / 2
        )
        assert "wudi" in card["missing_mergers"] and not card["all_met"]
    table = (out / "artefacts" / "bench.md").read_text()
    assert "user_colour" in table and table.count("Regime card") == 2
    # run time from each cell.json, per suite: the sum of the four cells' own seconds
    for suite in suites:
        secs = [json.loads(f.read_text())["launch"]["seconds"]
                for f in (out / "runs" / suite).glob("*/*/cell.json")]  # fmt: skip
        assert len(secs) == 4
        assert f"4 of 4 cells timed, {sum(secs):,.0f} s in all" in table
        # and per row group: the LARV cell apart from the base rows and references
        larv = json.loads((out / "runs" / suite / "ta/larv-tiered/cell.json").read_text())
        larv_s = larv["launch"]["seconds"]
        assert (
            f"by rows (cells): base mergers and references {sum(secs) - larv_s:,.0f} s (3); "
            f"LARV gates and depth schedules {larv_s:,.0f} s (1); the slowest"
        ) in table
    assert (out / "artefacts" / "forest_bench.png").stat().st_size > 0
