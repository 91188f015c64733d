"""The benchmark's artefacts: its table (rows, sections, regime cards, run times), figures, CSVs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from fusion_bench_larv.core.io import write_text_atomic

from . import plots
from . import selection as sel
from .bench_sections import questions, suites_side_by_side, versus_layerwise
from .ceiling import ceiling_section
from .columns import FINETUNED
from .experiments import BENCH_VARIANTS, CONTINUOUS_MEDIAN, EXPERIMENTS, Cell
from .layouts import per_task_table
from .regime import card_mergers, regime_card
from .results import Results
from .tablefmt import Table, layer_csv
from .timings import run_times


def bench_artefacts(cells: Sequence[Cell], res: Results, folder: Path) -> list[Path]:
    """The benchmark's table (``bench.md`` / ``bench.csv``: per task, every merger × variant, the
    sections of :mod:`.bench_sections`, regime cards, run times, AdaMerging's notes) and the files
    beside it: the regime cards, AdaMerging's loss curves, the forest plot, Figure 2, the
    per-layer CSV."""
    written: list[Path] = []
    order = [v.slug for v in BENCH_VARIANTS]
    order.insert(order.index(CONTINUOUS_MEDIAN.slug) + 1, sel.MAX)
    title = EXPERIMENTS["bench"].title
    t = per_task_table("bench", title, cells, res, None, order, relative=True, linear=True)
    if len(sel.suites(cells)) > 1:
        suites_side_by_side(t, cells, res, order)
    versus_layerwise(t, cells, res)  # one suite too (a folder of one build)
    questions(t, cells, res)
    written += ceiling_section(t, cells, res, folder)
    written += regime_cards(t, cells, res, folder)
    run_times(t, cells, res.out)
    p, curves = plots.adamerging_curves(cells, res.out, folder / "adamerging_curve.png")
    written += [p] if p else []
    for label, rec in curves:
        t.notes.append(adamerging_note(label, rec))
    written += t.write(folder)
    p = plots.forest(cells, res, folder / "forest_bench.png", order)
    written += [p] if p else []
    written += plots.fig2(cells, res, folder)
    written.append(layer_csv(cells, res, folder / "bench_layers.csv"))
    return written


def adamerging_note(label: str, rec: dict) -> str:
    """The table's note on one AdaMerging run (its ``adamerging_curve.json`` record): steps,
    why it stopped, seconds."""
    steps, seconds = rec["steps"], rec["seconds"]
    if rec.get("stopped") is None:  # a run from before the stopping rule
        why = "its default is 1000; fewer to fit the 2-core CPU"
    elif rec["stopped"] == "levelled off":
        why = (f"of at most {rec['max_steps']}; stopped when the loss levelled off: "
               f"{rec['stop_rule']['rule']}")  # fmt: skip
    else:
        why = f"all {rec['max_steps']}: the loss had not levelled off"
    return (f"Layer-wise AdaMerging ({label}): {steps} steps of FusionBench's loop ({why}), "
            f"{seconds:.0f} s of test-time adaptation; loss curve in `adamerging_curve.png`.")  # fmt: skip


def regime_cards(t: Table, cells: Sequence[Cell], res: Results, folder: Path) -> list[Path]:
    """Per suite with both reference rows and at least one base merger: the regime card
    (:func:`.regime.regime_card`, base mergers only) as ``regime_<suite>.json`` and a line in
    the table's notes."""
    written = []
    for suite in sel.suites(cells):
        pre, ft = res.get(suite.key, "pretrained", "base"), res.get(suite.key, FINETUNED, "base")
        bases = {
            m: r.acc for m in card_mergers() if (r := res.get(suite.key, m, "base")) is not None
        }
        if pre is None or ft is None or not bases:
            continue
        card = {"suite": suite.key, "pools": suite.label, **regime_card(pre.acc, ft.acc, bases)}
        path = folder / f"regime_{suite.key}.json"
        write_text_atomic(path, json.dumps(card, indent=2) + "\n")
        written.append(path)

        def mark(ok):
            return "n/a" if ok is None else ("met" if ok else "MISSED")

        g, m = card["targets"], card["meets"]
        ta = card["ta_normalized_accuracy"]
        spread = card["base_spread_pp"]
        t.notes.append(
            f"Regime card ({suite.label}; base mergers only, `{path.name}`): {card['num_tasks']} "
            f"tasks; fine-tuned {card['finetuned_average']:.1f} vs pretrained+head "
            f"{card['pretrained_head_average']:.1f} ({card['finetune_gain_pp']:+.1f} pp, target "
            f">= {g['min_finetune_gain_pp']:g}: {mark(m['finetune_gain'])}); Task Arithmetic keeps "
            + ("—" if ta is None else f"{100 * ta:.1f} %")
            + f" of fine-tuned (target <= {100 * g['max_ta_normalized']:g} %: "
            f"{mark(m['ta_normalized'])}); data-free base mergers span "
            + ("—" if spread is None else f"{spread:.1f} pp")
            + f" (target >= {g['min_base_spread_pp']:g}: {mark(m['base_spread'])})"
            + (
                f"; missing: {', '.join(card['missing_mergers'])}"
                if card["missing_mergers"]
                else ""
            )
            + "".join(f"; {m} from {lab}" for m, lab in card.get("stand_ins", {}).items())
            + "."
        )
    return written
