"""Layer-wise AdaMerging (Yang et al., ICLR 2024) on the testbed, through FusionBench's own
:class:`~fusion_bench.method.adamerging.layer_wise_adamerging.LayerWiseAdaMergingAlgorithm`.

Only what the testbed needs is subclassed, as FusionBench's CLIP subclass does: the task's frozen
head plays CLIP's zero-shot head (:meth:`compute_logits`, through the testbed's own classifier:
image or text), and the test inputs are read without their labels
(:meth:`get_shuffled_test_loader_iter`, as FusionBench reads the CLIP test sets; texts are
batched as the task pool batches them, each batch cut to its longest text).
Everything else, the per-parameter merge weights λ (one per fine-tuned model and parameter
tensor, initialised to ``init_values``: Task Arithmetic's task vectors at that coefficient), the
entropy loss summed over the tasks, Adam, the step loop and ``merge_and_unload``, is
FusionBench's. Uses unlabelled test inputs: not data-free.

The stopping rule (issue 32): FusionBench's loop runs ``max_steps`` steps (its default, 1,000);
with ``stop_window`` set it also stops once the loss has levelled off (:func:`levelled_off`: the
mean loss of the last ``stop_window`` steps is within ``stop_rel_change`` of the mean of the
``stop_window`` steps before). The loop itself is FusionBench's: the next step's first batch
request ends it.

Written beside the run's report (the program's log dir): ``merging_weights.pt`` (FusionBench's
``save_merging_weights``: λ, shape ``(tasks, parameters)``) and ``adamerging_curve.json`` (the
entropy loss per step, summed over the tasks; seconds; steps; why it stopped).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from fusion_bench.method.adamerging.entropy_loss import entropy_loss
from fusion_bench.method.adamerging.layer_wise_adamerging import LayerWiseAdaMergingAlgorithm
from omegaconf import DictConfig

from fusion_bench_larv.evaluation.per_sample import program_report_dir

from .pools import encode_inputs, open_testbed, trimmed

__all__ = ["TestbedLayerWiseAdaMerging"]

CURVE = "adamerging_curve.json"


def levelled_off(curve: Sequence[float], window: int, rel_change: float) -> bool:
    """Whether the loss changed by less than ``rel_change`` over the last ``window`` steps:
    with m_1 the mean of the ``window`` losses before the last ``window`` and m_2 the mean of the
    last ``window``, |m_2 − m_1| < rel_change · |m_1| (means, not single steps: each step's loss
    is one batch per task). False before 2 · ``window`` steps."""
    if len(curve) < 2 * window:
        return False
    m1 = sum(curve[-2 * window : -window]) / window
    m2 = sum(curve[-window:]) / window
    return abs(m2 - m1) < rel_change * abs(m1)


class _LevelledOff(Exception):
    """Ends FusionBench's step loop at the next step's first batch request."""


class TestbedLayerWiseAdaMerging(LayerWiseAdaMergingAlgorithm):
    """FusionBench's layer-wise AdaMerging with the testbed's heads and unlabelled test inputs
    (images or texts).

    Config keys: FusionBench's ``adamerging/clip`` keys (``init_values``, ``lr``, ``max_steps``,
    ``batch_size``, ``clamp_weights``, ``tie_weights``, ``strict``, ``optimizer``, ``weights``,
    ``save_merging_weights``), plus the testbed's ``recipe`` / ``cache_dir`` / ``testbed_dir``,
    ``seed`` (the shuffling of the test images) and the stopping rule's ``stop_window`` (null:
    run ``max_steps``) and ``stop_rel_change`` (:func:`levelled_off`)."""

    def __init__(self, **config: Any):
        super().__init__(DictConfig(config))
        self.testbed = open_testbed(
            config.get("recipe", "quick"), config.get("cache_dir"), config.get("testbed_dir")
        )
        if self.testbed.modality == "generation":
            raise ValueError(
                f"layer-wise AdaMerging here minimises the entropy of each task head's class "
                f"predictions; the decoder testbed {self.testbed.root} has generation tasks and "
                "no heads (not implemented for it)"
            )
        #: where the curve and λ go; default the program's report folder (set by launchers)
        self.report_dir: str | None = None
        self._iters: dict[str, Iterator] = {}
        self._classifiers: dict[str, torch.nn.Module] = {}
        self._step_losses: list[float] = []
        self.curve: list[float] = []
        window, change = config.get("stop_window"), config.get("stop_rel_change")
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, int) or window < 1
            or not isinstance(change, (int, float)) or not 0 < change < 1
        ):  # fmt: skip
            raise ValueError(
                f"AdaMerging's stopping rule needs stop_window a positive integer (or null: run "
                f"max_steps) and 0 < stop_rel_change < 1; got {window!r}, {change!r}"
            )
        self._stop = None if window is None else (window, float(change))
        self.stopped: str | None = None

    def log_hyperparams(self, *args, **kwargs):
        """FusionBench's, when the fabric has a logger (the in-process launcher shares one
        fabric without loggers between cells)."""
        if self.fabric is not None and self.fabric.loggers:
            return super().log_hyperparams(*args, **kwargs)
        return None

    def on_test_time_adaptation_start(self):
        self._started = time.perf_counter()

    def get_shuffled_test_loader_iter(self, task: str) -> Iterator:
        if self.stopped is not None:  # the loss levelled off after the last step: end the loop
            raise _LevelledOff
        if task not in self._iters:
            self._iters[task] = self._shuffled(task)
        return self._iters[task]

    def _shuffled(self, task: str) -> Iterator[tuple[dict[str, torch.Tensor]]]:
        """Endless batches ``(inputs,)`` of the task's test inputs, encoded as the classifier
        takes them, reshuffled every pass (seeded); the labels are never read."""
        raw, _ = self.testbed.test_set(task)
        x = encode_inputs(self.testbed, raw)
        g = torch.Generator().manual_seed(int(self.config.get("seed", 0)))
        size = int(self.config.batch_size)
        while True:
            order = torch.randperm(len(raw), generator=g)
            for start in range(0, len(order) - size + 1, size):
                batch = trimmed({k: v[order[start : start + size]] for k, v in x.items()})
                yield ({k: v.to(self.fabric.device) for k, v in batch.items()},)

    def compute_logits(self, module, inputs: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        clf = self._classifiers.get(task)
        if clf is None or clf.backbone is not module:
            clf = self.testbed.classifier(task, backbone=module)
            clf.head.to(self.fabric.device)  # the merged module is there already
            self._classifiers[task] = clf
        logits = clf(**inputs)
        # the loss the base loop takes from these logits, kept for the curve
        self._step_losses.append(float(entropy_loss(logits.detach())))
        if len(self._step_losses) == len(self.modelpool.model_names):
            self.curve.append(sum(self._step_losses))
            self._step_losses = []
            if self._stop is not None and levelled_off(self.curve, *self._stop):
                self.stopped = "levelled off"  # this step still updates λ, as FusionBench's
        return logits

    def test_time_adaptation(self, module):
        try:
            module = super().test_time_adaptation(module)
        except _LevelledOff:
            pass  # λ as the last step left it (FusionBench's step merges the weights)
        if self.stopped is None:
            self.stopped = "max_steps"
        self._write_curve(time.perf_counter() - self._started)
        return module

    def _out_dir(self) -> str | None:
        """Where the run's report goes (the cell's folder under the reproduction harness)."""
        if self.report_dir is not None:
            return str(self.report_dir)
        folder = program_report_dir(getattr(self, "_program", None))
        return None if folder is None else str(folder)

    def save_merging_weights(self, file_path: str, merging_weights: torch.Tensor):
        """FusionBench's λ file, beside the run's report rather than in the logger's folder."""
        out = self._out_dir()
        if out is not None and not os.path.isabs(file_path):
            file_path = os.path.join(out, file_path)
        os.makedirs(os.path.dirname(os.path.abspath(file_path)), exist_ok=True)
        torch.save(merging_weights.detach().cpu(), file_path)

    def _write_curve(self, seconds: float) -> None:
        log_dir = self._out_dir()
        rule = None
        if self._stop is not None:
            window, change = self._stop
            rule = {"window": window, "rel_change": change,
                    "rule": f"mean loss of the last {window} steps within {change:g} (relative) "
                            f"of the mean of the {window} before"}  # fmt: skip
        record = {"steps": len(self.curve), "seconds": seconds,
                  "loss": "entropy, summed over the tasks, per step", "curve": self.curve,
                  "max_steps": int(self.config.max_steps), "stop_rule": rule,
                  "stopped": self.stopped}  # fmt: skip
        self.last_curve = record
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            with open(os.path.join(log_dir, CURVE), "w") as f:
                json.dump(record, f, indent=1)
