"""Benchmark every base merger alone and with LARV on one FusionBench model pool / task pool pair,
in one process, through FusionBench's own classes (model pool, method, task pool), and write:

- ``results.json``: every number, with the command that produced it;
- ``table.md``: the paper's Table 1 layout (per task, average, Δ against the base merger) plus each
  merger's distance to the fine-tuned upper bound;
- ``fig2_layer_metrics.png``: e, c and s against depth, one line per merger (paper Figure 2).

    python -m fusion_bench_larv.benchmark --config-dir DIR --modelpool NAME --taskpool NAME \
        [--mergers ta ties ...] [--variants base tiered continuous linear tier3 lines] --out DIR

The model pool and task pool are composed from the same YAML files the ``fusion_bench`` CLI uses
(``--config-dir``), so a run here is the same pipeline as ``fusion_bench method=... modelpool=...
taskpool=...``, minus a process start per run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# merger -> (FusionBench's own method config, its LARV config, base hyperparameters of the paper)
MERGERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "ta": ("task_arithmetic", "larv_ta", {"scaling_factor": 0.3}),
    "ties": ("ties_merging", "larv_ties", {"scaling_factor": 0.3, "threshold": 20}),
    "iso_c": ("isotropic_merging/iso_c", "larv_iso_c", {"scaling_factor": 1.30}),
    "iso_cts": ("isotropic_merging/iso_cts", "larv_iso_cts", {"scaling_factor": 1.5}),
    "tsvm": ("task_singular_vector/TaskSingularVectorMerging", "larv_tsvm", {"alpha": 1}),
    "wudi": ("wudi/wudi", "larv_wudi", {}),
    "simple_average": ("simple_average", "larv_simple_average", {}),
    # not data-free: 32 train exemplars per task (the notes: 16-64), README "LOT Merging and WUDI"
    "lot": ("lot_merging", "larv_lot", {"num_exemplars": 32}),
}
MERGER_LABELS = {
    "ta": "Task Arithmetic", "ties": "TIES", "iso_c": "Iso-C", "iso_cts": "Iso-CTS",
    "tsvm": "TSV-M", "wudi": "WUDI", "simple_average": "Simple Avg", "lot": "LOT",
}  # fmt: skip
# variant -> LARV overrides (None: FusionBench's base method alone)
VARIANTS: dict[str, list[str] | None] = {
    "base": None,
    "tiered": ["method.gate=tiered"],
    "continuous": ["method.gate=continuous"],
    "linear": ["method.gate=schedule", "method.schedule=linear"],
    "tier3": ["method.gate=schedule", "method.schedule=tier3"],
    "lines": ["method.gate=schedule", "method.schedule=lines"],
}
VARIANT_LABELS = {
    "base": "base", "tiered": "+LARV tiered", "continuous": "+LARV continuous",
    "linear": "+linear (depth only)", "tier3": "+tier3 (depth only)", "lines": "+LiNeS (depth only)",
}  # fmt: skip


@dataclass
class RunResult:
    merger: str
    variant: str
    method: str
    overrides: list[str]
    accuracy: dict[str, float]
    seconds: float
    larv_layers: dict | None = None
    base_merge_reused: bool = False  # rescaled a base merge computed once (``reuse_base_merge``)

    @property
    def average(self) -> float:
        return sum(self.accuracy.values()) / len(self.accuracy)


@dataclass
class BenchmarkResult:
    tasks: list[str]
    command: str
    pretrained: dict[str, float] = field(default_factory=dict)
    finetuned: dict[str, float] = field(default_factory=dict)
    runs: list[RunResult] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def get(self, merger: str, variant: str) -> RunResult | None:
        return next((r for r in self.runs if r.merger == merger and r.variant == variant), None)

    def to_dict(self) -> dict:
        return {
            "command": self.command,
            "tasks": self.tasks,
            "meta": self.meta,
            "pretrained": self.pretrained,
            "finetuned": self.finetuned,
            "runs": [{**vars(r), "average": r.average} for r in self.runs],
        }


def run_overrides(
    merger: str, variant: str, extra: dict[str, list[str]] | None = None
) -> tuple[str, list[str]]:
    """Method config name and Hydra overrides of one (merger, variant) cell."""
    base_cfg, larv_cfg, hparams = MERGERS[merger]
    extra = (extra or {}).get(merger, [])
    if VARIANTS[variant] is None:
        return base_cfg, [f"method.{k}={v}" for k, v in hparams.items()] + [
            f"method.{e}" for e in extra
        ]
    return larv_cfg, [f"method.base_method.{k}={v}" for k, v in hparams.items()] + [
        f"method.base_method.{e}" for e in extra
    ] + list(VARIANTS[variant])


def _accuracies(report: dict, tasks: Sequence[str]) -> dict[str, float]:
    return {t: float(report[t]["accuracy"]) for t in tasks}


def fusion_bench_config_dir() -> Path:
    """The installed ``fusion_bench_config`` folder (FusionBench's own config tree)."""
    import fusion_bench

    return Path(fusion_bench.__file__).resolve().parent.parent / "fusion_bench_config"


class InProcessFusionBench:
    """Compose FusionBench configs (with this plugin's search path) and run methods in process."""

    def __init__(
        self,
        config_dir: str | os.PathLike,
        modelpool: str,
        taskpool: str,
        device: str | None = None,
        pool_overrides: Sequence[str] = (),
    ):
        import lightning as L
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra
        from hydra.utils import instantiate

        self._compose, self._instantiate = compose, instantiate
        GlobalHydra.instance().clear()
        self._ctx = initialize_config_dir(
            config_dir=str(Path(config_dir).resolve()), version_base=None
        )
        self._ctx.__enter__()
        self._pool_overrides = [f"modelpool={modelpool}", f"taskpool={taskpool}", *pool_overrides]
        cfg = compose(config_name="fabric_model_fusion", overrides=self._pool_overrides)
        accelerator = device or ("cuda" if _cuda() else "cpu")
        self.fabric = L.Fabric(accelerator=accelerator, devices=1)
        self.fabric.launch()
        self.modelpool = instantiate(cfg.modelpool, _recursive_=False)
        self.taskpool = instantiate(cfg.taskpool, _recursive_=False)
        self._setup(self.taskpool)
        self.tasks = list(self.modelpool.model_names)

    def _setup(self, obj: Any) -> None:
        if hasattr(obj, "_fabric_instance"):
            obj._fabric_instance = self.fabric

    def close(self) -> None:
        from hydra.core.global_hydra import GlobalHydra

        self._ctx.__exit__(None, None, None)
        GlobalHydra.instance().clear()

    def evaluate(self, model) -> dict:
        return self.taskpool.evaluate(model)

    def merge(
        self,
        method: str,
        overrides: Sequence[str],
        report_dir: Path | None = None,
        base_merge: Any = None,
    ) -> tuple[Any, dict | None]:
        """Run one method config; returns the merged model and LARV's per-layer report (if any).
        ``base_merge``: a LARV method rescales a copy of this base merge instead of running its
        base merger again (see ``LARVAlgorithm.run``)."""
        from .algorithm import LARVAlgorithm

        cfg = self._compose(
            config_name="fabric_model_fusion",
            overrides=[*self._pool_overrides, f"method={method}", *overrides],
        )
        alg = self._instantiate(cfg.method, _recursive_=False)
        self._setup(alg)
        if isinstance(alg, LARVAlgorithm) and report_dir is not None:
            alg.report_dir = str(report_dir)
        alg.on_run_start()
        if base_merge is not None:
            if not isinstance(alg, LARVAlgorithm):
                raise ValueError(f"method {method!r} is not a LARV method: nothing to reuse")
            merged = alg.run(self.modelpool, base_merge=base_merge)
        else:
            merged = alg.run(self.modelpool)
        alg.on_run_end()
        if isinstance(merged, dict):
            merged = merged["merged"]
        return merged, getattr(alg, "last_report", None)

    def run(
        self, method: str, overrides: Sequence[str], report_dir: Path | None = None
    ) -> tuple[dict, dict | None]:
        """Merge and evaluate: the task pool's report and LARV's per-layer report (if any)."""
        merged, layers = self.merge(method, overrides, report_dir)
        return self.evaluate(merged), layers


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _print_flush(msg: str) -> None:
    print(msg, flush=True)


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_benchmark(
    runner: InProcessFusionBench,
    mergers: Sequence[str],
    variants: Sequence[str],
    out_dir: Path,
    command: str,
    extra: dict[str, list[str]] | None = None,
    reference: bool = True,
    progress: Callable[[str], None] = _print_flush,
    resume: bool = False,
    reuse_base_merge: Sequence[str] = (),
) -> BenchmarkResult:
    """Run every (merger, variant) cell. Each finished cell is saved at once (``runs/<cell>/
    run.json``, and ``results.json``/``table.md`` are rewritten), so an interrupted benchmark
    loses at most the cell in progress; with ``resume`` a cell whose ``run.json`` was made with
    the same method and overrides is read back instead of run again.

    ``reuse_base_merge``: mergers whose base merge is computed once and rescaled by every LARV
    variant (all variants here use ``placement: merged``, where the base merge does not depend on
    the gate), instead of running the base merger once per variant. For slow, deterministic base
    mergers (WUDI: 400 Adam steps per linear layer); the cell's ``run.json`` says so and its
    ``seconds`` then count LARV and the evaluation only."""
    from .algorithm import write_json_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = runner.tasks
    result = BenchmarkResult(
        tasks=tasks, command=command, meta={"mergers": list(mergers), "variants": list(variants)}
    )
    if reference:
        saved = _load_json(out_dir / "references.json") if resume else None
        if saved and saved.get("tasks") == list(tasks):
            result.pretrained, result.finetuned = saved["pretrained"], saved["finetuned"]
            progress("[bench] pretrained and fine-tuned references read back (--resume)")
        else:
            t = time.time()
            result.pretrained = _accuracies(
                runner.evaluate(runner.modelpool.load_pretrained_model()), tasks
            )
            for task in tasks:
                result.finetuned[task] = _accuracies(
                    runner.evaluate(runner.modelpool.load_model(task)), tasks
                )[task]
            write_json_atomic(
                str(out_dir / "references.json"),
                {"tasks": list(tasks), "pretrained": result.pretrained,
                 "finetuned": result.finetuned},
            )  # fmt: skip
            progress(
                f"[bench] pretrained and fine-tuned references evaluated in {time.time() - t:.0f}s"
            )
    cells = [(m, v) for m in mergers for v in variants]
    base_merges: dict[str, Any] = {}  # merger -> its base merge (``reuse_base_merge`` only)
    for i, (merger, variant) in enumerate(cells, 1):
        method, overrides = run_overrides(merger, variant, extra)
        cell_dir = out_dir / "runs" / f"{merger}_{variant}"
        saved = _load_json(cell_dir / "run.json") if resume else None
        if saved and saved.get("method") == method and saved.get("overrides") == overrides:
            saved.pop("average", None)
            run = RunResult(**saved)
            how = "read back"
        else:
            reuse = merger in reuse_base_merge
            if reuse and variant != "base" and merger not in base_merges:
                progress(f"[bench] {merger}: computing the base merge once, for every variant")
                base_merges[merger], _ = runner.merge(*run_overrides(merger, "base", extra))
            t = time.time()
            merged, layers = runner.merge(
                method, overrides, report_dir=cell_dir,
                base_merge=base_merges[merger] if reuse and variant != "base" else None,
            )  # fmt: skip
            if reuse and variant == "base":
                base_merges[merger] = merged  # LARV cells rescale copies of it
            acc = _accuracies(runner.evaluate(merged), tasks)
            run = RunResult(
                merger, variant, method, overrides, acc, time.time() - t, layers,
                base_merge_reused=reuse and variant != "base",
            )  # fmt: skip
            write_json_atomic(str(cell_dir / "run.json"), {**vars(run), "average": run.average})
            how = f"{run.seconds:.0f}s"
        result.runs.append(run)
        write_outputs(result, out_dir, figure=False)
        progress(
            f"[bench] ({i}/{len(cells)}) {merger:<15}{variant:<11} avg {100 * run.average:6.2f}"
            f"  ({how})"
        )
    write_outputs(result, out_dir)
    return result


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------
def format_table(result: BenchmarkResult) -> str:
    """Markdown in the paper's Table 1 layout: accuracy (%) per task and average, with
    (±Δ) against the base merger on every LARV / schedule row."""
    tasks = result.tasks
    head = "| Method | " + " | ".join(tasks) + " | Avg. | Avg. / fine-tuned |"
    lines = [head, "|" + "---|" * (len(tasks) + 3)]

    def row(label: str, acc: dict[str, float], base: dict[str, float] | None) -> str:
        cells = []
        for t in tasks:
            cell = f"{100 * acc[t]:.1f}"
            if base is not None:
                cell += f" ({100 * (acc[t] - base[t]):+.1f})"
            cells.append(cell)
        avg = sum(acc.values()) / len(acc)
        avg_cell = f"**{100 * avg:.1f}**"
        if base is not None:
            avg_cell += f" ({100 * (avg - sum(base.values()) / len(base)):+.1f})"
        ft_avg = (
            sum(result.finetuned.values()) / len(result.finetuned) if result.finetuned else None
        )
        rel = f"{100 * avg / ft_avg:.1f}%" if ft_avg else "—"
        return f"| {label} | " + " | ".join(cells) + f" | {avg_cell} | {rel} |"

    if result.pretrained:
        lines.append(row("Pretrained (θ₀)", result.pretrained, None))
    if result.finetuned:
        lines.append(row("Fine-tuned (upper bound)", result.finetuned, None))
    for merger in result.meta["mergers"]:
        base = result.get(merger, "base")
        for variant in result.meta["variants"]:
            run = result.get(merger, variant)
            if run is None:
                continue
            label = f"{MERGER_LABELS.get(merger, merger)} {VARIANT_LABELS[variant]}".replace(
                " base", ""
            )
            lines.append(
                row(
                    label,
                    run.accuracy,
                    None if variant == "base" or base is None else base.accuracy,
                )
            )
    return "\n".join(lines)


def plot_layer_metrics(result: BenchmarkResult, path: Path) -> Path | None:
    """Figure 2 style: e, c (from the base merge's update) and s (tiered solid, continuous
    dashed) against depth, one colour per merger."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mergers = [
        m for m in result.meta["mergers"] if result.get(m, "tiered") or result.get(m, "continuous")
    ]
    if not mergers:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, merger in enumerate(mergers):
        color = colors[i % len(colors)]
        label = MERGER_LABELS.get(merger, merger)
        for variant, style in (("tiered", "-"), ("continuous", "--")):
            run = result.get(merger, variant)
            if run is None or not run.larv_layers:
                continue
            layers = run.larv_layers["layers"]
            depth = [rec["index"] for rec in layers]
            if style == "-" or result.get(merger, "tiered") is None:
                axes[0].plot(depth, [rec["e"] for rec in layers], "o-", color=color, label=label)
                axes[1].plot(depth, [rec["c"] for rec in layers], "o-", color=color, label=label)
            axes[2].plot(depth, [rec["s"] for rec in layers], style, marker=".", color=color,
                         label=f"{label} ({variant})")  # fmt: skip
    for ax, title in zip(axes, ("effective-rank contrast $e_\\ell$", "commutator conflict $c_\\ell$",
                                "scale $s_\\ell$ (tiered —, continuous - -)"), strict=True):  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("layer ℓ (depth)")
        ax.grid(alpha=0.3)
    # one legend for the colours (mergers), outside the panels: the scale panel holds two lines
    # per merger and an inside legend would hide them
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.87, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(result: BenchmarkResult, out_dir: Path, figure: bool = True) -> dict[str, Path]:
    from .algorithm import write_json_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "results.json",
        "table": out_dir / "table.md",
        "figure": out_dir / "fig2_layer_metrics.png",
    }
    write_json_atomic(str(paths["json"]), result.to_dict())
    table = format_table(result)
    header = (
        "Accuracy (%) per task; (±Δ) = variant − base merger, percentage points; "
        "Avg. / fine-tuned = average accuracy relative to the fine-tuned models' (upper bound).\n\n"
        f"Command: `{result.command}`\n\n"
    )
    tmp = paths["table"].with_suffix(".md.tmp")
    tmp.write_text(header + table + "\n")
    os.replace(tmp, paths["table"])
    if not figure or plot_layer_metrics(result, paths["figure"]) is None:
        paths.pop("figure")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config-dir", type=Path, default=None,
        help="primary config tree (default: FusionBench's own; this plugin's is always appended)",
    )  # fmt: skip
    parser.add_argument("--modelpool", required=True)
    parser.add_argument("--taskpool", required=True)
    parser.add_argument("--mergers", nargs="+", default=list(MERGERS), choices=list(MERGERS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--wudi-iter", type=int, default=None, help="override WUDI's iter_num (default 400)"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--pool-overrides", nargs="*", default=[],
        help="extra Hydra overrides for the pools, e.g. modelpool.testbed_dir=DIR taskpool.testbed_dir=DIR",
    )  # fmt: skip
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--resume", action="store_true",
        help="reuse the cells (and references) an earlier, interrupted run already saved in --out",
    )  # fmt: skip
    parser.add_argument(
        "--reuse-base-merge", nargs="*", default=[], choices=list(MERGERS), metavar="MERGER",
        help="compute these mergers' base merge once and rescale it for every LARV variant "
        "(for slow deterministic mergers such as wudi)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    extra = {"wudi": [f"iter_num={args.wudi_iter}"]} if args.wudi_iter else None
    command = "python -m fusion_bench_larv.benchmark " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    runner = InProcessFusionBench(
        args.config_dir or fusion_bench_config_dir(),
        args.modelpool,
        args.taskpool,
        args.device,
        args.pool_overrides,
    )
    try:
        result = run_benchmark(
            runner, args.mergers, args.variants, args.out, command, extra, resume=args.resume,
            reuse_base_merge=args.reuse_base_merge,
        )  # fmt: skip
    finally:
        runner.close()
    print(format_table(result))
    print(
        f"\nwrote {args.out / 'results.json'}, {args.out / 'table.md'}, {args.out / 'fig2_layer_metrics.png'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
