"""How much of the per-block ceiling the data-free rules reach (issue 32): the ceiling's gain
over the base merger (per-block scales fitted on validation labels, :data:`.experiments.FITTED`)
and, for the linear depth ramp, LARV tiered and LiNeS, their gain as a share of it,

    share_X = Δ_X / Δ_C,    Δ_X = acc(X) − acc(base),  Δ_C = acc(ceiling) − acc(base),

each an average over the tasks with equal weights (as FusionBench's average accuracy). Its
interval is the percentile bootstrap of the ratio over the same resampled test examples
(:func:`share_bootstrap`). A share is undefined where the ceiling's gain interval includes 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusion_bench_larv.evaluation import intervals as iv

from . import selection as sel
from .experiments import FITTED, FITTED_PER_TASK, LINES_VAL, TIERED, Cell
from .registry import display_label
from .results import Results, Run
from .tablefmt import Table, delta_text, write_csv

#: the rows whose gain is read as a share of the ceiling's: (variant slug, label)
SHARED = ((sel.LINEAR, "linear ramp"), (TIERED.slug, "LARV tiered"),
          (LINES_VAL.slug, "LiNeS (β on val.)"))  # fmt: skip
CSV = "ceiling_shares.csv"


@dataclass(frozen=True)
class Share:
    """share = Δ_X / Δ_C (fractions) and its percentile interval; ``gain_x``, ``gain_c``: the
    two average gains (fractions)."""

    share: float
    lo: float
    hi: float
    gain_x: float
    gain_c: float


def _pattern_gains() -> tuple[np.ndarray, np.ndarray]:
    """Per pattern p = 4b + 2x + c of an example's (base, X, ceiling) correctness: x − b and
    c − b."""
    p = np.arange(8)
    b, x, c = (p >> 2) & 1, (p >> 1) & 1, p & 1
    return (x - b).astype(np.float64), (c - b).astype(np.float64)


def share_bootstrap(
    base: Mapping[str, Sequence[bool]],
    other: Mapping[str, Sequence[bool]],
    ceiling: Mapping[str, Sequence[bool]],
    resamples: int = iv.DEFAULT_RESAMPLES,
    seed: int = iv.DEFAULT_SEED,
    level: float = iv.DEFAULT_LEVEL,
) -> Share:
    """share = Δ̄_X / Δ̄_C over the tasks of ``base`` (each a per-sample correctness vector, the
    same examples in the same order in all three) and its percentile interval: in each of B
    resamples every task's n examples are drawn with replacement (task t from
    ``default_rng([seed, t])``), one draw for all three models, as the counts of the 8
    correctness patterns ~ Multinomial(n; their frequencies), and the ratio of the two resampled
    average gains is taken; the interval is its k-th smallest and k-th largest draw,
    k = ⌊B(1 − level)/2⌋. A draw with Δ̄_C* = 0 counts as ±∞ (the sign of Δ̄_X*; +∞ when both
    are 0), which can only widen the interval."""
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    tasks = list(base)
    if not tasks:
        raise ValueError("share_bootstrap needs at least one task")
    gx, gc = _pattern_gains()
    dx, dc = np.zeros(resamples), np.zeros(resamples)
    point_x = point_c = 0.0
    for t, task in enumerate(tasks):
        b, x, c = (np.asarray(v[task], dtype=bool) for v in (base, other, ceiling))
        if not (b.ndim == 1 and b.shape == x.shape == c.shape) or b.size == 0:
            raise ValueError(
                f"task {task!r}: the three correctness vectors must be 1-D, non-empty and cover "
                f"the same examples (shapes {b.shape}, {x.shape}, {c.shape})"
            )
        n = b.size
        freq = np.bincount(4 * b + 2 * x + c, minlength=8) / n
        counts = np.random.default_rng([seed, t]).multinomial(n, freq, size=resamples)
        dx += counts @ gx / n
        dc += counts @ gc / n
        point_x += float(freq @ gx)
        point_c += float(freq @ gc)
    k = len(tasks)
    dx, dc, point_x, point_c = dx / k, dc / k, point_x / k, point_c / k
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(dc != 0, dx / np.where(dc != 0, dc, 1.0),
                         np.where(dx < 0, -np.inf, np.inf))  # fmt: skip
    s = np.sort(ratio)
    j = min(int(np.floor(resamples * (1 - level) / 2)), (resamples - 1) // 2)
    share = point_x / point_c if point_c != 0 else float("nan")
    return Share(share, float(s[j]), float(s[resamples - 1 - j]), point_x, point_c)


def _paired(runs: Sequence[Run | None]) -> dict[str, list] | None:
    """task -> the runs' correctness vectors, for the tasks every run has with the same test
    examples (count and labels' digest); None when a run or its per-sample file is missing."""
    if any(r is None or not r.per_sample for r in runs):
        return None
    out = {}
    for task in runs[0].acc:
        vecs = [r.per_sample.get(task) for r in runs]
        digests = {(r.digests or {}).get(task) for r in runs} - {None}
        if any(v is None or v.shape != vecs[0].shape for v in vecs) or len(digests) > 1:
            return None
        out[task] = vecs
    return out or None


def _pct(x: float) -> str:
    return "∞" if np.isinf(x) and x > 0 else "−∞" if np.isinf(x) else f"{100 * x:.0f}"


def ceiling_section(t: Table, cells: Sequence[Cell], res: Results, folder: Path) -> list[Path]:
    """Append to ``t`` the ceiling's section (once any ceiling cell ran), per merger and suite:
    ceiling − base (average Δ, the paired interval of every Δ in the table), the per-task
    ceiling's where it ran, and the share of the ceiling's gain that each row of :data:`SHARED`
    reaches, with its interval (:func:`share_bootstrap`, the table's B and seed);
    ``ceiling_shares.csv`` beside it."""
    have = {c.variant.slug for c in cells}
    suites = sel.suites(cells)
    ran = [res.get(s.key, m, FITTED.slug) for s in suites for m in sel.mergers(cells)]
    if FITTED.slug not in have or not any(r is not None for r in ran):
        return []  # not run yet: its rows in the main table say "—"
    side = Table(t.name, t.title, [s.label for s in suites])
    side.header("Merger")
    rows: list[dict] = []
    for m in sel.mergers(cells):
        gains = {}
        for v, label in ((FITTED.slug, "ceiling − base"),
                         (FITTED_PER_TASK.slug, "per-task ceiling − base")):  # fmt: skip
            cis = [res.interval(s.key, m, v) for s in suites]
            if v == FITTED.slug:
                gains = {s.key: ci for s, ci in zip(suites, cis, strict=True)}
            if v in have and any(ci is not None for ci in cis):
                rows += _delta_row(side, f"{display_label(m)}: {label}", suites, cis, m, v, label)
        if not any(ci is not None for ci in gains.values()):
            continue  # no ceiling for this merger in any suite: no share to read
        for v, label in SHARED:
            if v not in have:
                continue
            rows += _share_row(
                side, res, suites, f"↳ {label}'s share of the ceiling", "ceiling",
                lambda s, m=m, v=v: [res.get(s.key, m, x) for x in ("base", v, FITTED.slug)],
                gains.get, (m, v, f"{label} / ceiling"),
            )  # fmt: skip
        rows += _over_rows(side, res, suites, m, have)
    t.lines += [
        "",
        "**The ceiling of per-block rescaling** (per-block scales fitted on validation labels; "
        "average Δ in pp with its paired 95% interval, * = excludes 0; a share = the row's gain "
        "over the base merger ÷ the ceiling's, in %, with a percentile bootstrap interval of the "
        "ratio over the same resampled test examples; undefined where the ceiling's gain "
        "interval includes 0)",
        "",
        *side.lines,
    ]
    keys = ["suite", "merger", "variant", "quantity", "value", "lo", "hi"]
    return [write_csv(folder / CSV, keys, rows)]


def _delta_row(side: Table, label: str, suites, cis, merger: str, variant: str,
               quantity: str) -> list[dict]:  # fmt: skip
    """One row of average Δ (its paired interval, * where it excludes 0, — where missing) per
    suite; the CSV's rows (fractions)."""
    side.row(label, [
        "—" if ci is None else delta_text(ci.delta, ci) + ("*" if ci.significant else "")
        for ci in cis])  # fmt: skip
    return [{"suite": s.key, "merger": merger, "variant": variant, "quantity": quantity,
             "value": ci.delta / 100, "lo": ci.lo / 100, "hi": ci.hi / 100}
            for s, ci in zip(suites, cis, strict=True) if ci is not None]  # fmt: skip


def _share_row(side: Table, res: Results, suites, label: str, name: str, runs_of, gain_of,
               csv_key: tuple[str, str, str]) -> list[dict]:  # fmt: skip
    """One row of shares per suite: ``runs_of(suite)`` = (base, row, ceiling) runs, whose
    gains' ratio is :func:`share_bootstrap`'s; undefined where ``gain_of(suite.key)`` (the
    ceiling − base interval, named ``name``) includes 0, — where a cell or its pairing is
    missing. ``csv_key``: (merger, variant, quantity) of the CSV's rows."""
    merger, variant, quantity = csv_key
    shown, rows = [], []
    for s in suites:
        paired = _paired(runs_of(s))
        gain = gain_of(s.key)
        if paired is None or gain is None:
            shown.append("—")
            continue
        if not gain.significant:
            shown.append(f"undefined (the {name}'s gain interval includes 0)")
            continue
        sh = share_bootstrap(*({k: p[i] for k, p in paired.items()} for i in range(3)),
                             res.resamples, res.seed)  # fmt: skip
        shown.append(f"{_pct(sh.share)} % [{_pct(sh.lo)}, {_pct(sh.hi)}]")
        rows.append({"suite": s.key, "merger": merger, "variant": variant, "quantity": quantity,
                     "value": sh.share, "lo": sh.lo, "hi": sh.hi})  # fmt: skip
    side.row(label, shown)
    return rows


def _over_rows(side: Table, res: Results, suites, merger: str, have: set) -> list[dict]:
    """For a merger of :data:`.selection.OVER` whose other cell ran: that cell − the merger's
    base (paired interval), and its share of the per-task ceiling's gain and of the ceiling's
    (:func:`share_bootstrap`); the CSV's rows."""
    if merger not in sel.OVER:
        return []
    (other_m, other_v), label = sel.OVER[merger]
    cis = [res.interval(s.key, other_m, other_v, None, (merger, "base")) for s in suites]
    if not any(ci is not None for ci in cis):
        return []
    rows = _delta_row(side, f"{display_label(merger)}: {label} − base", suites, cis, other_m,
                      other_v, f"{label} − {merger} base")  # fmt: skip
    for ceiling, name in ((FITTED_PER_TASK.slug, "per-task ceiling"), (FITTED.slug, "ceiling")):
        if ceiling not in have:
            continue
        rows += _share_row(
            side, res, suites, f"↳ its share of the {name}", name,
            lambda s, c=ceiling: [res.get(s.key, merger, "base"), res.get(s.key, other_m, other_v),
                                  res.get(s.key, merger, c)],
            lambda key, c=ceiling: res.interval(key, merger, c),
            (other_m, other_v, f"{label} / {merger} {name}"),
        )  # fmt: skip
    return rows
