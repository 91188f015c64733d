"""FusionBench's CLIP task pool, recording per-sample correctness.

:class:`RecordingCLIPVisionModelTaskPool` is ``fusion_bench.taskpool.CLIPVisionModelTaskPool``
with nothing changed in how it evaluates: its own ``_evaluate`` runs on the same classifier and
test loader, each seen through a thin wrapper that notes the batch's targets and the argmax of
the logits the classifier returned. The report is FusionBench's, number for number; in addition
each evaluation's correctness per test image (test-set order) lands in ``per_sample_evaluations``
and, under FusionBench's program, in ``per_sample.json`` beside the program's report
(:mod:`fusion_bench_larv.evaluation.per_sample`).

Select it with ``taskpool._target_=fusion_bench_larv.RecordingCLIPVisionModelTaskPool``
over any CLIP task pool config of FusionBench's current form (``test_datasets``, ``processor``,
``clip_model``), or with this plugin's ``taskpool=CLIPVisionModelTaskPool/larv_recording_TA8``
(``_TALL14``, ``_TALL20``) configs.

FusionBench's older (v0.1) CLIP task pool configs, such as ``clip-vit-base-patch32_robustness_
corrupted`` (keys ``type: clip_vit_classification``, ``tasks``, ``clip_model``), have no
``_target_``: FusionBench's program builds them with its compat
``CLIPImageClassificationTaskPool``. :class:`RecordingCLIPImageClassificationTaskPool` is that
class, recording the same way; add it with ``+taskpool._target_=fusion_bench_larv.
RecordingCLIPImageClassificationTaskPool`` (``+``: the key is new to such a config).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fusion_bench.compat.taskpool.clip_image_classification import (
    CLIPImageClassificationTask,
    CLIPImageClassificationTaskPool,
)
from fusion_bench.taskpool import CLIPVisionModelTaskPool
from fusion_bench.tasks.classification import ClassificationTask

from ..errors import LarvConfigError
from . import per_sample as per_sample_mod

#: a model carrying this attribute (task names) is evaluated on those tasks only. The lab's
#: fine-tuned reference sets it, so that each fine-tuned model is read on its own task alone.
EVAL_TASKS = "larv_eval_tasks"


def evaluation_tasks(model: Any, tasks: list[str]) -> list[str]:
    """The tasks a task pool evaluates ``model`` on: ``tasks``, or those among them that the
    model's ``larv_eval_tasks`` attribute names (an unknown name is an error)."""
    wanted = getattr(model, EVAL_TASKS, None)
    if wanted is None:
        return list(tasks)
    unknown = [t for t in wanted if t not in tasks]
    if unknown:
        raise ValueError(f"{EVAL_TASKS} names tasks this task pool lacks: {unknown} (has {tasks})")
    return [t for t in tasks if t in wanted]


class _Notes:
    """Targets and predictions of one task's evaluation, batch by batch."""

    def __init__(self) -> None:
        self.targets: list[np.ndarray] = []
        self.preds: list[np.ndarray] = []

    def entry(self, task: str) -> dict[str, Any]:
        if len(self.targets) != len(self.preds):
            raise RuntimeError(
                f"{task}: {len(self.targets)} batches read but {len(self.preds)} classified"
            )
        y = np.concatenate(self.targets) if self.targets else np.zeros(0, dtype=np.int64)
        p = np.concatenate(self.preds) if self.preds else np.zeros(0, dtype=np.int64)
        return per_sample_mod.encode_task(p == y, y)


class _Loader:
    """Yields the test loader's batches unchanged, noting each batch's targets."""

    def __init__(self, loader, notes: _Notes):
        self._loader, self._notes = loader, notes

    def __iter__(self):
        for batch in self._loader:
            self._notes.targets.append(batch[1].detach().cpu().numpy().reshape(-1))
            yield batch

    def __len__(self) -> int:
        return len(self._loader)


class _Classifier:
    """Calls the classifier unchanged, noting the argmax of the logits it returns; every other
    attribute is the classifier's."""

    def __init__(self, classifier, notes: _Notes):
        self.__dict__["_classifier"] = classifier
        self.__dict__["_notes"] = notes

    def __call__(self, *args, **kwargs):
        out = self._classifier(*args, **kwargs)
        logits = out["logits"] if isinstance(out, dict) or hasattr(out, "keys") else out
        self._notes.preds.append(logits.detach().argmax(-1).cpu().numpy().reshape(-1))
        return out

    def __getattr__(self, name: str):
        return getattr(self._classifier, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._classifier, name, value)


class RecordingCLIPVisionModelTaskPool(CLIPVisionModelTaskPool):
    """``CLIPVisionModelTaskPool`` that also records per-sample correctness (module docstring)."""

    def __init__(self, *args, **kwargs):
        if not args and "test_datasets" not in kwargs and "type" in kwargs:
            # an old-style config given this class as its `_target_`: its keys are not ours
            raise LarvConfigError(
                f"task pool `type: {kwargs['type']}` is FusionBench's older (v0.1) config form "
                "(`tasks`, `clip_model`), which RecordingCLIPVisionModelTaskPool cannot read: "
                "use `+taskpool._target_=fusion_bench_larv.RecordingCLIPImageClassificationTaskPool`"
            )
        super().__init__(*args, **kwargs)

    def _evaluate(self, classifier, test_loader, num_classes: int, task_name: str = None):
        notes = _Notes()
        result = super()._evaluate(
            _Classifier(classifier, notes), _Loader(test_loader, notes), num_classes, task_name
        )
        self._current_per_sample[task_name] = notes.entry(task_name)
        return result

    def evaluate(self, model, name=None, **kwargs):
        self._current_per_sample: dict[str, Any] = {}
        if getattr(model, EVAL_TASKS, None) is None:
            report = super().evaluate(model, name=name, **kwargs)
        else:
            if not self._is_setup:
                self.setup()
            every = self.test_dataloaders
            tasks = evaluation_tasks(model, list(every))
            self.test_dataloaders = {t: every[t] for t in tasks}
            try:
                report = super().evaluate(model, name=name, **kwargs)
            finally:
                self.test_dataloaders = every
        per_sample_mod.record(self, self._current_per_sample)
        return report


class _NotedClassification(ClassificationTask):
    """FusionBench's classification loop, on the classifier seen through the task's notes."""

    notes: _Notes

    def evaluate(self, classifier, device=None):
        return super().evaluate(_Classifier(classifier, self.notes), device)


class _RecordingTask(CLIPImageClassificationTask, _NotedClassification):
    """FusionBench's compat CLIP task: its ``evaluate`` builds the zero-shot classifier and hands
    it to the loop (next in this MRO: :class:`_NotedClassification`); its test loader is seen
    through the same notes."""

    @property
    def test_loader(self):
        return _Loader(super().test_loader, self.notes)


class RecordingCLIPImageClassificationTaskPool(CLIPImageClassificationTaskPool):
    """FusionBench's compat ``CLIPImageClassificationTaskPool`` (the older config form, module
    docstring) that also records per-sample correctness; the report is FusionBench's.

    Built from the config as FusionBench builds it (``RecordingCLIPImageClassificationTaskPool(
    config)``) or, through ``_target_``, from the config's keys as keyword arguments."""

    def __init__(self, taskpool_config=None, **config):
        from omegaconf import OmegaConf

        if taskpool_config is None:
            taskpool_config = OmegaConf.create(config)
        super().__init__(taskpool_config)
        self._current_notes: dict[str, _Notes] = {}  # task -> its notes, in the evaluation

    def load_task(self, task_name_or_config):
        task = super().load_task(task_name_or_config)
        # the same object, FusionBench's task, with its evaluation seen through notes
        task.__class__ = _RecordingTask
        task.notes = self._current_notes.setdefault(task.config["name"], _Notes())
        return task

    def evaluate(self, model, name=None):
        self._current_notes = {}
        every = self._all_task_names
        self._all_task_names = evaluation_tasks(model, every)
        try:
            report = super().evaluate(model, name=name)
        finally:
            self._all_task_names = every
        per_sample_mod.record(self, {t: n.entry(t) for t, n in self._current_notes.items()})
        return report
