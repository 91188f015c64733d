"""FusionBench's CLIP task pool, recording per-sample correctness.

:class:`RecordingCLIPVisionModelTaskPool` is ``fusion_bench.taskpool.CLIPVisionModelTaskPool``
with nothing changed in how it evaluates: its own ``_evaluate`` runs on the same classifier and
test loader, each seen through a thin wrapper that notes the batch's targets and the argmax of
the logits the classifier returned. The report is FusionBench's, number for number; in addition
each evaluation's correctness per test image (test-set order) lands in ``per_sample_evaluations``
and, under FusionBench's program, in ``per_sample.json`` beside the program's report
(:mod:`fusion_bench_larv.evaluation.per_sample`).

Select it with ``taskpool._target_=fusion_bench_larv.RecordingCLIPVisionModelTaskPool``
over any CLIP task pool config, or with this plugin's ``taskpool=CLIPVisionModelTaskPool/
larv_recording_TA8`` (``_TALL14``, ``_TALL20``) configs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fusion_bench.taskpool import CLIPVisionModelTaskPool

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
