"""Run the experiments (the paper's artefacts and the benchmark): one command each, resumable.

    python -m larv_lab.reproduce --dry-run all          # every run of every artefact
    python -m larv_lab.reproduce table1 --out outputs/paper
    python -m larv_lab.reproduce table2 --launcher joblib --jobs 4
    python -m larv_lab.reproduce all --launcher submitit_slurm \\
        --override hydra.launcher.partition=gpu --override hydra.launcher.gpus_per_node=1
    python -m larv_lab.reproduce table1 --collate-only  # tables and figures only
    python -m larv_lab.reproduce bench --pools testbed:full --launcher inprocess \\
        --merger ta ties iso_c pretrained finetuned --out outputs/bench

Experiments: table1, table2 (also Tables 7 and 9), table3, table5, table6 (also Figure 4), fig2,
fig3 (also Figure 5), table4, table8, all (= these), and bench (every merger alone, with LARV and
with depth-only schedules, on one pool pair). Each run writes into
``<out>/runs/<suite>/<merger>/<variant>/`` (FusionBench's ``program_report.json``, LARV's
``larv_layers.json``, ``cell.json``); runs whose report exists are skipped, so re-running a
command after an interruption completes only the missing runs. Launchers: any Hydra launcher (a
multirun of the real ``fusion_bench`` CLI per suite) or ``inprocess`` (this process, one loaded
model pool per suite; same configs, same files, same numbers). The collator then writes every
artefact of the named experiments into ``<out>/artefacts/``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import collate as collate_mod
from .experiments import (
    ALL,
    EXPERIMENTS,
    Cell,
    by_suite,
    expand,
    filter_cells,
    map_pools,
    parse_pool,
    unique_cells,
)
from .registry import registry
from .sweep import (
    PRIMARY,
    human_command,
    is_done,
    run_sweep,
    sweep_command,
    write_sweep,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m larv_lab.reproduce",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "experiments", nargs="*", default=[ALL], metavar="EXPERIMENT",
        help=f"{', '.join(EXPERIMENTS)} or {ALL} (default)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("reproduce_out"), help="output folder")
    p.add_argument("--dry-run", action="store_true", help="list the runs; run nothing")
    p.add_argument("--summary", action="store_true", help="with --dry-run: counts only")
    p.add_argument(
        "--launcher", default="basic",
        help="inprocess (this process, one loaded model pool per suite) or a Hydra launcher: "
        "basic (sequential), joblib, submitit_slurm, submitit_local, ...",
    )  # fmt: skip
    p.add_argument(
        "--jobs", type=int, default=None,
        help="cells at once: joblib's n_jobs, submitit_slurm's array_parallelism, "
        "submitit_local's sweeper batch size",
    )  # fmt: skip
    p.add_argument(
        "--reuse-base-merge", nargs="+", action="extend", default=[], metavar="MERGER",
        help="inprocess: compute these mergers' base merge once per suite and rescale it for "
        "every LARV variant (slow deterministic mergers: wudi, lot)",
    )  # fmt: skip
    p.add_argument(
        "--override", "-o", action="append", default=[], metavar="KEY=VALUE",
        help="extra Hydra override for every run (e.g. fabric.accelerator=cpu, "
        "hydra.launcher.partition=gpu); repeatable",
    )  # fmt: skip
    p.add_argument("--suite", nargs="+", action="extend", default=[], metavar="GLOB",
                   help="only suites whose key matches")  # fmt: skip
    p.add_argument("--merger", nargs="+", action="extend", default=[], metavar="GLOB",
                   help="only these mergers / references (e.g. ta ties pretrained finetuned); "
                   "names an optional merger (e.g. lot) to include it")  # fmt: skip
    p.add_argument("--variant", nargs="+", action="extend", default=[], metavar="GLOB",
                   help="only these variants, by slug or short name (base, larv-tiered or "
                   "tiered, sched-linear or linear, ...)")  # fmt: skip
    p.add_argument(
        "--pools", nargs="+", default=None, metavar="SPEC",
        help="run every cell on other pools (folders keep the paper's names): "
        "tiny_clip:ROOT | testbed:RECIPE[:CACHE_DIR] | testbed:FOLDER | "
        "pools:MODELPOOL,TASKPOOL[,CONFIG_DIR]; several (bench only, e.g. two build seeds): "
        "one suite per pools, bench-<pools>, side by side",
    )  # fmt: skip
    p.add_argument("--collate-only", action="store_true", help="only write tables and figures")
    p.add_argument("--no-collate", action="store_true", help="only run")
    p.add_argument(
        "--check-compose", action="store_true",
        help="compose every selected run's config with Hydra (no run, no download) and report",
    )  # fmt: skip
    p.add_argument(
        "--quiet",
        action="store_true",
        help="do not echo FusionBench's output (it still goes to each run's log: "
        "fusion_bench.log in process, the sweep's sweep.log otherwise)",
    )
    return p


def select(args) -> tuple[dict[str, list[Cell]], list[Cell]]:
    include = [m for m in args.merger if "*" not in m and "?" not in m]
    groups = expand(args.experiments, include_mergers=include)
    pool = [parse_pool(spec) for spec in args.pools] if args.pools else None
    out: dict[str, list[Cell]] = {}
    for name, cells in groups.items():
        # suites are filtered after mapping: several --pools name their suites bench-<pools>
        out[name] = filter_cells(map_pools(cells, pool), args.suite, args.merger, args.variant)
    return out, unique_cells(out)


def dry_run(args, groups, cells) -> None:
    out = args.out
    for name, ecells in groups.items():
        exp = EXPERIMENTS[name]
        done = sum(is_done(c, out) for c in ecells)
        print(f"{name}: {len(ecells)} runs ({done} done, {len(ecells) - done} to run)")
        print(f"    {exp.title}")
        print(f"    grid: {exp.grid.replace('{M}', str(len(exp.merger_list(args.merger))))}")
        if args.summary:
            continue
        for c in ecells:
            status = "done" if is_done(c, out) else "todo"
            print(f"  [{status}] {c.rel_dir}")
            print(f"         {human_command(c, args.override)}")
    done = sum(is_done(c, out) for c in cells)
    print(
        f"\ntotal: {len(cells)} distinct runs over {len(groups)} experiment(s) "
        f"(runs shared between experiments counted once); {done} done, {len(cells) - done} to run"
    )
    todo = [c for c in cells if not is_done(c, out)]
    if todo and not args.summary:
        inprocess = args.launcher == "inprocess"
        print(
            "\nmultirun commands (one per suite; configs generated at launch"
            + ("; --launcher inprocess composes the same configs in one process):" if inprocess
               else "):")
        )  # fmt: skip
        launcher = "basic" if inprocess else args.launcher
        for key, scells in by_suite(todo).items():
            sweep_dir = Path(out).resolve() / "_sweeps" / key
            cmd = sweep_command(sweep_dir, scells, launcher, args.jobs, args.override)
            print("  " + shlex.join(cmd))


def check_compose(cells: Sequence[Cell], out: Path) -> list[str]:
    """Compose each cell's config as the CLI would (nothing runs); returns the problems."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        for scells in by_suite(cells).values():
            sweep_dir = write_sweep(scells[0].suite, scells, Path(tmp))
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(sweep_dir), version_base=None):
                for c in scells:
                    try:
                        cfg = compose(PRIMARY, overrides=[f"+cell={c.name}"])
                        method_cfg, values = c.method()
                        target = OmegaConf.select(cfg, "method._target_") or OmegaConf.select(
                            cfg, "method.name"
                        )
                        if c.variant.larv is not None:
                            assert target == "fusion_bench_larv.LARVAlgorithm", target
                            for k, v in c.variant.larv.items():
                                got = OmegaConf.to_container(cfg.method)[k]
                                assert got == v, (k, got, v)
                            assert "_target_" in cfg.method.base_method
                        else:
                            assert target and "LARV" not in str(target), target
                        assert cfg.path.log_dir == str(c.run_dir(Path(tmp)).resolve())
                        assert cfg.modelpool is not None and cfg.taskpool is not None
                    except Exception as exc:  # noqa: BLE001 - report every failing cell
                        problems.append(f"{c.rel_dir}: {type(exc).__name__}: {exc}")
            GlobalHydra.instance().clear()
    return problems


def launch(args, cells: Sequence[Cell]) -> list[str]:
    """Run the cells not done yet with the chosen launcher; returns what failed."""
    out: Path = args.out
    failed: list[str] = []
    todo = [c for c in cells if not is_done(c, out)]
    print(
        f"[reproduce] {len(cells)} runs: {len(cells) - len(todo)} done (skipped), "
        f"{len(todo)} to run",
        flush=True,
    )
    if args.launcher == "inprocess":
        from .inprocess import InProcessLauncher

        launcher = InProcessLauncher(out, args.override, args.reuse_base_merge, echo=not args.quiet)
        launcher.run(cells)
    else:
        for key, scells in by_suite(todo).items():
            sweep_dir = write_sweep(scells[0].suite, scells, out)
            cmd = sweep_command(sweep_dir, scells, args.launcher, args.jobs, args.override)
            print(f"[reproduce] {key}: {len(scells)} runs\n  {shlex.join(cmd)}", flush=True)
            rc = run_sweep(cmd, sweep_dir / "sweep.log", echo=not args.quiet)
            if rc != 0:
                failed.append(f"{key} (exit {rc}; log {sweep_dir / 'sweep.log'})")
    missing = [c for c in cells if not is_done(c, out)]
    print(
        f"[reproduce] {len(cells) - len(missing)}/{len(cells)} runs done"
        + (f"; still missing: {', '.join(str(c.rel_dir) for c in missing)}" if missing else ""),
        flush=True,
    )
    for f in failed:
        print(f"[reproduce] sweep failed: {f}", flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = sorted(set(args.reuse_base_merge) - set(registry().mergers))
    if unknown:
        raise SystemExit(f"--reuse-base-merge: unknown merger(s) {unknown}")
    if args.reuse_base_merge and args.launcher != "inprocess":
        raise SystemExit("--reuse-base-merge needs --launcher inprocess (one process per suite)")
    groups, cells = select(args)
    if args.dry_run:
        dry_run(args, groups, cells)
        return 0
    if args.check_compose:
        problems = check_compose(cells, args.out)
        for p in problems:
            print("FAIL", p)
        print(f"composed {len(cells) - len(problems)}/{len(cells)} runs")
        return 1 if problems else 0
    failed = [] if args.collate_only else launch(args, cells)
    if not args.no_collate:
        for path in collate_mod.collate(args.out, groups):
            print(f"[reproduce] wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
