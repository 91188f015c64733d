"""Per-sample correctness of a task pool's evaluations: one bool per test image, in test-set order,
per task, so that two runs on the same test images can be compared image by image (paired
intervals, :mod:`fusion_bench_larv.evaluation.intervals`).

A recording task pool (:class:`~fusion_bench_larv.RecordingCLIPVisionModelTaskPool`,
the testbed's ``TestbedTaskPool``) appends one evaluation per ``evaluate`` call to
``per_sample_evaluations`` and, when run by FusionBench's program, writes them all to
``per_sample.json`` beside the program's report (``report_save_path``) before the program writes
that report; the in-process launcher writes the same file into the cell's folder itself.

File format (JSON, written atomically)::

    {"format": "fusion_bench_larv.per_sample", "version": 1,
     "encoding": "numpy.packbits(bitorder='big'), base64",
     "evaluations": [{"tasks": {"<task>": {"n": 1000, "correct": 931, "bits": "<base64>",
                                          "labels_sha256": "<hex>"}}}]}

one entry per evaluation (a merged model: one; a dict of models, as the fine-tuned reference row:
one per model, in evaluation order). ``labels_sha256`` is the SHA-256 of the task's labels as
little-endian int64: two runs pair only on the same test labels in the same order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.correctness import ENCODING, decode_task, encode_task, labels_digest
from ..core.io import write_json_atomic

FILE = "per_sample.json"
FORMAT = "fusion_bench_larv.per_sample"
VERSION = 1
__all__ = [
    "ENCODING", "FILE", "FORMAT", "VERSION", "decode_task", "document", "encode_task",
    "labels_digest", "load", "matches_accuracy", "program_report_dir", "read", "read_digests",
    "record", "take", "write",
]  # fmt: skip


def matches_accuracy(correct: np.ndarray, accuracy: float) -> bool:
    """Whether a task's correctness vector is the evaluation an accuracy (a fraction) reports:
    its count of correct images is the one the accuracy implies, |Σ c_i / n − accuracy| < ½ / n
    (a stale or foreign file fails). An empty vector matches nothing."""
    return correct.size > 0 and abs(float(correct.mean()) - accuracy) < 0.5 / correct.size


def document(evaluations: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """The file's JSON document for ``evaluations`` (each ``{task: encoded entry}``)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "encoding": ENCODING,
        "evaluations": [{"tasks": dict(e)} for e in evaluations],
    }


def write(path: str | os.PathLike, evaluations: Sequence[Mapping[str, Mapping[str, Any]]]) -> Path:
    """Write ``evaluations`` to ``path`` atomically."""
    write_json_atomic(path, document(evaluations), indent=None)
    return Path(path)


def load(
    path: str | os.PathLike,
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, str | None]]] | None:
    """Every evaluation of a per-sample file, parsed once: ``({task: bool vector}, ...)`` and the
    labels' digests ``({task: digest or None}, ...)``; None when the file is missing, unreadable
    or of another format."""
    try:
        doc = json.loads(Path(path).read_text())
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            return None
        evaluations = [ev["tasks"] for ev in doc["evaluations"]]
        return (
            [{t: decode_task(e) for t, e in ev.items()} for ev in evaluations],
            [{t: e.get("labels_sha256") for t, e in ev.items()} for ev in evaluations],
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def read(path: str | os.PathLike) -> list[dict[str, np.ndarray]] | None:
    """Every evaluation of a per-sample file as ``{task: bool vector}`` (:func:`load`)."""
    loaded = load(path)
    return None if loaded is None else loaded[0]


def read_digests(path: str | os.PathLike) -> list[dict[str, str | None]] | None:
    """The labels' digests of every evaluation (None per task without one; :func:`load`)."""
    loaded = load(path)
    return None if loaded is None else loaded[1]


# ------------------------------------------------------------------------------------------------
# task pools
# ------------------------------------------------------------------------------------------------
def record(taskpool: Any, tasks: Mapping[str, Mapping[str, Any]], write_file: bool = True) -> None:
    """Append one evaluation (``{task: encoded entry}``) to the task pool's
    ``per_sample_evaluations`` and, when FusionBench's program runs the task pool (and
    ``write_file``: not for a validation split, whose examples are no test set), write the
    evaluations so far to ``per_sample.json`` beside the program's report."""
    evaluations = getattr(taskpool, "per_sample_evaluations", None)
    if evaluations is None:
        evaluations = []
        taskpool.per_sample_evaluations = evaluations
    evaluations.append(dict(tasks))
    folder = program_report_dir(getattr(taskpool, "_program", None)) if write_file else None
    if folder is not None:
        write(folder / FILE, evaluations)


def program_report_dir(program: Any) -> Path | None:
    """The folder of a FusionBench program's report (``report_save_path``, ``{log_dir}``
    filled in as the program fills it), else its log dir; None without a program."""
    if program is None:
        return None
    log_dir = getattr(program, "log_dir", None)
    report = getattr(program, "report_save_path", None)
    if report:
        report = str(report)
        if "{log_dir}" in report:
            if log_dir is None:
                return None
            report = report.format(log_dir=log_dir)
        return Path(report).parent
    return Path(log_dir) if log_dir is not None else None


def take(taskpool: Any) -> list[dict[str, Any]]:
    """The evaluations a task pool recorded since the last call (and forget them): the in-process
    launcher calls it around each cell's evaluation."""
    evaluations = list(getattr(taskpool, "per_sample_evaluations", None) or [])
    if hasattr(taskpool, "per_sample_evaluations"):
        taskpool.per_sample_evaluations = []
    return evaluations
