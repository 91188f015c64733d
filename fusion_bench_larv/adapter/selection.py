"""Choosing one hyperparameter on held-out labelled data (docs/method.md, "Choosing on
validation data"): LiNeS's β, the signed depth ramp's β and guarded LARV's tier spread δ.

A ``validation`` config node::

    taskpool: <a FusionBench task pool config on examples held out from training, never test>
    grid: [v_1, …, v_n]          # the values tried first, the safe one first
    grow: null | {step: s, bounds: [lo, hi], max_values: m}
    guard: null | false | true | {level: 0.95, resamples: 2000, seed: 0}
    uncovered: refuse | base | choose

Each candidate's score is the task pool's average accuracy; the best is

    v* = v_i with i = min argmax_i score(v_i)

(ties go to the value tried first). **Growing** (:func:`grow_grid`): while v* is the grid's
largest value, the grid gains min(max + s, hi); while it is the smallest, max(min − s, lo); it
stops when v* is interior, when the edge v* sits on is a bound, or when the grid holds ``m``
values. **Coverage** (:func:`coverage`): a task of the model pool that the validation report
does not score is uncovered; ``uncovered`` says what happens then (``refuse``: a
:class:`LarvInputError`, the default; ``base``: keep the base merger; ``choose``: choose on the
covered tasks), and a warning names the tasks whatever the policy. **The guard**
(:func:`guard_interval`): with v_0 the value that leaves the base merger as it is (δ = 0),
v* is kept only when the paired bootstrap interval of the validation gain acc(v*) − acc(v_0)
(equal task weights, :func:`~fusion_bench_larv.core.intervals.average_bootstrap`) lies above 0;
otherwise v_0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ..core import intervals
from ..core.correctness import decode_task
from ..errors import LarvConfigError

__all__ = [
    "UNCOVERED",
    "Guard",
    "GrowRule",
    "Validation",
    "build_taskpool",
    "check_validation",
    "choose",
    "coverage",
    "grow_grid",
    "guard_interval",
    "last_correctness",
    "taskpool_report",
    "validation_score",
]

#: what a choice does when the validation report leaves tasks of the model pool out
UNCOVERED = ("refuse", "base", "choose")
_KEYS = {"taskpool", "grid", "grow", "guard", "uncovered"}
_GROW_KEYS = {"step", "bounds", "max_values"}
_GUARD_KEYS = {"level", "resamples", "seed"}
# a grown value is rounded to this many decimals, so that 0.1 + 0.1 + 0.1 is 0.3
_DECIMALS = 12


@dataclass(frozen=True)
class GrowRule:
    """Extend the grid by ``step`` beyond whichever edge is best, within ``bounds`` (lo, hi;
    None: open), to at most ``max_values`` values."""

    step: float
    bounds: tuple[float | None, float | None]
    max_values: int

    def to_dict(self) -> dict:
        return {"step": self.step, "bounds": list(self.bounds), "max_values": self.max_values}


@dataclass(frozen=True)
class Guard:
    """Keep the chosen value only when its paired validation gain over the base value has an
    interval (``level``, ``resamples`` bootstrap draws, ``seed``) above 0."""

    level: float = intervals.DEFAULT_LEVEL
    resamples: int = intervals.DEFAULT_RESAMPLES
    seed: int = intervals.DEFAULT_SEED

    def to_dict(self) -> dict:
        return {"level": self.level, "resamples": self.resamples, "seed": self.seed}


@dataclass(frozen=True)
class Validation:
    """A checked ``validation`` node."""

    taskpool: Any
    grid: tuple[float, ...]
    grow: GrowRule | None
    guard: Guard | None
    uncovered: str


def choose(scores: Sequence[float]) -> int:
    """The index of the best score, the first one among equals."""
    if not scores:
        raise ValueError("no candidate to choose from")
    best = 0
    for i, s in enumerate(scores):
        if s > scores[best]:
            best = i
    return best


def grow_grid(
    values: Sequence[float], scores: Sequence[float], rule: GrowRule | None
) -> tuple[list[float], str]:
    """The values to try next and why the search stops when there are none.

    With v* = ``values[choose(scores)]``: v* strictly between min and max → ``([],
    "interior")``; v* = max < hi → min(max + step, hi) is added, v* = min > lo → max(min − step,
    lo) (a single value is both edges); v* on an edge that is a bound → ``"bound"``; no room
    left under ``max_values`` → ``"max_values"``; no rule → ``"fixed grid"``."""
    best = values[choose(scores)]
    top, bottom = max(values), min(values)
    if rule is None:
        return [], "fixed grid"
    if bottom < best < top:
        return [], "interior"
    lo, hi = rule.bounds
    new = []
    if best == top and (hi is None or top < hi):
        up = top + rule.step
        new.append(round(up if hi is None else min(up, hi), _DECIMALS))
    if best == bottom and (lo is None or bottom > lo):
        down = bottom - rule.step
        new.append(round(down if lo is None else max(down, lo), _DECIMALS))
    new = [v for v in dict.fromkeys(new) if v not in values]
    if not new:
        return [], "bound"
    room = rule.max_values - len(values)
    if room <= 0:
        return [], "max_values"
    return new[:room], ""


def validation_score(report: Mapping[str, Any]) -> float:
    """A task pool report's average accuracy (``report["average"]["accuracy"]``, else the mean
    of the tasks' ``accuracy``), as a fraction."""
    avg = report.get("average")
    if isinstance(avg, Mapping) and isinstance(avg.get("accuracy"), (int, float)):
        return float(avg["accuracy"])
    accs = [float(v["accuracy"]) for v in _task_entries(report).values()]
    if not accs:
        raise ValueError(f"the validation task pool's report has no accuracy: {sorted(report)}")
    return sum(accs) / len(accs)


def _task_entries(report: Mapping[str, Any]) -> dict[str, Mapping]:
    return {
        k: v
        for k, v in report.items()
        if k not in ("average", "model_info")
        and isinstance(v, Mapping)
        and isinstance(v.get("accuracy"), (int, float))
    }


def coverage(report: Mapping[str, Any], tasks: Sequence[str]) -> tuple[list[str], list[str]]:
    """(covered, uncovered): the model pool's ``tasks`` that the validation report scores (an
    entry with an ``accuracy``), and those it does not."""
    scored = _task_entries(report)
    return [t for t in tasks if t in scored], [t for t in tasks if t not in scored]


def last_correctness(taskpool: Any, count_before: int) -> dict[str, np.ndarray] | None:
    """The per-example correctness of the task pool's latest evaluation (``{task: bool
    vector}``), from ``per_sample_evaluations`` as the recording task pools keep it; None when
    the evaluation added no entry there (a task pool that does not record)."""
    evaluations = getattr(taskpool, "per_sample_evaluations", None) or []
    if len(evaluations) <= count_before:
        return None
    return {t: decode_task(e) for t, e in evaluations[-1].items()}


def guard_interval(
    chosen: Mapping[str, np.ndarray],
    base: Mapping[str, np.ndarray],
    tasks: Sequence[str],
    guard: Guard,
) -> intervals.Interval:
    """Δ̄ = (1/T) Σ_t (acc_t(chosen) − acc_t(base)) over ``tasks`` and its paired bootstrap
    interval on the same validation examples
    (:func:`~fusion_bench_larv.core.intervals.average_bootstrap`)."""
    missing = [t for t in tasks if t not in chosen or t not in base]
    if missing:
        raise ValueError(f"no per-example correctness for {missing}")
    return intervals.average_bootstrap(
        [(chosen[t], base[t]) for t in tasks],
        resamples=guard.resamples,
        seed=guard.seed,
        level=guard.level,
    )


def _number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _bounds_text(lo: float | None, hi: float | None, name: str) -> str:
    if lo is None and hi is None:
        return f"any finite {name}"
    if hi is None:
        return f"{name} ≥ {lo:g}"
    if lo is None:
        return f"{name} ≤ {hi:g}"
    return f"{lo:g} ≤ {name} ≤ {hi:g}"


def _check_value(g: Any, where: str, name: str, lo: float | None, hi: float | None) -> float:
    if not _number(g):
        raise LarvConfigError(f"{where} holds {g!r}: finite numbers only")
    if lo is not None and g < lo:
        raise LarvConfigError(f"{where} holds {g!r}: {_bounds_text(lo, hi, name)}")
    if hi is not None and g > hi:
        raise LarvConfigError(f"{where} holds {g!r}: {_bounds_text(lo, hi, name)}")
    return float(g)


def _check_grow(value: Any, where: str, name: str, domain) -> GrowRule | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) != _GROW_KEYS:
        raise LarvConfigError(
            f"{where}.grow must be null (the grid as given) or {{step: <how far beyond the best "
            f"edge>, bounds: [lo, hi] (null: open), max_values: <most values tried>}}, got "
            f"{value!r}"
        )
    step = value["step"]
    if not _number(step) or step <= 0:
        raise LarvConfigError(f"{where}.grow.step = {step!r}: a positive number")
    bounds = value["bounds"]
    if isinstance(bounds, (str, bytes)) or not isinstance(bounds, Sequence) or len(bounds) != 2:
        raise LarvConfigError(f"{where}.grow.bounds = {bounds!r}: [lo, hi], null for open")
    lo, hi = (None if b is None else _check_value(b, f"{where}.grow.bounds", name, *domain)
              for b in bounds)  # fmt: skip
    # the method's own bounds always hold (LiNeS: β ≥ 0; guarded LARV: 0 ≤ δ ≤ 1)
    lo = domain[0] if lo is None else lo
    hi = domain[1] if hi is None else hi
    if lo is not None and hi is not None and lo > hi:
        raise LarvConfigError(f"{where}.grow.bounds = {bounds!r}: lo ≤ hi")
    m = value["max_values"]
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise LarvConfigError(f"{where}.grow.max_values = {m!r}: a positive integer")
    return GrowRule(float(step), (lo, hi), m)


def _check_guard(value: Any, where: str, default: bool) -> Guard | None:
    if value is None:
        value = default
    if value is False:
        return None
    if value is True:
        return Guard()
    if not isinstance(value, Mapping) or not set(value) <= _GUARD_KEYS:
        raise LarvConfigError(
            f"{where}.guard must be null (the method's default), true, false or {{level, "
            f"resamples, seed}}, got {value!r}"
        )
    guard = Guard(**value)
    if not _number(guard.level) or not 0 < guard.level < 1:
        raise LarvConfigError(f"{where}.guard.level = {guard.level!r}: in (0, 1)")
    for key in ("resamples", "seed"):
        v = getattr(guard, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "resamples" else 0):
            raise LarvConfigError(f"{where}.guard.{key} = {v!r}: a non-negative integer"
                                  + (" ≥ 1" if key == "resamples" else ""))  # fmt: skip
    return guard


def check_validation(
    value: Any,
    method: str,
    name: str,
    domain: tuple[float | None, float | None] = (0.0, None),
    base_value: float | None = None,
    guard_default: bool = False,
) -> Validation | None:
    """``None``, or the checked :class:`Validation` of a ``validation`` config node; a
    :class:`LarvConfigError` saying what is wrong otherwise. ``name`` is the chosen parameter
    (β, δ), ``domain`` the values the method accepts (lo, hi; None: open), ``base_value`` the
    value that leaves the base merger as it is (None: the method has none; then neither the
    guard nor ``uncovered: base`` can be asked for), ``guard_default`` whether the guard is on
    when the node does not say."""
    if value is None:
        return None
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=False)
    where = f"{method} config `validation`"
    if not isinstance(value, Mapping) or not {"taskpool", "grid"} <= set(value) <= _KEYS:
        raise LarvConfigError(
            f"{where} must be null or {{taskpool: <task pool config on held-out labelled data>, "
            f"grid: [values of {name}], grow: ..., guard: ..., uncovered: ...}} (taskpool and "
            f"grid required), got {value!r}"
        )
    grid = value["grid"]
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or not grid:
        raise LarvConfigError(f"{where}.grid must be a non-empty list of {name} values")
    out = tuple(_check_value(g, f"{where}.grid", name, *domain) for g in grid)
    if len(set(out)) != len(out):
        raise LarvConfigError(f"{where}.grid repeats a value: {list(out)}")
    grow = _check_grow(value.get("grow"), where, name, domain)
    if grow is not None:
        for g in out:
            _check_value(g, f"{where}.grid (within grow.bounds)", name, *grow.bounds)
        if len(out) > grow.max_values:
            raise LarvConfigError(f"{where}.grid holds more than grow.max_values values")
    guard = _check_guard(value.get("guard"), where, guard_default)
    uncovered = value.get("uncovered") or "refuse"
    if uncovered not in UNCOVERED:
        raise LarvConfigError(f"{where}.uncovered = {uncovered!r}: one of {', '.join(UNCOVERED)}")
    if base_value is None and (guard is not None or uncovered == "base"):
        raise LarvConfigError(
            f"{where}: {'the guard' if guard is not None else 'uncovered: base'} needs a value "
            f"of {name} that gives the base merger back, and {method} has none; set "
            f"{'guard: false' if guard is not None else 'uncovered: refuse or choose'}"
        )
    if base_value is not None and (guard is not None or uncovered == "base"):
        if base_value not in out:
            raise LarvConfigError(
                f"{where}.grid must hold {name} = {base_value:g} (the base merger), which the "
                f"{'guard compares against' if guard is not None else 'uncovered: base keeps'}"
            )
    taskpool = value["taskpool"]
    if not (isinstance(taskpool, Mapping) and "_target_" in taskpool) and not hasattr(
        taskpool, "evaluate"
    ):
        raise LarvConfigError(
            f"{where}.taskpool must be a task pool config with `_target_` (or a task pool "
            f"object), got {taskpool!r}"
        )
    return Validation(taskpool, out, grow, guard, uncovered)


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
