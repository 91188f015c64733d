"""LARV's gates and depth-only schedules by name: one entry each, holding its function, the
settings keys it reads and their checks (docs/method.md, "Composite score and gates",
"Depth-only schedules"). :class:`~.settings.LarvSettings` checks and warns from these tables and
the veneer applies the chosen gate from them: adding a gate or a schedule is one
:func:`register_gate` / :func:`register_schedule` call."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import keys
from .gates import (
    DEFAULT_LEVELS,
    TIER_LEVELS,
    W_NORMALIZATIONS,
    continuous_gate,
    depth_fraction,
    normalize_scores,
    tiered_gate,
    tiers,
)

__all__ = [
    "GATES",
    "SCHEDULES",
    "Gate",
    "GateOutput",
    "Schedule",
    "apply_gate",
    "depth_schedule",
    "register_gate",
    "register_schedule",
]


@dataclass(frozen=True)
class GateOutput:
    """A gate's scale s_ℓ per block, and what it read w through: the tiered gate's thresholds
    (t_1, t_2), the continuous gate's normalizer (the median of w under ``w_normalize:
    median``); None where the gate has none."""

    scales: list[float]
    thresholds: tuple[float, float] | None = None
    normalizer: float | None = None


@dataclass(frozen=True)
class Gate:
    """One gate: ``apply(w, settings)`` gives the scales of the L blocks from their composite
    scores. ``keys``: the settings keys only this gate reads (set under another gate, they warn
    as keys without effect); ``check(values)`` receives every setting's value and returns the
    checked, normalised values of ``keys`` (raising ``LarvConfigError`` on a bad one); it runs
    whichever gate is chosen, so a bad value never waits for the gate that reads it. ``ignores``:
    keys of other gates this gate ignores, with the reason the warning gives."""

    name: str
    apply: Callable[[list[float], Any], GateOutput]
    keys: tuple[str, ...] = ()
    check: Callable[[Mapping[str, Any]], Mapping[str, Any]] = lambda values: {}
    ignores: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Schedule:
    """One depth-only schedule: ``scales(L, schedule_scales)`` gives the L block scales.
    ``num_scales``: how many values ``schedule_scales`` holds (0: it takes none, ``fixed`` says
    what it does instead); ``default``: the values used when ``schedule_scales`` is null;
    ``signed``: the values may be negative (they are parameters, not scales)."""

    name: str
    scales: Callable[[int, tuple[float, ...]], list[float]]
    num_scales: int
    default: tuple[float, ...] = ()
    signed: bool = False
    fixed: str = ""


GATES: dict[str, Gate] = {}
SCHEDULES: dict[str, Schedule] = {}


def register_gate(gate: Gate) -> Gate:
    """Add (or replace) a gate, selectable as ``gate: <name>``."""
    GATES[gate.name] = gate
    return gate


def register_schedule(schedule: Schedule) -> Schedule:
    """Add (or replace) a depth-only schedule, selectable as ``gate: schedule``, ``schedule:
    <name>``."""
    SCHEDULES[schedule.name] = schedule
    return schedule


def depth_schedule(
    name: str, num_layers: int, scales: Sequence[float] | None = None
) -> list[float]:
    """The registered schedule ``name`` for L blocks, with ``scales`` (else its defaults)."""
    if num_layers < 1:
        raise ValueError("a schedule needs at least one layer")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
    entry = SCHEDULES[name]
    return entry.scales(num_layers, tuple(scales) if scales is not None else entry.default)


def apply_gate(w: Sequence[float], settings: Any) -> GateOutput:
    """The scales the gate ``settings.gate`` gives the composite scores ``w``."""
    return GATES[settings.gate].apply(list(w), settings)


# -- the paper's gates ----------------------------------------------------------------------------
def _check_tiered(values: Mapping[str, Any]) -> dict[str, Any]:
    alpha, beta = keys.number("alpha", values["alpha"]), keys.number("beta", values["beta"])
    if not 0 < alpha < 1:
        raise keys.bad("alpha", alpha, "a quantile in (0, 1)")
    if not 0 < beta < 1:
        raise keys.bad("beta", beta, "a quantile in (0, 1)")
    if not alpha < beta:
        raise keys.bad("alpha", alpha, f"must be smaller than beta = {beta}")
    return {"alpha": alpha, "beta": beta, "levels": keys.scales("levels", values["levels"], 3)}


def _check_continuous(values: Mapping[str, Any]) -> dict[str, Any]:
    gamma = keys.number("gamma", values["gamma"])
    if gamma <= 0:
        raise keys.bad("gamma", gamma, "a sharpness > 0")
    return {"gamma": gamma, "w_normalize": keys.choice("w_normalize", values["w_normalize"],
                                                       W_NORMALIZATIONS)}  # fmt: skip


def _check_schedule(values: Mapping[str, Any]) -> dict[str, Any]:
    name = keys.choice("schedule", values["schedule"], SCHEDULES)
    given = values["schedule_scales"]
    if given is None:
        return {"schedule": name, "schedule_scales": None}
    entry = SCHEDULES[name]
    if entry.num_scales == 0:
        raise keys.bad("schedule_scales", given, f"`{name}` takes none ({entry.fixed})")
    check = keys.numbers if entry.signed else keys.scales
    return {"schedule": name, "schedule_scales": check("schedule_scales", given, entry.num_scales)}


def _tiered(w: list[float], s: Any) -> GateOutput:
    scales, thresholds = tiered_gate(w, s.alpha, s.beta, s.levels)
    return GateOutput(scales, thresholds=thresholds)


def _continuous(w: list[float], s: Any) -> GateOutput:
    read, normalizer = normalize_scores(w, s.w_normalize)
    return GateOutput(continuous_gate(read, s.gamma), normalizer=normalizer)


register_gate(Gate(
    "tiered", _tiered, ("alpha", "beta", "levels"), _check_tiered,
    ignores={"w_normalize": "the tiered gate reads only the order of w: it is scale-free already"},
))  # fmt: skip
register_gate(Gate("continuous", _continuous, ("gamma", "w_normalize"), _check_continuous))
register_gate(Gate(
    "schedule", lambda w, s: GateOutput(depth_schedule(s.schedule, len(w), s.schedule_scales)),
    ("schedule", "schedule_scales"), _check_schedule,
    ignores={"w_normalize": "a depth-only schedule ignores w"},
))  # fmt: skip


# -- the paper's depth-only schedules (Appendix D.1) and LiNeS's ramp ------------------------------
register_schedule(Schedule("uniform", lambda n, s: [float(s[0])] * n, 1, (1.0,)))
register_schedule(Schedule(
    "linear", lambda n, s: [0.5 + f for f in depth_fraction(n)], 0, fixed="0.5 → 1.5"
))  # fmt: skip
for _name, _levels in TIER_LEVELS.items():
    register_schedule(Schedule(_name, tiers, len(_levels), _levels))
register_schedule(Schedule("custom", tiers, 3, DEFAULT_LEVELS))
register_schedule(Schedule(
    "lines", lambda n, s: [s[0] + s[1] * f for f in depth_fraction(n)], 2, (0.5, 1.0), signed=True
))  # fmt: skip
