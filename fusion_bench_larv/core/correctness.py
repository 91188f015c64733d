"""Per-sample correctness, packed: one bool per example (in the task's example order) as
``numpy.packbits(bitorder='big')`` in base64, with its count and, optionally, the SHA-256 of the
labels. The per-sample files (:mod:`fusion_bench_larv.evaluation.per_sample`) and the validation
guard (:mod:`fusion_bench_larv.adapter.selection`) read the same entries."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["ENCODING", "decode_task", "encode_task", "labels_digest"]

ENCODING = "numpy.packbits(bitorder='big'), base64"


def labels_digest(labels: Sequence[int] | np.ndarray) -> str:
    """SHA-256 of the labels as little-endian int64 (identifies a test set and its order)."""
    arr = np.asarray(labels, dtype="<i8").ravel()
    return hashlib.sha256(arr.tobytes()).hexdigest()


def encode_task(correct: Sequence[bool] | np.ndarray, labels=None) -> dict[str, Any]:
    """One task's entry: n, the number correct, the packed bits and (optionally) the labels'
    digest."""
    c = np.asarray(correct, dtype=bool).ravel()
    entry: dict[str, Any] = {
        "n": int(c.size),
        "correct": int(c.sum()),
        "bits": base64.b64encode(np.packbits(c, bitorder="big").tobytes()).decode("ascii"),
    }
    if labels is not None:
        if len(labels) != c.size:
            raise ValueError(f"{len(labels)} labels for {c.size} predictions")
        entry["labels_sha256"] = labels_digest(labels)
    return entry


def decode_task(entry: Mapping[str, Any]) -> np.ndarray:
    """The bool vector of one task's entry; checks its length and count."""
    n = int(entry["n"])
    raw = np.frombuffer(base64.b64decode(entry["bits"]), dtype=np.uint8)
    c = np.unpackbits(raw, count=n, bitorder="big").astype(bool)
    if c.size != n or int(c.sum()) != int(entry["correct"]):
        raise ValueError("per-sample entry does not decode to its own n / correct")
    return c
