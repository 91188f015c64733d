"""LARV's settings: the public config keys (docs/method.md, "Config names"), validated at construction so
that a bad value fails before any model is loaded, with a message naming the key."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

from .gates import DEFAULT_LEVELS, SCHEDULES, TIER_LEVELS, W_NORMALIZATIONS
from .validation import LarvWarning, did_you_mean, unknown_keys_message

GATES = ("tiered", "continuous", "schedule")
PLACEMENTS = ("merged", "task_vectors")
DIAGNOSTICS = ("merged", "per_task")
SPECTRA = ("exact", "randomized")
SPECTRUM_TAILS = ("none", "uniform")
OUTSIDE_POLICIES = ("nearest", "neutral")


class LarvConfigError(ValueError):
    """A LARV config key has a value that is not allowed."""


class LarvAttributeError(LarvConfigError, AttributeError):
    """A write to a LARV attribute that is not allowed: an unknown (usually misspelt) attribute of
    ``LARVAlgorithm``, or any field of the read-only :class:`LarvSettings`. Both a
    :class:`LarvConfigError` and the ``AttributeError`` Python raises for such writes."""


def _read_only_message(name: str, value: Any) -> str:
    """Why ``settings.<name> = value`` is refused, and how to change a setting instead."""
    if name in _FIELDS:
        problem, key, shown = "LARV settings are read-only once built", name, repr(value)
    else:
        hint = did_you_mean(name, LarvSettings.keys())
        problem = f"LarvSettings has no key `{name}`{hint}, and its keys are read-only"
        key, shown = "gate", "'tiered'"
    return (
        f"`settings.{name} = {value!r}` is refused: {problem}. Change a setting on the algorithm, "
        f"validated (`alg.{key} = {shown}`), or build new settings "
        f"(`dataclasses.replace(settings, {key}={shown})`)"
    )


def _bad(key: str, value: Any, allowed: str) -> LarvConfigError:
    return LarvConfigError(f"LARV config `{key}` = {value!r} is not allowed: {allowed}")


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        hint = did_you_mean(value, allowed) if isinstance(value, str) else ""
        raise _bad(key, value, f"one of {', '.join(allowed)}{hint}")


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(key, value, "expected a finite number")
    return float(value)


@dataclass
class LarvSettings:
    """The validated LARV settings, read-only once built: a field is assigned once, by the
    constructor (validation may normalise it, e.g. a list of levels to a tuple), and any later
    write or delete raises :class:`LarvAttributeError`, so settings that passed validation stay
    valid. New settings: ``dataclasses.replace(settings, gate="continuous")`` (validated again)."""

    gate: str = "tiered"
    alpha: float = 1 / 3
    beta: float = 2 / 3
    levels: tuple[float, ...] = DEFAULT_LEVELS
    gamma: float = 3.0
    w_normalize: str = "none"  # continuous gate only: `median` reads w / median(w) (not the paper)
    eta: float = 1.0
    rho: float = 0.5
    zeta: float = 1.0
    use_depth_prior: bool = True
    use_info: bool = True
    use_conflict: bool = True
    schedule: str = "uniform"
    schedule_scales: tuple[float, ...] | None = None
    placement: str = "merged"
    diagnostics: str = "merged"  # per_task: each task vector's own scales (needs task_vectors)
    spectrum: str = "exact"
    rank: int = 2
    oversample: int = 10
    seed: int = 0
    spectrum_tail: str = "none"  # randomized only: energy outside the top-k (see diagnostics)
    outside_blocks: str = "nearest"
    layer_pattern: str | None = None
    eps: float = 1e-8
    report_name: str = "larv_layers.json"
    stats_cache_dir: str | None = None  # opt-in disk cache of θ_0's statistics

    def __post_init__(self) -> None:
        self.validate()

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__ or name not in _FIELDS:
            raise LarvAttributeError(_read_only_message(name, value))
        object.__setattr__(self, name, value)  # the constructor's one assignment of a field

    def __delattr__(self, name: str) -> None:
        raise LarvAttributeError(f"`del settings.{name}` is refused: LARV settings are read-only")

    def _normalise(self, key: str, value: Any) -> None:
        """Validation's own write: a checked value in its normal form (a float, a tuple)."""
        object.__setattr__(self, key, value)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The public config keys (every field)."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, values: dict, also_allowed: Iterable[str] = ()) -> LarvSettings:
        """Settings from config keys; an unknown key (a typo such as ``gama``) is an error with a
        "did you mean" suggestion. ``also_allowed`` only widens the suggestions (keys the caller
        handles itself, e.g. ``base_method``)."""
        known = set(cls.keys())
        unknown = set(values) - known
        if unknown:
            raise LarvConfigError(
                unknown_keys_message(unknown, known | set(also_allowed), "LARV config")
            )
        return cls(**values)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["levels"] = list(d["levels"])
        if d["schedule_scales"] is not None:
            d["schedule_scales"] = list(d["schedule_scales"])
        return d

    def validate(self) -> None:
        _choice("gate", self.gate, GATES)
        _choice("placement", self.placement, PLACEMENTS)
        _choice("diagnostics", self.diagnostics, DIAGNOSTICS)
        if self.diagnostics == "per_task" and self.placement != "task_vectors":
            raise _bad(
                "diagnostics",
                self.diagnostics,
                "`per_task` scales each task vector before aggregation, so it needs "
                f"`placement: task_vectors` (placement is {self.placement!r}); set both keys "
                "(`method.placement=task_vectors method.diagnostics=per_task`)",
            )
        _choice("spectrum", self.spectrum, SPECTRA)
        _choice("spectrum_tail", self.spectrum_tail, SPECTRUM_TAILS)
        _choice("outside_blocks", self.outside_blocks, OUTSIDE_POLICIES)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("w_normalize", self.w_normalize, W_NORMALIZATIONS)
        self._normalise("alpha", _number("alpha", self.alpha))
        self._normalise("beta", _number("beta", self.beta))
        if not 0 < self.alpha < 1:
            raise _bad("alpha", self.alpha, "a quantile in (0, 1)")
        if not 0 < self.beta < 1:
            raise _bad("beta", self.beta, "a quantile in (0, 1)")
        if not self.alpha < self.beta:
            raise _bad("alpha", self.alpha, f"must be smaller than beta = {self.beta}")
        for key in ("eta", "rho", "zeta"):
            v = _number(key, getattr(self, key))
            if v < 0:
                raise _bad(key, v, "an exponent >= 0")
            self._normalise(key, v)
        self._normalise("gamma", _number("gamma", self.gamma))
        if self.gamma <= 0:
            raise _bad("gamma", self.gamma, "a sharpness > 0")
        self._normalise("eps", _number("eps", self.eps))
        if self.eps <= 0:
            raise _bad("eps", self.eps, "a small number > 0")
        self._normalise("levels", self._scales("levels", self.levels, 3))
        for key in ("use_depth_prior", "use_info", "use_conflict"):
            if not isinstance(getattr(self, key), bool):
                raise _bad(key, getattr(self, key), "true or false")
        for key, low in (("rank", 1), ("oversample", 0)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise _bad(key, v, f"an integer >= {low}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise _bad("seed", self.seed, "an integer")
        if self.schedule_scales is not None:
            expected = {"uniform": 1, "custom": 3, "lines": 2, "linear": 0}.get(self.schedule)
            if expected is None:
                expected = len(TIER_LEVELS[self.schedule])
            if expected == 0:
                raise _bad(
                    "schedule_scales", self.schedule_scales, "`linear` takes none (0.5 → 1.5)"
                )
            if self.schedule == "lines":  # (α, β) may be any finite numbers
                lines = self._seq("schedule_scales", self.schedule_scales, 2)
                self._normalise(
                    "schedule_scales", tuple(_number("schedule_scales", v) for v in lines)
                )
            else:
                scales = self._scales("schedule_scales", self.schedule_scales, expected)
                self._normalise("schedule_scales", scales)
        if self.layer_pattern is not None:
            self._check_layer_pattern(self.layer_pattern)
        self._warn_unused()
        cache_dir = self.stats_cache_dir
        if cache_dir is not None and (not isinstance(cache_dir, str) or not cache_dir):
            raise _bad("stats_cache_dir", cache_dir, "null (no cache) or a directory path")
        name = self.report_name
        if (
            not isinstance(name, str)
            or name in ("", ".", "..")
            or any(sep in name for sep in ("/", "\\", "\0"))
        ):
            raise _bad("report_name", name, "a plain file name (no directory; see `report_dir`)")

    def _warn_unused(self) -> None:
        """Keys that are valid but have no effect with the other settings: a warning, since a
        sweep may set them on purpose, but a silent no-op usually means a mistaken config."""
        unused = []
        if self.gate != "schedule":
            if self.schedule != "uniform":
                unused.append(f"`schedule` = {self.schedule!r}")
            if self.schedule_scales is not None:
                unused.append(f"`schedule_scales` = {list(self.schedule_scales)}")
            if unused:
                unused[-1] += f" (used only with `gate: schedule`; gate is {self.gate!r})"
        if self.gate != "continuous" and self.w_normalize != "none":
            why = (
                "the tiered gate reads only the order of w: it is scale-free already"
                if self.gate == "tiered"
                else "a depth-only schedule ignores w"
            )
            unused.append(
                f"`w_normalize` = {self.w_normalize!r} (used only with `gate: continuous`; "
                f"gate is {self.gate!r}: {why})"
            )
        if self.spectrum != "randomized" and self.spectrum_tail != "none":
            unused.append(
                f"`spectrum_tail` = {self.spectrum_tail!r} (an exact spectrum has no tail; "
                "used only with `spectrum: randomized`)"
            )
        if unused:
            warnings.warn(
                "LARV config key(s) without effect: " + "; ".join(unused), LarvWarning, stacklevel=5
            )

    @staticmethod
    def _check_layer_pattern(pattern: Any) -> None:
        if not isinstance(pattern, str) or not pattern:
            raise _bad("layer_pattern", pattern, "null (auto-detect) or a non-empty regex string")
        try:
            rx = re.compile(pattern)
        except re.error as err:
            raise _bad("layer_pattern", pattern, f"not a valid regex ({err})") from err
        if "idx" not in rx.groupindex and rx.groups < 1:
            raise _bad(
                "layer_pattern",
                pattern,
                "the regex must capture the block index, as a named group (?P<idx>\\d+) or as "
                "its first group, e.g. '^model\\.layers\\.(?P<idx>\\d+)\\.'",
            )

    @staticmethod
    def _seq(key: str, value: Any, n: int) -> tuple:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise _bad(key, value, f"a list of {n} numbers")
        value = tuple(value)
        if len(value) != n:
            raise _bad(key, list(value), f"a list of exactly {n} numbers, got {len(value)}")
        return value

    @classmethod
    def _scales(cls, key: str, value: Any, n: int) -> tuple[float, ...]:
        out = tuple(_number(key, v) for v in cls._seq(key, value, n))
        if any(v < 0 for v in out):
            raise _bad(key, list(out), "scales must be >= 0")
        return out


_FIELDS = frozenset(f.name for f in fields(LarvSettings))
