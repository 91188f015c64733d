"""A tiny, fully offline CLIP model-merging suite for end-to-end tests of FusionBench runs.

:func:`build_tiny_clip_suite` writes, under one root folder and without touching the network:

- ``clip-tiny/``: a small, randomly initialised ``transformers.CLIPModel`` (6 vision blocks by
  default) saved with ``save_pretrained``, together with a ``CLIPProcessor`` whose image
  processor works at the tiny image size and whose tokenizer is rebuilt from open_clip's bundled
  BPE vocabulary (it tokenizes exactly like ``open_clip.tokenize``). The same folder loads as a
  ``transformers.CLIPVisionModel`` (the pretrained vision tower).
- ``data/<task>/data/{train,test}-00000-of-00001.parquet``: small image-classification data
  sets (``image``: PIL image, ``label``: ``ClassLabel`` named after FusionBench's class names)
  of learnable, class-dependent synthetic patterns, loadable with
  ``datasets.load_dataset(path=<dir>, split=...)`` exactly like the hub data sets.
- ``finetuned/<task>/``: one ``CLIPVisionModel`` per task, fine-tuned for a few seeded steps from
  the pretrained tower against the frozen zero-shot head FusionBench itself builds
  (``HFCLIPClassifier.set_classification_task`` with the task's class names and templates).
- ``config/``: a FusionBench config folder (pass it with ``--config-dir``) holding
  ``modelpool/CLIPVisionModelPool/tiny_clip.yaml`` and
  ``taskpool/CLIPVisionModelTaskPool/tiny_clip.yaml``, everything inlined with absolute paths.
- ``recipe.json`` (the build recipe and its hash) and ``stats.json`` (fine-tuning losses and
  accuracies). A root holding a complete build of the same recipe is reused as is.

:func:`run_fusion_bench` runs the real ``fusion_bench`` CLI in a subprocess and returns the report.

The "pretrained" CLIP model is randomly initialised (no contrastive pre-training), so its
zero-shot accuracy is about chance (0.1); the defaults fine-tune to about 0.9-1.0, and task
arithmetic (0.3) over mnist/svhn/eurosat lands in between (about 0.51/0.31/0.29). A build is
deterministic on CPU: the same recipe gives byte-identical weights and data files.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MODELPOOL_CONFIG",
    "TASKPOOL_CONFIG",
    "TinyClipSuite",
    "build_tiny_clip_suite",
    "fusion_bench_executable",
    "offline_env",
    "run_fusion_bench",
    "zero_shot_accuracy",
]

#: bump whenever the build below changes in a way that changes its outputs
RECIPE_VERSION = 2

#: config names (relative to the suite's config dir) to pass as ``modelpool=`` / ``taskpool=``
MODELPOOL_CONFIG = "CLIPVisionModelPool/tiny_clip"
TASKPOOL_CONFIG = "CLIPVisionModelTaskPool/tiny_clip"

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

# open_clip / OpenAI CLIP tokenizer constants
_CONTEXT_LENGTH = 77
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2  # open_clip keeps merges[1 : 49152 - 256 - 2 + 1]
_SOT, _EOT = "<|startoftext|>", "<|endoftext|>"

# how the synthetic images of a task look (unknown task names get "color")
_TASK_STYLE = {
    "mnist": "digits",
    "kmnist": "digits",
    "emnist_mnist": "digits",
    "emnist_letters": "digits",
    "fashion_mnist": "digits",
    "svhn": "house_numbers",
    "eurosat": "satellite",
    "resisc45": "satellite",
}


def offline_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` plus the Hugging Face offline switches, then ``env`` on top."""
    out = dict(os.environ)
    out.update(OFFLINE_ENV)
    out.setdefault("HYDRA_FULL_ERROR", "1")
    if env:
        out.update(env)
    return out


@dataclass(frozen=True)
class TinyClipSuite:
    """Paths of a built tiny CLIP suite (all absolute)."""

    root: Path
    tasks: tuple[str, ...]
    #: ``clip-tiny``: the full ``CLIPModel`` + ``CLIPProcessor``; also a ``CLIPVisionModel``
    pretrained_path: Path
    #: task -> folder of its fine-tuned ``CLIPVisionModel``
    finetuned_paths: dict[str, Path]
    #: task -> hub-like dataset folder (``datasets.load_dataset(path=..., split=...)``)
    dataset_paths: dict[str, Path]
    #: pass as ``--config-dir``
    config_dir: Path
    num_layers: int
    recipe: dict[str, Any] = field(repr=False)
    #: per task: fine-tuning losses, zero-shot accuracies of the pretrained and fine-tuned towers
    stats: dict[str, Any] = field(repr=False)
    modelpool_config: str = MODELPOOL_CONFIG
    taskpool_config: str = TASKPOOL_CONFIG

    @property
    def modelpool_config_path(self) -> Path:
        return self.config_dir / "modelpool" / f"{self.modelpool_config}.yaml"

    @property
    def taskpool_config_path(self) -> Path:
        return self.config_dir / "taskpool" / f"{self.taskpool_config}.yaml"

    def cli_args(self) -> list[str]:
        """``--config-dir`` plus the ``modelpool=`` / ``taskpool=`` overrides of this suite."""
        return [
            "--config-dir",
            str(self.config_dir),
            f"modelpool={self.modelpool_config}",
            f"taskpool={self.taskpool_config}",
        ]

    def load_dataset(self, task: str, split: str = "test"):
        """The task's split as a ``datasets.Dataset`` (``image``, ``label``), as FusionBench loads it."""
        import datasets

        return datasets.load_dataset(path=str(self.dataset_paths[task]), split=split)


# --------------------------------------------------------------------------------------------
# tokenizer / processor
# --------------------------------------------------------------------------------------------


def _open_clip_bpe_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip (open_clip_torch) is needed for its bundled BPE vocabulary")
    for location in spec.submodule_search_locations:
        path = Path(location) / _BPE_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{_BPE_FILE} not found in the open_clip package")


def _write_clip_bpe_files(out_dir: Path) -> tuple[Path, Path]:
    """``vocab.json`` + ``merges.txt`` equal to the ones of ``openai/clip-vit-base-patch32``,
    rebuilt the way open_clip's ``SimpleTokenizer`` builds its encoder."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    lines = gzip.open(_open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens]
    vocab += ["".join(m.split()) for m in merges]
    vocab += [_SOT, _EOT]
    encoder = {tok: i for i, tok in enumerate(vocab)}
    assert len(encoder) == 49408, len(encoder)

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_file.write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def _build_processor(work_dir: Path, image_size: int):
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer, CLIPTokenizerFast

    vocab_file, merges_file = _write_clip_bpe_files(work_dir)
    slow = CLIPTokenizer(
        vocab_file=str(vocab_file),
        merges_file=str(merges_file),
        model_max_length=_CONTEXT_LENGTH,
    )
    tokenizer = CLIPTokenizerFast.from_pretrained(str(work_dir), model_max_length=_CONTEXT_LENGTH)
    # the fast tokenizer must agree with the slow one (which is the reference implementation)
    probe = 'a centered satellite photo of the number: "7".'
    assert tokenizer(probe)["input_ids"] == slow(probe)["input_ids"]
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


# --------------------------------------------------------------------------------------------
# synthetic data
# --------------------------------------------------------------------------------------------


def _task_seed(seed: int, *parts: str) -> int:
    digest = hashlib.sha256("/".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _distinct_binary_grids(rng: np.random.Generator, n: int, grid: int) -> np.ndarray:
    """``n`` distinct random 0/1 ``grid x grid`` patterns (pairwise Hamming distance >= 3)."""
    out: list[np.ndarray] = []
    while len(out) < n:
        cand = (rng.random((grid, grid)) < 0.5).astype(np.float32)
        if 3 <= cand.sum() <= grid * grid - 3 and all(np.abs(cand - o).sum() >= 3 for o in out):
            out.append(cand)
    return np.stack(out)


def _upsample(grids: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour upsampling of ``(n, g, g[, 3])`` grids to ``(n, size, size[, 3])``."""
    idx = np.arange(size) * grids.shape[1] // size
    return grids[:, idx][:, :, idx]


def _make_images(
    task: str, n_classes: int, n_per_split: dict[str, int], image_size: int, seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """uint8 images ``(n, H, W, 3)`` and int labels per split; class-balanced, shuffled."""
    style = _TASK_STYLE.get(task, "color")
    rng = np.random.default_rng(_task_seed(seed, "prototypes", task))
    grid = 4
    yy, xx = np.meshgrid(
        np.linspace(0, 1, image_size), np.linspace(0, 1, image_size), indexing="ij"
    )

    # class prototypes, float in [0, 1], shape (C, H, W, 3)
    if style == "digits":
        # white "strokes" on black, on a grid finer than the patches (a patch sees a sub-pattern)
        shapes = _upsample(_distinct_binary_grids(rng, n_classes, 2 * grid), image_size)
        protos = np.repeat(shapes[..., None], 3, axis=-1)
    elif style == "house_numbers":
        shapes = _upsample(_distinct_binary_grids(rng, n_classes, grid), image_size)
        fg = rng.uniform(0.55, 1.0, size=(n_classes, 1, 1, 3))
        bg = rng.uniform(0.0, 0.35, size=(n_classes, 1, 1, 3))
        protos = shapes[..., None] * fg + (1 - shapes[..., None]) * bg
    elif style == "satellite":
        angles = rng.permutation(n_classes) * np.pi / n_classes
        freqs = rng.uniform(1.5, 4.0, size=n_classes)
        tints = rng.uniform(0.2, 1.0, size=(n_classes, 1, 1, 3))
        waves = np.stack(
            [
                0.5 + 0.5 * np.sin(2 * np.pi * f * (np.cos(a) * xx + np.sin(a) * yy))
                for a, f in zip(angles, freqs, strict=True)
            ]
        )
        protos = 0.25 + 0.75 * waves[..., None] * tints
    else:  # "color": random per-patch colours
        protos = _upsample(rng.uniform(0, 1, size=(n_classes, grid, grid, 3)), image_size)

    out = {}
    for split, n in n_per_split.items():
        srng = np.random.default_rng(_task_seed(seed, "samples", task, split))
        labels = srng.permutation(np.arange(n) % n_classes)
        x = protos[labels]
        gain = srng.uniform(0.75, 1.0, size=(n, 1, 1, 1))
        offset = srng.uniform(-0.1, 0.1, size=(n, 1, 1, 3))
        noise = srng.normal(0.0, 0.12, size=x.shape)
        x = np.clip(x * gain + offset + noise, 0.0, 1.0)
        out[split] = ((x * 255).round().astype(np.uint8), labels.astype(np.int64))
    return out


def _write_dataset(task_dir: Path, classnames: Sequence[str], splits) -> None:
    import datasets
    from PIL import Image

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(classnames))}
    )
    (task_dir / "data").mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in splits.items():
        ds = datasets.Dataset.from_dict(
            {
                "image": [Image.fromarray(im, mode="RGB") for im in images],
                "label": labels.tolist(),
            },
            features=features,
        )
        ds.to_parquet(str(task_dir / "data" / f"{split}-00000-of-00001.parquet"))


def _pixel_values(processor, images: np.ndarray):
    """What FusionBench's ``CLIPDataset`` feeds the model: processor(PIL RGB image)."""
    from PIL import Image

    pil = [Image.fromarray(im, mode="RGB") for im in images]
    return processor(images=pil, return_tensors="pt")["pixel_values"]


# --------------------------------------------------------------------------------------------
# zero-shot head / fine-tuning / evaluation
# --------------------------------------------------------------------------------------------


def _classifier(clip_model, processor, task: str):
    """FusionBench's own zero-shot classifier (head = text embeddings of the class prompts)."""
    from fusion_bench.models.hf_clip import HFCLIPClassifier
    from fusion_bench.tasks.clip_classification import get_classnames_and_templates

    classnames, templates = get_classnames_and_templates(task)
    classifier = HFCLIPClassifier(clip_model, processor=processor)
    classifier.set_classification_task(classnames, templates)
    return classifier


def _accuracy(classifier, pixel_values, labels, batch_size: int = 256) -> float:
    import torch

    classifier.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), batch_size):
            logits = classifier(pixel_values[i : i + batch_size])
            correct += int((logits.argmax(-1) == labels[i : i + batch_size]).sum())
    return correct / len(labels)


def _finetune(
    classifier, vision_model, pixel_values, labels, *, steps: int, lr: float, batch_size: int, seed
):
    """A few Adam steps on the vision tower against the frozen zero-shot head."""
    import torch
    from torch.nn import functional as F

    gen = torch.Generator().manual_seed(seed)
    classifier.clip_model.vision_model = vision_model
    vision_model.requires_grad_(True)
    vision_model.train()
    opt = torch.optim.Adam(vision_model.parameters(), lr=lr)
    losses = []
    n = len(labels)
    perm, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        loss = F.cross_entropy(classifier(pixel_values[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    vision_model.eval()
    vision_model.requires_grad_(False)
    return losses


@functools.lru_cache(maxsize=16)
def _zero_shot_setup(pretrained: str, dataset: str, task: str, split: str, build_hash: str):
    """(classifier with the task's head, its own vision tower, pixel values, labels); cached
    per suite build (``build_hash``), task and split."""
    import datasets
    import torch
    from transformers import CLIPModel, CLIPProcessor

    processor = CLIPProcessor.from_pretrained(pretrained)
    classifier = _classifier(CLIPModel.from_pretrained(pretrained).eval(), processor, task)
    ds = datasets.load_dataset(path=dataset, split=split)
    images = np.stack([np.asarray(im.convert("RGB")) for im in ds["image"]])
    labels = torch.as_tensor(ds["label"])
    own_tower = classifier.clip_model.vision_model
    return classifier, own_tower, _pixel_values(processor, images), labels


def zero_shot_accuracy(
    suite: TinyClipSuite,
    task: str,
    vision_model: Any = None,
    split: str = "test",
    *,
    num_threads: int | None = 1,
) -> float:
    """Accuracy of a vision tower on ``task`` with FusionBench's zero-shot head.

    ``vision_model``: ``None`` (the pretrained tower), a task name of the suite (its fine-tuned
    tower), a folder path of a ``CLIPVisionModel``, or an in-memory ``CLIPVisionModel`` (or
    ``CLIPVisionTransformer``). The data go through the suite's ``CLIPProcessor`` and the head is
    ``HFCLIPClassifier.set_classification_task(classnames, templates)``, as in FusionBench's
    ``CLIPVisionModelTaskPool``: on the same split it gives the same accuracy as the task pool.
    The processor, head and processed data are cached per suite build, task and split.
    """
    from transformers import CLIPVisionModel

    if isinstance(vision_model, str) and vision_model in suite.finetuned_paths:
        vision_model = suite.finetuned_paths[vision_model]
    if vision_model is None:
        vision_model = suite.pretrained_path
    with _build_context(num_threads):
        if isinstance(vision_model, (str, Path)):
            vision_model = CLIPVisionModel.from_pretrained(str(vision_model))
        classifier, own_tower, pixel_values, labels = _zero_shot_setup(
            str(suite.pretrained_path),
            str(suite.dataset_paths[task]),
            task,
            split,
            suite.recipe["hash"],
        )
        was_training = vision_model.training
        classifier.clip_model.vision_model = vision_model
        try:
            return _accuracy(classifier, pixel_values, labels)
        finally:
            classifier.clip_model.vision_model = own_tower  # keep no reference to the caller's
            vision_model.train(was_training)


# --------------------------------------------------------------------------------------------
# FusionBench configs
# --------------------------------------------------------------------------------------------


def _dataset_cfg(path: Path, split: str) -> dict:
    return {"_target_": "datasets.load_dataset", "path": str(path), "split": split}


def _write_configs(suite: TinyClipSuite, batch_size: int) -> None:
    import yaml

    config_dir, pretrained = suite.config_dir, suite.pretrained_path
    finetuned, data = suite.finetuned_paths, suite.dataset_paths

    header = (
        "# Written by larv_lab.testbed.tiny_clip.build_tiny_clip_suite; do not edit.\n"
        "# Every path is local: runs fully offline (HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1).\n"
    )
    modelpool = {
        "_target_": "fusion_bench.modelpool.CLIPVisionModelPool",
        "_recursive_": False,
        "processor": str(pretrained),
        "platform": "hf",
        "models": {"_pretrained_": str(pretrained), **{t: str(p) for t, p in finetuned.items()}},
        "train_datasets": {t: _dataset_cfg(p, "train") for t, p in data.items()},
        "test_datasets": {t: _dataset_cfg(p, "test") for t, p in data.items()},
    }
    taskpool = {
        "_target_": "fusion_bench.taskpool.CLIPVisionModelTaskPool",
        "_recursive_": False,
        "test_datasets": {t: _dataset_cfg(p, "test") for t, p in data.items()},
        "base_model": str(pretrained),
        "clip_model": {
            "_target_": "transformers.CLIPModel.from_pretrained",
            "pretrained_model_name_or_path": "${..base_model}",
        },
        "processor": {
            "_target_": "transformers.CLIPProcessor.from_pretrained",
            "pretrained_model_name_or_path": "${..base_model}",
        },
        "data_processor": "${.processor}",
        "dataloader_kwargs": {
            "batch_size": batch_size,
            "num_workers": 0,
            "pin_memory": False,
            "drop_last": False,
            "shuffle": False,
        },
        "fast_dev_run": False,
        "layer_wise_feature_save_path": None,
        "layer_wise_feature_first_token_only": True,
        "layer_wise_feature_max_num": 1000,
    }
    for sub, name, cfg in (
        ("modelpool", MODELPOOL_CONFIG, modelpool),
        ("taskpool", TASKPOOL_CONFIG, taskpool),
    ):
        path = config_dir / sub / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")


# --------------------------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------------------------


def _recipe(**kwargs) -> dict[str, Any]:
    import transformers

    recipe = {
        "recipe_version": RECIPE_VERSION,
        # checkpoint formats differ between transformers 4 and 5
        "transformers_major": int(transformers.__version__.split(".")[0]),
        **kwargs,
    }
    blob = json.dumps(recipe, sort_keys=True).encode()
    recipe["hash"] = hashlib.sha256(blob).hexdigest()[:16]
    return recipe


def _suite(root: Path, recipe: dict, stats: dict) -> TinyClipSuite:
    tasks = tuple(recipe["tasks"])
    return TinyClipSuite(
        root=root,
        tasks=tasks,
        pretrained_path=root / "clip-tiny",
        finetuned_paths={t: root / "finetuned" / t for t in tasks},
        dataset_paths={t: root / "data" / t for t in tasks},
        config_dir=root / "config",
        num_layers=recipe["vision_layers"],
        recipe=recipe,
        stats=stats,
    )


def _is_complete(suite: TinyClipSuite) -> bool:
    paths = [suite.pretrained_path / "config.json", suite.pretrained_path / "tokenizer.json"]
    paths += [p / "config.json" for p in suite.finetuned_paths.values()]
    paths += [
        p / "data" / f"{s}-00000-of-00001.parquet"
        for p in suite.dataset_paths.values()
        for s in ("train", "test")
    ]
    return all(p.exists() for p in paths)


def build_tiny_clip_suite(
    root: str | os.PathLike,
    tasks: Sequence[str] = ("mnist", "svhn", "eurosat"),
    seed: int = 0,
    finetune_steps: int = 60,
    n_train: int = 200,
    n_test: int = 100,
    *,
    vision_layers: int = 6,
    hidden_size: int = 32,
    image_size: int = 32,
    patch_size: int = 8,
    learning_rate: float = 3e-3,
    batch_size: int = 32,
    eval_batch_size: int = 64,
    num_threads: int | None = 1,
    force: bool = False,
) -> TinyClipSuite:
    """Build (or reuse) the tiny CLIP suite under ``root``; see the module docstring.

    ``tasks`` must be names FusionBench's CLIP template lookup knows (``mnist``, ``svhn``,
    ``eurosat``, ``gtsrb``, ...): the zero-shot heads are built from their class names.
    ``n_train`` / ``n_test``: images per task and split (class-balanced).
    ``eval_batch_size``: the task pool's batch size in the written config.
    ``num_threads``: torch threads during the build (restored afterwards); 1 is as fast for
    models this small and avoids a 10x slow-down when other processes share the CPU cores
    (the results do not depend on it). ``None`` leaves torch's setting alone.
    ``force``: rebuild even when ``root`` holds a complete build of the same recipe.
    """
    from fusion_bench.tasks.clip_classification import get_classnames_and_templates

    root = Path(root).expanduser().resolve()
    tasks = tuple(tasks)
    if len(set(tasks)) != len(tasks) or not tasks:
        raise ValueError(f"tasks must be non-empty and distinct, got {tasks}")
    classnames = {t: list(get_classnames_and_templates(t)[0]) for t in tasks}
    params = dict(
        seed=seed,
        finetune_steps=finetune_steps,
        n_train=n_train,
        n_test=n_test,
        vision_layers=vision_layers,
        hidden_size=hidden_size,
        image_size=image_size,
        patch_size=patch_size,
        learning_rate=learning_rate,
        batch_size=batch_size,
    )  # what the suite is built from (and hashed by)
    recipe = _recipe(tasks=list(tasks), **params)
    suite = _suite(root, recipe, {})
    recipe_file, stats_file = root / "recipe.json", root / "stats.json"

    if not force and recipe_file.exists() and stats_file.exists():
        try:
            old = json.loads(recipe_file.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("hash") == recipe["hash"] and _is_complete(suite):
            # configs hold absolute paths: rewrite them in case the root moved
            _write_configs(suite, eval_batch_size)
            return _suite(root, recipe, json.loads(stats_file.read_text()))

    with _build_context(num_threads):
        stats = _build(suite, classnames, **params, eval_batch_size=eval_batch_size)
    return _suite(root, recipe, stats)


@contextlib.contextmanager
def _build_context(num_threads: int | None):
    """Torch threads set to ``num_threads`` and datasets' progress bars off, both restored."""
    import datasets
    import torch

    threads = torch.get_num_threads()
    bars = datasets.is_progress_bar_enabled()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if bars:
            datasets.enable_progress_bars()


def _build(
    suite: TinyClipSuite,
    classnames: Mapping[str, list[str]],
    *,
    seed: int,
    finetune_steps: int,
    n_train: int,
    n_test: int,
    vision_layers: int,
    hidden_size: int,
    image_size: int,
    patch_size: int,
    learning_rate: float,
    batch_size: int,
    eval_batch_size: int,
) -> dict[str, Any]:
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    root, tasks, recipe = suite.root, suite.tasks, suite.recipe
    recipe_file, stats_file = root / "recipe.json", root / "stats.json"
    t0 = time.perf_counter()
    # a fresh build: clear what an older build left (only the folders/files this function owns)
    recipe_file.unlink(missing_ok=True)
    stats_file.unlink(missing_ok=True)
    for sub in ("clip-tiny", "finetuned", "data", "config", "_tokenizer"):
        shutil.rmtree(root / sub, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)

    # 1. processor (tokenizer rebuilt from open_clip's BPE file) and the pretrained CLIP model
    processor = _build_processor(root / "_tokenizer", image_size)
    shutil.rmtree(root / "_tokenizer", ignore_errors=True)
    n_heads = max(1, hidden_size // 16)
    config = CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": 2,
            "num_attention_heads": n_heads,
            "max_position_embeddings": _CONTEXT_LENGTH,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": n_heads,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        projection_dim=hidden_size,
    )
    torch.manual_seed(seed)
    clip_model = CLIPModel(config).eval()
    clip_model.save_pretrained(str(suite.pretrained_path))
    processor.save_pretrained(str(suite.pretrained_path))
    pretrained_state = {
        k: v.clone()
        for k, v in CLIPVisionModel.from_pretrained(str(suite.pretrained_path)).state_dict().items()
    }

    # 2. data, 3. fine-tuned towers
    stats: dict[str, Any] = {}
    for task in tasks:
        splits = _make_images(
            task, len(classnames[task]), {"train": n_train, "test": n_test}, image_size, seed
        )
        _write_dataset(suite.dataset_paths[task], classnames[task], splits)
        x_train = _pixel_values(processor, splits["train"][0])
        y_train = torch.as_tensor(splits["train"][1])
        x_test = _pixel_values(processor, splits["test"][0])
        y_test = torch.as_tensor(splits["test"][1])

        classifier = _classifier(clip_model, processor, task)
        vision = CLIPVisionModel(config.vision_config)
        vision.load_state_dict(pretrained_state)
        classifier.clip_model.vision_model = vision
        acc_pre = _accuracy(classifier, x_test, y_test)
        losses = _finetune(
            classifier,
            vision,
            x_train,
            y_train,
            steps=finetune_steps,
            lr=learning_rate,
            batch_size=min(batch_size, n_train),
            # per task, not per position: a task's tower does not depend on the other tasks
            seed=_task_seed(seed, "finetune", task) % 2**62,
        )
        acc_ft = _accuracy(classifier, x_test, y_test)
        vision.save_pretrained(str(suite.finetuned_paths[task]))
        stats[task] = {
            "pretrained_accuracy": acc_pre,
            "finetuned_accuracy": acc_ft,
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "losses": losses,
        }

    # 4. FusionBench configs, then the recipe (written last: marks the build complete)
    _write_configs(suite, eval_batch_size)
    stats["build_seconds"] = time.perf_counter() - t0
    stats_file.write_text(json.dumps(stats, indent=2))
    recipe_file.write_text(json.dumps(recipe, indent=2))
    return stats


# --------------------------------------------------------------------------------------------
# running the CLI
# --------------------------------------------------------------------------------------------


def fusion_bench_executable() -> Path:
    """The ``fusion_bench`` console script of the running interpreter's environment."""
    bindir = Path(sys.executable).parent
    for name in ("fusion_bench", "fusion_bench.exe"):
        if (bindir / name).exists():
            return bindir / name
    found = shutil.which("fusion_bench")
    if found is None:
        raise FileNotFoundError(f"no fusion_bench executable next to {sys.executable}")
    return Path(found)


def _has_override(args: Sequence[str], key: str) -> bool:
    return any(a.lstrip("+~").split("=", 1)[0] == key for a in args if "=" in a)


def run_fusion_bench(
    args: Sequence[str],
    cwd: str | os.PathLike,
    log_dir: str | os.PathLike,
    env: Mapping[str, str] | None = None,
    *,
    timeout: float | None = 600,
) -> dict:
    """Run ``fusion_bench *args`` in a subprocess (offline) and return its parsed report.

    Adds, unless ``args`` already set them: ``path.log_dir=<log_dir>``,
    ``report_save_path=<log_dir>/program_report.json``, ``fabric.accelerator=cpu``, ``seed=0``,
    ``print_config=false``. The environment is :func:`offline_env` (``os.environ`` + the HF
    offline switches) updated with ``env``, and ``OMP_NUM_THREADS=1`` if neither sets it. Returns ``program_report.json`` (the program's
    report; falls back to the task pool's ``report.json``). Raises ``RuntimeError`` with the
    tails of stdout/stderr when the run fails or writes no report.
    """
    log_dir = Path(log_dir).resolve()
    cwd = Path(cwd)
    cwd.mkdir(parents=True, exist_ok=True)
    report_path = log_dir / "program_report.json"
    args = list(args)
    defaults = {
        "path.log_dir": str(log_dir),
        "report_save_path": str(report_path),
        "fabric.accelerator": "cpu",
        "seed": "0",
        "print_config": "false",
    }
    for key, value in defaults.items():
        if not _has_override(args, key):
            args.append(f"{key}={value}")
    if _has_override(args, "report_save_path"):
        value = next(a.split("=", 1)[1] for a in args if a.split("=", 1)[0] == "report_save_path")
        if value not in ("null", "None", ""):
            report_path = Path(value.replace("{log_dir}", str(log_dir)))

    cmd = [str(fusion_bench_executable()), *args]
    run_env = offline_env(env)
    # one torch thread unless told otherwise: as fast for the tiny suite, and much faster
    # when other processes (e.g. parallel tests) share the CPU cores
    run_env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        cmd,
        cwd=str(cwd),
        env=run_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )

    def tail(s: str, n: int = 6000) -> str:
        return s[-n:] if s else ""

    if proc.returncode != 0:
        raise RuntimeError(
            f"fusion_bench exited with {proc.returncode}\ncmd: {' '.join(cmd)}\n"
            f"--- stdout (tail) ---\n{tail(proc.stdout)}\n--- stderr (tail) ---\n{tail(proc.stderr)}"
        )
    for candidate in (report_path, log_dir / "report.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise RuntimeError(
        f"fusion_bench wrote no report ({report_path} / {log_dir / 'report.json'})\n"
        f"cmd: {' '.join(cmd)}\n--- stdout (tail) ---\n{tail(proc.stdout)}\n"
        f"--- stderr (tail) ---\n{tail(proc.stderr)}"
    )
