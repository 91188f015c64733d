"""The ceiling's section of the benchmark table: the share of the ceiling's gain a data-free row
reaches, its bootstrap interval against hand cases and a brute-force resampling oracle, and the
section as the collator writes it (undefined where the ceiling's gain interval includes 0)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from test_collate_intervals import _write

from larv_lab.reproduce import collate
from larv_lab.reproduce import experiments as X
from larv_lab.reproduce.ceiling import share_bootstrap


def _vec(s: str) -> np.ndarray:
    return np.array([c == "1" for c in s])


def test_share_by_hand():
    # task a: the ramp fixes 1 of 4, the ceiling 2 → gains 1/4, 2/4; task b: 0 and 2/4 of 4
    base = {"a": _vec("0001"), "b": _vec("0011")}
    ramp = {"a": _vec("1001"), "b": _vec("0011")}
    ceil = {"a": _vec("1101"), "b": _vec("1111")}
    sh = share_bootstrap(base, ramp, ceil, resamples=200)
    assert sh.gain_x == pytest.approx((1 / 4 + 0) / 2) and sh.gain_c == pytest.approx(2 / 4)
    assert sh.share == pytest.approx(0.25)
    assert sh.lo <= sh.share <= sh.hi


def test_a_row_equal_to_the_ceiling_has_share_one_and_the_base_share_zero():
    rng = np.random.default_rng(1)
    base = {t: rng.random(300) < 0.6 for t in "ab"}
    ceil = {t: b | (rng.random(b.size) < 0.4) for t, b in base.items()}
    same = share_bootstrap(base, ceil, ceil, resamples=500)
    assert (same.share, same.lo, same.hi) == (1.0, 1.0, 1.0)
    none = share_bootstrap(base, base, ceil, resamples=500)
    assert (none.share, none.lo, none.hi) == (0.0, 0.0, 0.0)


def test_interval_agrees_with_resampling_the_examples_one_by_one():
    # an independent oracle: draw every task's example indices with replacement, recompute the
    # three accuracies, take the ratio of the average gains; percentiles of B draws
    rng = np.random.default_rng(2)
    n = {"a": 400, "b": 250}
    base = {t: rng.random(k) < 0.6 for t, k in n.items()}
    ceil = {t: b | (rng.random(b.size) < 0.2) for t, b in base.items()}
    ramp = {t: np.where(rng.random(b.size) < 0.5, ceil[t], b) for t, b in base.items()}
    B = 4000
    ours = share_bootstrap(base, ramp, ceil, resamples=B, seed=0)
    draws = []
    g = np.random.default_rng(123)
    for _ in range(B):
        dx = dc = 0.0
        for t, k in n.items():
            i = g.integers(0, k, k)
            dx += ramp[t][i].mean() - base[t][i].mean()
            dc += ceil[t][i].mean() - base[t][i].mean()
        draws.append(dx / dc)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    assert ours.lo == pytest.approx(lo, abs=0.03) and ours.hi == pytest.approx(hi, abs=0.03)
    assert ours.share == pytest.approx(
        sum(ramp[t].mean() - base[t].mean() for t in n)
        / sum(ceil[t].mean() - base[t].mean() for t in n)
    )


def test_the_bench_table_shows_each_share_or_says_it_is_undefined(tmp_path):
    # TA: the ceiling gains clearly and the ramp reaches part of it; TIES: the ceiling is the
    # base merger (its gain interval includes 0), so no share is defined
    n = {"t1": 400, "t2": 250}
    rng = np.random.default_rng(0)
    base = {t: rng.random(k) < 0.6 for t, k in n.items()}
    ceil = {t: b | (rng.random(b.size) < 0.3) for t, b in base.items()}
    ramp = {t: np.where(rng.random(b.size) < 0.5, ceil[t], b) for t, b in base.items()}
    # Iso-C: no ceiling cell yet, so no share rows for it
    cells = X.filter_cells(X.EXPERIMENTS["bench"].cells(), mergers=["ta", "ties", "iso_c"],
                           variants=["base", "linear", "fitted-scales-val"])  # fmt: skip
    for c in cells:
        if c.merger == "iso_c" and c.variant.slug == "fitted-scales-val":
            continue
        acc = {"base": base, "sched-linear": ramp, "fitted-scales-val": ceil}[c.variant.slug]
        _write(c, tmp_path, base if c.merger == "ties" else acc)
    collate.collate(tmp_path, {"bench": cells})
    art = tmp_path / "artefacts"
    table = (art / "bench.md").read_text()
    assert "**The ceiling of per-block rescaling**" in table
    sh = share_bootstrap(base, ramp, ceil)
    lines = table.splitlines()
    i = lines.index(next(x for x in lines if x.startswith("| Task Arithmetic: ceiling − base |")))
    assert lines[i + 1] == (f"| ↳ linear ramp's share of the ceiling | {100 * sh.share:.0f} % "
                            f"[{100 * sh.lo:.0f}, {100 * sh.hi:.0f}] |")  # fmt: skip
    assert any(
        x.startswith("| ↳ linear ramp's share of the ceiling | undefined") for x in lines[i + 2 :]
    )
    assert sum(x.startswith("| ↳ linear ramp's share of the ceiling |") for x in lines) == 2
    with open(art / "ceiling_shares.csv") as f:
        rows = list(csv.DictReader(f))
    rec = next(r for r in rows if r["merger"] == "ta" and r["quantity"] == "linear ramp / ceiling")
    assert float(rec["value"]) == pytest.approx(sh.share, abs=1e-4)


def test_adamerging_is_read_against_task_arithmetics_ceilings(tmp_path):
    # AdaMerging (a reference row over TA's task vectors) − TA's base, and its share of the
    # per-task ceiling's gain and of the ceiling's, as share_bootstrap computes them
    n = {"t1": 400, "t2": 250}
    rng = np.random.default_rng(2)
    base = {t: rng.random(k) < 0.6 for t, k in n.items()}
    per_task = {t: b | (rng.random(b.size) < 0.4) for t, b in base.items()}
    ceil = {t: np.where(rng.random(b.size) < 0.5, per_task[t], b) for t, b in base.items()}
    ada = {t: np.where(rng.random(b.size) < 0.8, per_task[t], b) for t, b in base.items()}
    cells = X.filter_cells(X.EXPERIMENTS["bench"].cells(), mergers=["ta", "testbed_adamerging"],
                           variants=["base", "fitted-scales-val", "fitted-scales-val-per-task"])  # fmt: skip
    for c in cells:
        acc = {"base": base, "fitted-scales-val": ceil, "fitted-scales-val-per-task": per_task}
        _write(c, tmp_path, ada if c.merger == "testbed_adamerging" else acc[c.variant.slug])
    assert {c.merger for c in cells} == {"ta", "testbed_adamerging"}
    collate.collate(tmp_path, {"bench": cells})
    lines = (tmp_path / "artefacts" / "bench.md").read_text().splitlines()
    head = "| Task Arithmetic: layer-wise AdaMerging (unlabelled test inputs) − base | "
    i = lines.index(next(x for x in lines if x.startswith(head)))
    gain = np.mean([ada[t].mean() - base[t].mean() for t in n])
    assert lines[i].startswith(f"{head}{100 * gain:+.1f} [")
    for j, (ceiling, name) in enumerate(((per_task, "per-task ceiling"), (ceil, "ceiling"))):
        sh = share_bootstrap(base, ada, ceiling)
        assert lines[i + 1 + j] == (f"| ↳ its share of the {name} | {100 * sh.share:.0f} % "
                                    f"[{100 * sh.lo:.0f}, {100 * sh.hi:.0f}] |")  # fmt: skip
    # the forest plot draws it too: a row after Task Arithmetic's, against TA's base cell
    from larv_lab.reproduce.plots import forest_rows
    from larv_lab.reproduce.results import Results

    rows, labels = forest_rows(cells, Results(cells, tmp_path))
    assert rows[-1] == ("ta", ("testbed_adamerging", "base"))
    assert labels[rows[-1][1]] == "layer-wise AdaMerging (unlabelled test inputs)"
    assert ("testbed_adamerging", "base") not in rows
