"""Checks of single config values, each raising :class:`~fusion_bench_larv.errors.LarvConfigError`
that names the key, the value and what is allowed; "did you mean" suggestions for misspelt keys."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any

from ..errors import LarvConfigError


def did_you_mean(word: str, candidates: Iterable[str], n: int = 1, prefix: str = "") -> str:
    """`` (did you mean `x`?)`` for the closest candidate(s) (at most ``n``, each shown with
    ``prefix``), or ``""`` when none is close."""
    close = difflib.get_close_matches(str(word), sorted(set(candidates)), n=n, cutoff=0.6)
    if not close:
        return ""
    shown = [f"`{prefix}{c}`" for c in close]
    listed = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]
    return f" (did you mean {listed}?)"


def unknown_keys_message(unknown: Iterable[str], allowed: Iterable[str], what: str) -> str:
    """One line per unknown key with a suggestion, then the allowed keys."""
    allowed = sorted(set(allowed))
    lines = [f"`{k}`{did_you_mean(k, allowed)}" for k in sorted(unknown, key=str)]
    return f"unknown {what} key(s): {', '.join(lines)}; allowed: {allowed}"


def bad(key: str, value: Any, allowed: str) -> LarvConfigError:
    """``LARV config `key` = value is not allowed: allowed``."""
    return LarvConfigError(f"LARV config `{key}` = {value!r} is not allowed: {allowed}")


def choice(key: str, value: Any, allowed: Iterable[str]) -> str:
    """``value`` if it is one of ``allowed``; else an error with a suggestion."""
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        hint = did_you_mean(value, allowed) if isinstance(value, str) else ""
        raise bad(key, value, f"one of {', '.join(allowed)}{hint}")
    return value


def number(key: str, value: Any) -> float:
    """A finite number (not a bool), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(key, value, "expected a finite number")
    return float(value)


def sequence(key: str, value: Any, n: int) -> tuple:
    """A list of exactly ``n`` items, as a tuple."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise bad(key, value, f"a list of {n} numbers")
    value = tuple(value)
    if len(value) != n:
        raise bad(key, list(value), f"a list of exactly {n} numbers, got {len(value)}")
    return value


def numbers(key: str, value: Any, n: int) -> tuple[float, ...]:
    """A list of exactly ``n`` finite numbers, as a tuple of floats."""
    return tuple(number(key, v) for v in sequence(key, value, n))


def scales(key: str, value: Any, n: int) -> tuple[float, ...]:
    """A list of exactly ``n`` finite numbers ≥ 0 (scales), as a tuple of floats."""
    out = numbers(key, value, n)
    if any(v < 0 for v in out):
        raise bad(key, list(out), "scales must be >= 0")
    return out
