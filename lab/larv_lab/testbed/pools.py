"""FusionBench model pool and task pool for the real-weights testbeds, so that

    fusion_bench method=larv_ties modelpool=LarvTestbed/quick taskpool=LarvTestbed/quick

merges the fine-tuned DINOv2 backbones (or, for a text testbed such as ``text_ci``, the
fine-tuned MiniLM encoders) and evaluates every task with its own frozen head; for the decoder
testbed (``decoder_full``), the fine-tuned causal LMs, each task scored by exact match of its
greedy answers.
(FusionBench's own DINOv2 pool needs Python ≥ 3.12 and a classification model with one shared
head; here each task keeps its head and only the backbone is merged, as with CLIP's zero-shot
heads.)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fusion_bench import BaseModelPool
from fusion_bench.taskpool import BaseTaskPool
from torch import nn
from torch.utils.data import Dataset

from fusion_bench_larv.evaluation import per_sample as per_sample_mod
from fusion_bench_larv.evaluation.clip_taskpool import evaluation_tasks

from .build import Testbed, build_testbed, load_testbed, preprocess
from .decoder_build import (
    DECODER_RECIPES,
    DecoderTestbed,
    answer_loss,
    build_decoder_testbed,
    generate_answers,
    load_decoder_testbed,
    per_sample_entry,
    score,
)
from .sources import load_source, source_fingerprint
from .text_build import TEXT_RECIPES, TextTestbed, build_text_testbed, load_text_testbed
from .toolkit import held_out_split, split

log = logging.getLogger(__name__)


#: a testbed's modality -> (how to open a built one, how to build one)
FAMILIES = {
    "image": (load_testbed, build_testbed),
    "text": (load_text_testbed, build_text_testbed),
    "generation": (load_decoder_testbed, build_decoder_testbed),
}

AnyTestbed = Testbed | TextTestbed | DecoderTestbed


def recipe_modality(recipe: str) -> str:
    """The modality of a named recipe: text and decoder recipes by their tables, else image."""
    return (
        "text" if recipe in TEXT_RECIPES else "generation" if recipe in DECODER_RECIPES else "image"
    )


def open_testbed(
    recipe: str = "quick",
    cache_dir: str | None = None,
    testbed_dir: str | None = None,
    build_if_missing: bool = False,
) -> AnyTestbed:
    """A built testbed, image, text or decoder, from an explicit folder (its ``testbed.json``
    says which) or by recipe name (built on demand if asked)."""
    if testbed_dir is not None:
        meta = Path(testbed_dir) / "testbed.json"
        modality = (
            json.loads(meta.read_text()).get("modality", "image") if meta.is_file() else "image"
        )
        return FAMILIES[modality][0](Path(testbed_dir))
    load, build = FAMILIES[recipe_modality(recipe)]
    try:
        return load(recipe, cache_dir)
    except FileNotFoundError:
        if not build_if_missing:
            raise
        return build(recipe, cache_dir)


def encode_inputs(testbed: Testbed | TextTestbed, raw) -> dict[str, torch.Tensor]:
    """A testbed's raw inputs (uint8 images, or texts) as the keyword arguments its classifier
    takes (``pixel_values``, or ``input_ids`` and ``attention_mask``)."""
    if testbed.modality == "text":
        return testbed.encode(raw)
    return {"pixel_values": preprocess(raw, testbed.resolution)}


def input_batches(x: dict[str, torch.Tensor], batch_size: int):
    """``(indices, inputs)`` batches of encoded examples. Images go in order; texts go longest
    first, each batch cut to its longest text: padding is masked out of attention and pooling,
    so every output is the one of the fully padded batch, at a fraction of the cost."""
    mask = x.get("attention_mask")
    n = len(next(iter(x.values())))
    if mask is None:
        order = torch.arange(n)
    else:
        order = torch.argsort(mask.sum(1), descending=True, stable=True)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield idx, trimmed({k: v[idx] for k, v in x.items()})


def trimmed(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch of encoded texts cut to its longest text (its padding is masked anyway); images
    as they are."""
    mask = batch.get("attention_mask")
    if mask is None:
        return batch
    width = int(mask.sum(1).max())
    return {k: v[:, :width] for k, v in batch.items()}


def source_as_built(testbed: Testbed, task: str):
    """The task's installed source, checked against the fingerprint the testbed was built from
    (another file would give another split)."""
    if task not in testbed.tasks:
        raise ValueError(f"task {task!r} is not in testbed {testbed.root}")
    meta = json.loads((testbed.root / "testbed.json").read_text())
    built_with = meta.get("fingerprints", {}).get("sources", {}).get(task)
    if built_with is not None and list(built_with) != source_fingerprint(task):
        raise RuntimeError(
            f"the installed source of {task!r} differs from the one testbed {testbed.root} "
            "was built from: its training split cannot be re-derived"
        )
    return load_source(task)


class TestbedTrainSet(Dataset):
    """A task's training images exactly as the testbed's build drew them
    (:func:`.toolkit.split` with the testbed's recipe: same seed, same images, same order),
    pre-processed as the task pool pre-processes test images (:func:`~.build.preprocess` at the recipe's resolution). Items:
    ``(pixel_values float32 (3, R, R), label)``. Only data-using methods (LOT Merging) read it;
    nothing here changes the testbed or its cache key.

    Needs the testbed's sources installed, unchanged since the build (checked against the
    fingerprints in ``testbed.json``: another file would give another split)."""

    __test__ = False

    def __init__(self, testbed: Testbed, task: str):
        train_x, train_y, _, _ = split(source_as_built(testbed, task), testbed.recipe)
        self.task = task
        self.images, self.labels = train_x, train_y
        self.resolution = testbed.resolution

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        # per image: resizing is per sample, so this equals pre-processing the whole batch
        return preprocess(self.images[idx : idx + 1], self.resolution)[0], int(self.labels[idx])


def load_testbed_train_set(testbed_dir: str, task: str) -> TestbedTrainSet:
    """:class:`TestbedTrainSet` of a built testbed folder (the pool's ``train_datasets`` entries
    instantiate this)."""
    return TestbedTrainSet(load_testbed(Path(testbed_dir)), task)


class TestbedModelPool(BaseModelPool):
    """``_pretrained_`` and one fine-tuned ``Dinov2Model`` per task, loaded fresh from disk on
    every ``load_model`` (so base mergers never share a module). ``load_train_dataset(task)``:
    the task's training split, re-derived as the build drew it (:class:`TestbedTrainSet`)."""

    __test__ = False  # not a pytest class

    def __init__(
        self,
        recipe: str = "quick",
        cache_dir: str | None = None,
        testbed_dir: str | None = None,
        tasks: Sequence[str] | None = None,
        build_if_missing: bool = False,
        untuned_parameters: Sequence[str] | None = None,
        **kwargs: Any,
    ):
        self.testbed = open_testbed(recipe, cache_dir, testbed_dir, build_if_missing)
        #: parameters no task's fine-tuning moves (their task vectors are zero), as the pool's
        #: config names them; ``larv_wudi.yaml`` hands them to WUDI's ``exclude_keys``
        self.untuned_parameters = list(untuned_parameters or ())
        tasks = list(tasks) if tasks is not None else list(self.testbed.tasks)
        unknown = [t for t in tasks if t not in self.testbed.finetuned_dirs]
        if unknown:
            raise ValueError(
                f"tasks {unknown} are not in testbed {self.testbed.root} ({list(self.testbed.tasks)})"
            )
        models = {"_pretrained_": str(self.testbed.pretrained_dir)}
        models.update({t: str(self.testbed.finetuned_dirs[t]) for t in tasks})
        if kwargs.get("train_datasets") is None and self.testbed.modality == "image":
            kwargs["train_datasets"] = {
                t: {
                    "_target_": f"{__name__}.load_testbed_train_set",
                    "testbed_dir": str(self.testbed.root),
                    "task": t,
                }
                for t in tasks
            }
        super().__init__(models=models, **kwargs)

    def load_model(self, model_name_or_config, *args, **kwargs) -> nn.Module:
        if isinstance(model_name_or_config, str) and model_name_or_config in self._models:
            return self.testbed.family.load_backbone(self._models[model_name_or_config])
        return super().load_model(model_name_or_config, *args, **kwargs)

    def load_train_dataset(self, dataset_name: str, *args, **kwargs) -> Dataset:
        cfg = self._train_datasets[dataset_name]
        if isinstance(cfg, Mapping) and cfg.get("_target_") == f"{__name__}.load_testbed_train_set":
            return load_testbed_train_set(cfg["testbed_dir"], cfg["task"])
        return super().load_train_dataset(dataset_name, *args, **kwargs)

    def save_model(self, model: nn.Module, path: str, *args, **kwargs) -> None:
        model.save_pretrained(path)


SPLITS = ("test", "validation")


class TestbedTaskPool(BaseTaskPool):
    """Evaluates a backbone on every task's test set with that task's frozen linear head, or (a
    decoder testbed) a causal LM by exact match of its greedy answers
    (:func:`~.decoder_build.generate_answers`, :func:`~.decoder_build.score`; the loss is the
    teacher-forced cross-entropy per answer token, :func:`~.decoder_build.answer_loss`).
    Report format as FusionBench's CLIP task pool: ``{task: {accuracy, loss}, average: {...}}``.
    Each evaluation's per-sample correctness (one bool per test example, test-set order) is kept
    in ``per_sample_evaluations`` and, under FusionBench's program, written to
    ``per_sample.json`` beside the program's report (:mod:`fusion_bench_larv.evaluation.per_sample`).

    ``split: validation`` evaluates on a labelled split held out from each task's training pool
    instead (:func:`~.toolkit.held_out_split`, ``val_size`` examples per task; never a test
    example), for methods that choose a hyperparameter on validation data. A task whose pool has
    no held-out example (a legacy split, :class:`~.toolkit.BaseRecipe`) is left out of that
    report (and named in its ``average``); its per-sample correctness is kept in
    ``per_sample_evaluations`` for the choice's guard and never written to ``per_sample.json``."""

    __test__ = False

    def __init__(
        self,
        recipe: str = "quick",
        cache_dir: str | None = None,
        testbed_dir: str | None = None,
        tasks: Sequence[str] | None = None,
        batch_size: int | None = None,
        device: str | None = None,
        build_if_missing: bool = False,
        split: str = "test",
        val_size: int = 200,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 1:
            raise ValueError(f"val_size must be a positive integer, not {val_size!r}")
        self.testbed = open_testbed(recipe, cache_dir, testbed_dir, build_if_missing)
        self.tasks = list(tasks) if tasks is not None else list(self.testbed.tasks)
        self.batch_size = batch_size or self.testbed.recipe.eval_batch_size
        self.device = device
        self.split, self.val_size = split, val_size
        self._held_out: dict[str, tuple[Any, np.ndarray | torch.Tensor]] = {}

    @property
    def generative(self) -> bool:
        """Whether the testbed's tasks are generation tasks (a decoder testbed)."""
        return self.testbed.modality == "generation"

    def examples(self, task: str) -> tuple[Any, np.ndarray | torch.Tensor]:
        """The task's inputs of this pool's split and their labels: encoded as the classifier
        takes them (:func:`encode_inputs`) with integer labels, or, on a decoder testbed, the
        prompts and their accepted answers (object arrays of str)."""
        if self.split == "test":
            raw, labels = self.testbed.test_set(task)
            if self.generative:
                return raw, labels
            return encode_inputs(self.testbed, raw), torch.from_numpy(labels).long()
        if task not in self._held_out:
            raw, labels = held_out_split(
                source_as_built(self.testbed, task), self.testbed.recipe, self.val_size
            )
            if self.generative:
                self._held_out[task] = (raw, labels)
            else:
                # a task whose training pool the build used up has none (a tokenizer fails on [])
                x = encode_inputs(self.testbed, raw) if len(labels) else {}
                self._held_out[task] = (x, torch.from_numpy(labels).long())
        return self._held_out[task]

    def _device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _classify(self, model: nn.Module, task: str, device) -> tuple[np.ndarray, float, dict]:
        """(per-example correctness, mean loss, per-sample entry) of one classification task."""
        clf = self.testbed.classifier(task, backbone=model).to(device)
        x, y = self.examples(task)
        hit, loss_sum = torch.zeros(len(y), dtype=torch.bool), 0.0
        for idx, batch in input_batches(x, self.batch_size):
            logits = clf(**{k: v.to(device) for k, v in batch.items()})
            yb = y[idx].to(device)
            loss_sum += float(torch.nn.functional.cross_entropy(logits, yb, reduction="sum"))
            hit[idx] = (logits.argmax(-1) == yb).cpu()
        hit = hit.numpy()
        return hit, loss_sum / len(y), per_sample_mod.encode_task(hit, y.cpu().numpy())

    def _generate(self, model: nn.Module, task: str) -> tuple[np.ndarray, float, dict]:
        """(per-prompt correctness, answer loss, per-sample entry) of one generation task."""
        prompts, answers = self.examples(task)
        r, tokenizer = self.testbed.recipe, self.testbed.tokenizer()
        preds = generate_answers(model, tokenizer, prompts, r.max_prompt_tokens, r.max_new_tokens,
                                 self.batch_size)  # fmt: skip
        hit = score(preds, answers)
        loss = answer_loss(model, tokenizer, prompts, answers, r, self.batch_size)
        return hit, loss, per_sample_entry(hit, answers)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Any]:
        device = self._device()
        model = model.to(device).eval()
        report: dict[str, Any] = {}
        per_sample: dict[str, Any] = {}
        tasks = evaluation_tasks(model, self.tasks)
        if self.split == "validation":
            without = [t for t in tasks if len(self.examples(t)[1]) == 0]
            tasks = [t for t in tasks if t not in without]
            if not tasks:
                raise ValueError("no task of this testbed has held-out validation examples")
        for task in tasks:
            if self.generative:
                hit, loss, per_sample[task] = self._generate(model, task)
            else:
                hit, loss, per_sample[task] = self._classify(model, task, device)
            report[task] = {"accuracy": int(hit.sum()) / len(hit), "loss": loss}
        report["average"] = {
            "accuracy": sum(report[t]["accuracy"] for t in tasks) / len(tasks),
            "loss": sum(report[t]["loss"] for t in tasks) / len(tasks),
        }
        model.to("cpu")
        if self.split == "validation":
            report["average"]["split"] = f"validation ({self.val_size} per task at most)"
            report["average"]["tasks_without_held_out_images"] = without
        # a validation split's correctness is kept in memory (the guard of a choice reads it),
        # never written to per_sample.json, which holds test examples only
        per_sample_mod.record(self, per_sample, write_file=self.split == "test")
        return report
