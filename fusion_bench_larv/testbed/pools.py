"""FusionBench model pool and task pool for the real-weights testbed, so that

    fusion_bench method=larv_ties modelpool=LarvTestbed/quick taskpool=LarvTestbed/quick

merges the fine-tuned DINOv2 backbones and evaluates every task with its own frozen head.
(FusionBench's own DINOv2 pool needs Python ≥ 3.12 and a classification model with one shared
head; here each task keeps its head and only the backbone is merged, as with CLIP's zero-shot
heads.)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from fusion_bench import BaseModelPool
from fusion_bench.taskpool import BaseTaskPool
from torch import nn

from .backbone import load_backbone
from .build import Testbed, build_testbed, load_testbed

log = logging.getLogger(__name__)


def open_testbed(
    recipe: str = "quick",
    cache_dir: str | None = None,
    testbed_dir: str | None = None,
    build_if_missing: bool = False,
) -> Testbed:
    """A built testbed, from an explicit folder or by recipe name (built on demand if asked)."""
    if testbed_dir is not None:
        return load_testbed(Path(testbed_dir))
    try:
        return load_testbed(recipe, cache_dir)
    except FileNotFoundError:
        if not build_if_missing:
            raise
        return build_testbed(recipe, cache_dir)


class TestbedModelPool(BaseModelPool):
    """``_pretrained_`` and one fine-tuned ``Dinov2Model`` per task, loaded fresh from disk on
    every ``load_model`` (so base mergers never share a module)."""

    __test__ = False  # not a pytest class

    def __init__(
        self,
        recipe: str = "quick",
        cache_dir: str | None = None,
        testbed_dir: str | None = None,
        tasks: Sequence[str] | None = None,
        build_if_missing: bool = False,
        **kwargs: Any,
    ):
        self.testbed = open_testbed(recipe, cache_dir, testbed_dir, build_if_missing)
        tasks = list(tasks) if tasks is not None else list(self.testbed.tasks)
        unknown = [t for t in tasks if t not in self.testbed.finetuned_dirs]
        if unknown:
            raise ValueError(
                f"tasks {unknown} are not in testbed {self.testbed.root} ({list(self.testbed.tasks)})"
            )
        models = {"_pretrained_": str(self.testbed.pretrained_dir)}
        models.update({t: str(self.testbed.finetuned_dirs[t]) for t in tasks})
        super().__init__(models=models, **kwargs)

    def load_model(self, model_name_or_config, *args, **kwargs) -> nn.Module:
        if isinstance(model_name_or_config, str) and model_name_or_config in self._models:
            return load_backbone(self._models[model_name_or_config])
        return super().load_model(model_name_or_config, *args, **kwargs)

    def save_model(self, model: nn.Module, path: str, *args, **kwargs) -> None:
        model.save_pretrained(path)


class TestbedTaskPool(BaseTaskPool):
    """Evaluates a backbone on every task's test set with that task's frozen linear head.
    Report format as FusionBench's CLIP task pool: ``{task: {accuracy, loss}, average: {...}}``."""

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
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.testbed = open_testbed(recipe, cache_dir, testbed_dir, build_if_missing)
        self.tasks = list(tasks) if tasks is not None else list(self.testbed.tasks)
        self.batch_size = batch_size or self.testbed.recipe.eval_batch_size
        self.device = device

    def _device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Any]:
        device = self._device()
        model = model.to(device).eval()
        report: dict[str, Any] = {}
        for task in self.tasks:
            clf = self.testbed.classifier(task, backbone=model).to(device)
            x, y = self.testbed.pixel_values(task)
            correct, loss_sum = 0, 0.0
            for start in range(0, len(y), self.batch_size):
                xb = x[start : start + self.batch_size].to(device)
                yb = y[start : start + self.batch_size].to(device)
                logits = clf(xb)
                loss_sum += float(torch.nn.functional.cross_entropy(logits, yb, reduction="sum"))
                correct += int((logits.argmax(-1) == yb).sum())
            report[task] = {"accuracy": correct / len(y), "loss": loss_sum / len(y)}
        report["average"] = {
            "accuracy": sum(report[t]["accuracy"] for t in self.tasks) / len(self.tasks),
            "loss": sum(report[t]["loss"] for t in self.tasks) / len(self.tasks),
        }
        model.to("cpu")
        return report
