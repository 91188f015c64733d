"""Choosing one hyperparameter on held-out labelled data (docs/method.md, "Choosing on
validation data"): LiNeS's β and guarded LARV's tier spread δ.

A ``validation`` config is ``{taskpool: <a FusionBench task pool config>, grid: [v_1, …, v_n]}``;
the task pool must evaluate on labelled examples held out from the tasks' training data, never on
the test set (the testbed's ``split: validation``). Each candidate's score is the task pool's
average accuracy; the chosen value is

    v* = v_i with i = min argmax_i score(v_i),

i.e. ties go to the earlier grid value (list the safe value first: δ = 0, the base merger).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..errors import LarvConfigError

__all__ = ["build_taskpool", "check_validation", "choose", "taskpool_report", "validation_score"]


def choose(scores: Sequence[float]) -> int:
    """The index of the best score, the first one among equals."""
    if not scores:
        raise ValueError("no candidate to choose from")
    best = 0
    for i, s in enumerate(scores):
        if s > scores[best]:
            best = i
    return best


def validation_score(report: Mapping[str, Any]) -> float:
    """A task pool report's average accuracy (``report["average"]["accuracy"]``, else the mean
    of the tasks' ``accuracy``), as a fraction."""
    avg = report.get("average")
    if isinstance(avg, Mapping) and isinstance(avg.get("accuracy"), (int, float)):
        return float(avg["accuracy"])
    accs = [
        float(v["accuracy"])
        for k, v in report.items()
        if k not in ("average", "model_info")
        and isinstance(v, Mapping)
        and isinstance(v.get("accuracy"), (int, float))
    ]
    if not accs:
        raise ValueError(f"the validation task pool's report has no accuracy: {sorted(report)}")
    return sum(accs) / len(accs)


def check_validation(
    value: Any, method: str, name: str, minimum: float = 0.0
) -> tuple[Any, tuple[float, ...]] | None:
    """``None``, or ``(taskpool config, grid)`` from a ``validation`` config node; a
    :class:`LarvConfigError` saying what is wrong otherwise. ``name`` is the chosen parameter
    (β, δ); grid values must be finite and ≥ ``minimum``, distinct."""
    if value is None:
        return None
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=False)
    where = f"{method} config `validation`"
    if not isinstance(value, Mapping) or set(value) != {"taskpool", "grid"}:
        raise LarvConfigError(
            f"{where} must be null or {{taskpool: <task pool config on held-out labelled data>, "
            f"grid: [values of {name}]}}, got {value!r}"
        )
    grid = value["grid"]
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or not grid:
        raise LarvConfigError(f"{where}.grid must be a non-empty list of {name} values")
    out = []
    for g in grid:
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g):
            raise LarvConfigError(f"{where}.grid holds {g!r}: finite numbers only")
        if g < minimum:
            raise LarvConfigError(f"{where}.grid holds {g!r}: {name} ≥ {minimum:g}")
        out.append(float(g))
    if len(set(out)) != len(out):
        raise LarvConfigError(f"{where}.grid repeats a value: {out}")
    taskpool = value["taskpool"]
    if not (isinstance(taskpool, Mapping) and "_target_" in taskpool) and not hasattr(
        taskpool, "evaluate"
    ):
        raise LarvConfigError(
            f"{where}.taskpool must be a task pool config with `_target_` (or a task pool "
            f"object), got {taskpool!r}"
        )
    return taskpool, tuple(out)


def build_taskpool(cfg: Any) -> Any:
    """The validation task pool: ``cfg`` itself when it is built, else instantiated (Hydra)."""
    if hasattr(cfg, "evaluate"):
        return cfg
    from hydra.utils import instantiate

    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    return instantiate(node, _recursive_=False)


def taskpool_report(cfg: Any) -> Any:
    """The validation task pool for a report: its config as plain data, or its class name."""
    if hasattr(cfg, "evaluate"):
        return type(cfg).__name__
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)
