"""The main job on an embedded offline default: merge real small models with and without LARV
through the real `fusion_bench` CLI and print the comparison.

    python -m fusion_bench_larv.demo [--cache-dir DIR] [--methods ta ties iso_c] [--out DIR]

Everything is built locally (cached under ``--cache-dir``) and measured now; nothing is read
from a results file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_CACHE = Path(
    os.environ.get("FUSION_BENCH_LARV_CACHE", Path.home() / ".cache" / "fusion_bench_larv")
)
# base method config -> its LARV twin
METHODS = {
    "ta": ("task_arithmetic", "larv_ta"),
    "ties": ("ties_merging", "larv_ties"),
    "iso_c": ("isotropic_merging/iso_c method.scaling_factor=1.30", "larv_iso_c"),
    "iso_cts": ("isotropic_merging/iso_cts method.scaling_factor=1.5", "larv_iso_cts"),
    "tsvm": ("task_singular_vector/TaskSingularVectorMerging", "larv_tsvm"),
    "simple_average": ("simple_average", "larv_simple_average"),
}


def _runs(methods: list[str]) -> list[tuple[str, str, list[str]]]:
    runs = []
    for m in methods:
        base, larv = METHODS[m]
        base_name, *base_over = base.split()
        runs.append((m, "base", [f"method={base_name}", *base_over]))
        runs.append((m, "LARV tiered", [f"method={larv}"]))
        runs.append((m, "LARV continuous", [f"method={larv}", "method.gate=continuous"]))
    return runs


def format_table(
    tasks: list[str], rows: list[tuple[str, str, dict]], finetuned: dict | None
) -> str:
    head = (
        f"{'method':<16}{'variant':<17}"
        + "".join(f"{t[:10]:>11}" for t in tasks)
        + f"{'avg':>9}{'Δ avg':>8}"
    )
    lines = [head, "-" * len(head)]
    base_avg: dict[str, float] = {}
    for method, variant, acc in rows:
        avg = sum(acc[t] for t in tasks) / len(tasks)
        if variant == "base":
            base_avg[method] = avg
        delta = "" if variant == "base" else f"{100 * (avg - base_avg[method]):+7.2f}"
        lines.append(
            f"{method:<16}{variant:<17}"
            + "".join(f"{100 * acc[t]:>11.2f}" for t in tasks)
            + f"{100 * avg:>9.2f}{delta:>8}"
        )
    if finetuned:
        avg = sum(finetuned[t] for t in tasks) / len(tasks)
        lines.append(
            f"{'fine-tuned':<16}{'(upper bound)':<17}"
            + "".join(f"{100 * finetuned[t]:>11.2f}" for t in tasks)
            + f"{100 * avg:>9.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument(
        "--methods", nargs="+", default=["ta", "ties", "iso_c"], choices=sorted(METHODS)
    )
    parser.add_argument("--out", type=Path, default=Path("outputs") / "larv_demo")
    args = parser.parse_args(argv)

    from .testing.tiny_clip import build_tiny_clip_suite, run_fusion_bench

    t0 = time.time()
    print(
        f"[demo] building (or reusing) the offline tiny CLIP suite under {args.cache_dir / 'tiny_clip'}",
        flush=True,
    )
    suite = build_tiny_clip_suite(args.cache_dir / "tiny_clip")
    tasks = list(suite.tasks)
    print(
        f"[demo] suite ready in {time.time() - t0:.0f}s: {len(tasks)} tasks {tasks}, {suite.num_layers} blocks",
        flush=True,
    )

    rows, layer_reports = [], {}
    runs = _runs(args.methods)
    for i, (method, variant, over) in enumerate(runs, 1):
        log_dir = (args.out / f"{method}_{variant.replace(' ', '_')}").resolve()
        t = time.time()
        print(f"[demo] ({i}/{len(runs)}) fusion_bench {' '.join(over)} ...", end=" ", flush=True)
        report = run_fusion_bench([*suite.cli_args(), *over], cwd=log_dir, log_dir=log_dir)
        acc = {task: float(report[task]["accuracy"]) for task in tasks}
        rows.append((method, variant, acc))
        if variant != "base":
            layer_reports[(method, variant)] = json.loads(
                (log_dir / "larv_layers.json").read_text()
            )
        print(f"{time.time() - t:.0f}s", flush=True)

    finetuned = (
        {t: suite.stats[t]["finetuned_accuracy"] for t in tasks}
        if all("finetuned_accuracy" in suite.stats.get(t, {}) for t in tasks)
        else None
    )
    print()
    print("Accuracy (%) on each task's test split; Δ avg = LARV − base (percentage points)")
    print(format_table(tasks, rows, finetuned))
    print()
    for (method, variant), rep in layer_reports.items():
        print(
            f"scales {method:<10}{variant:<17}"
            + " ".join(f"{rec['s']:.2f}" for rec in rep["layers"])
        )
    print(
        f"\n[demo] done in {time.time() - t0:.0f}s; runs and per-layer reports under {args.out.resolve()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
