"""LARV's settings: the public config keys (docs/method.md, "Config names"), checked and
normalised at construction so that a bad value fails before any model is loaded, with a message
naming the key. The gates' own keys are checked by their registry entries (:mod:`.registry`)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import LarvAttributeError, LarvConfigError, LarvWarning
from . import keys
from .gates import DEFAULT_LEVELS
from .keys import did_you_mean, unknown_keys_message
from .registry import GATES

PLACEMENTS = ("merged", "task_vectors")
DIAGNOSTICS = ("merged", "per_task")
SPECTRA = ("exact", "randomized")
SPECTRUM_TAILS = ("none", "uniform")
OUTSIDE_POLICIES = ("nearest", "neutral")


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
        f"checked (`alg.{key} = {shown}`), or build new settings "
        f"(`dataclasses.replace(settings, {key}={shown})`)"
    )


@dataclass
class LarvSettings:
    """The checked LARV settings, read-only once built: a field is assigned once, by the
    constructor (the checks may normalise it, e.g. a list of levels to a tuple), and any later
    write or delete raises :class:`LarvAttributeError`, so settings that passed the checks stay
    valid. New settings: ``dataclasses.replace(settings, gate="continuous")`` (checked again)."""

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
        self.normalise()

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__ or name not in _FIELDS:
            raise LarvAttributeError(_read_only_message(name, value))
        object.__setattr__(self, name, value)  # the constructor's one assignment of a field

    def __delattr__(self, name: str) -> None:
        raise LarvAttributeError(f"`del settings.{name}` is refused: LARV settings are read-only")

    def _set(self, key: str, value: Any) -> None:
        """The checks' own write: a checked value in its normal form (a float, a tuple)."""
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

    def normalise(self) -> None:
        """Check every key (a :class:`LarvConfigError` naming the first bad one) and put each
        value in its normal form; idempotent. Every registered gate checks its own keys, whichever
        gate is chosen."""
        keys.choice("gate", self.gate, GATES)
        keys.choice("placement", self.placement, PLACEMENTS)
        keys.choice("diagnostics", self.diagnostics, DIAGNOSTICS)
        if self.diagnostics == "per_task" and self.placement != "task_vectors":
            raise keys.bad(
                "diagnostics",
                self.diagnostics,
                "`per_task` scales each task vector before aggregation, so it needs "
                f"`placement: task_vectors` (placement is {self.placement!r}); set both keys "
                "(`method.placement=task_vectors method.diagnostics=per_task`)",
            )
        keys.choice("spectrum", self.spectrum, SPECTRA)
        keys.choice("spectrum_tail", self.spectrum_tail, SPECTRUM_TAILS)
        keys.choice("outside_blocks", self.outside_blocks, OUTSIDE_POLICIES)
        for gate in GATES.values():
            for key, value in gate.check(asdict(self)).items():
                self._set(key, value)
        for key in ("eta", "rho", "zeta"):
            v = keys.number(key, getattr(self, key))
            if v < 0:
                raise keys.bad(key, v, "an exponent >= 0")
            self._set(key, v)
        self._set("eps", keys.number("eps", self.eps))
        if self.eps <= 0:
            raise keys.bad("eps", self.eps, "a small number > 0")
        for key in ("use_depth_prior", "use_info", "use_conflict"):
            if not isinstance(getattr(self, key), bool):
                raise keys.bad(key, getattr(self, key), "true or false")
        for key, low in (("rank", 1), ("oversample", 0)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise keys.bad(key, v, f"an integer >= {low}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise keys.bad("seed", self.seed, "an integer")
        if self.layer_pattern is not None:
            _check_layer_pattern(self.layer_pattern)
        self._warn_unused()
        cache_dir = self.stats_cache_dir
        if cache_dir is not None and (not isinstance(cache_dir, str) or not cache_dir):
            raise keys.bad("stats_cache_dir", cache_dir, "null (no cache) or a directory path")
        name = self.report_name
        if (
            not isinstance(name, str)
            or name in ("", ".", "..")
            or any(sep in name for sep in ("/", "\\", "\0"))
        ):
            raise keys.bad(
                "report_name", name, "a plain file name (no directory; see `report_dir`)"
            )

    def _warn_unused(self) -> None:
        """Keys that are valid but have no effect with the other settings: a warning, since a
        sweep may set them on purpose, but a silent no-op usually means a mistaken config. A key
        of a gate other than the chosen one has no effect when it differs from its default."""
        unused = []
        chosen = GATES[self.gate]
        for gate in GATES.values():
            if gate is chosen:
                continue
            for key in gate.keys:
                value = getattr(self, key)
                if key in chosen.keys or value == _DEFAULTS[key]:
                    continue
                shown = list(value) if isinstance(value, tuple) else value
                why = chosen.ignores.get(key)
                unused.append(
                    f"`{key}` = {shown!r} (used only with `gate: {gate.name}`; gate is "
                    f"{self.gate!r}{': ' + why if why else ''})"
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


def _check_layer_pattern(pattern: Any) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise keys.bad("layer_pattern", pattern, "null (auto-detect) or a non-empty regex string")
    try:
        rx = re.compile(pattern)
    except re.error as err:
        raise keys.bad("layer_pattern", pattern, f"not a valid regex ({err})") from err
    if "idx" not in rx.groupindex and rx.groups < 1:
        raise keys.bad(
            "layer_pattern",
            pattern,
            "the regex must capture the block index, as a named group (?P<idx>\\d+) or as "
            "its first group, e.g. '^model\\.layers\\.(?P<idx>\\d+)\\.'",
        )


_FIELDS = frozenset(f.name for f in fields(LarvSettings))
_DEFAULTS = {f.name: f.default for f in fields(LarvSettings)}
