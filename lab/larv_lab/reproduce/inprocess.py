"""The in-process launcher: the same cells as the Hydra multirun launchers, in this process, with
one loaded model pool and task pool per suite (fast: no process start, no reload per cell).

Each cell's config is composed from the same generated sweep folder the multirun launchers use
(``<out>/_sweeps/<suite>/reproduce_suite.yaml`` + ``+cell=<name>`` + the ``-o`` overrides) and
resolved as the ``fusion_bench`` CLI resolves it; the method is instantiated, run and evaluated as
FusionBench's ``FabricModelFusionProgram.run`` does (seed, ``on_run_start`` / ``run`` /
``on_run_end``, ``evaluate_merged_model``), and the cell's folder gets the same files
(``program_report.json``, ``larv_layers.json``, ``cell.json``; ``per_sample.json`` from a
recording task pool, :mod:`fusion_bench_larv.evaluation.per_sample`). A cell whose report exists is
skipped (resume). Only the pools are shared: a suite's cells must compose identical model pool,
task pool and fabric configs (they do; the launcher checks), and a suite whose pool and fabric
configs are the suite's before it (suites mapped onto the same ``--pools``) keeps that suite's
loaded pools. A config in FusionBench's older form (no ``_target_``) is built by FusionBench's
compat loader, as its program builds it.

``reuse_base_merge``: for these mergers the base merge is computed once per suite and every LARV
cell with ``placement: merged`` rescales a copy of it (``LARVAlgorithm.run(modelpool,
base_merge=...)``) instead of running the base merger again, as does every LiNeS cell whose
``base_method`` is exactly the base cell's method config (``LiNeSAlgorithm.run``; not over Task
Arithmetic, whose coefficient LiNeS sets to 1); the cell's ``cell.json`` says
``"base_merge": "reused"`` (as does its ``larv_layers.json``), and its seconds then count LARV
and the evaluation only.

FusionBench's own output during a cell (its prints, such as a merger's per-parameter lines and
profiler tables, warnings, progress bars and log records) goes to the cell's
``fusion_bench.log``; ``echo=True`` also passes it through to this process's output, as the
multirun launchers do without ``--quiet``. The launcher's own progress is one line per cell.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fusion_bench_larv.core.io import write_json_atomic
from fusion_bench_larv.evaluation import per_sample

from .experiments import BASE, Cell, by_suite
from .sweep import CELL, PRIMARY, is_done, read_json, write_sweep

LOG = "fusion_bench.log"  # a cell's FusionBench output, beside its report


class _Tee:
    """A text stream writing to several streams."""

    def __init__(self, *streams):
        self._streams = streams

    def write(self, text: str) -> int:
        for s in self._streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self._streams:
            s.flush()

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def fusion_bench_output(path: Path, echo: bool) -> Iterator[None]:
    """Everything printed, warned or logged inside the block goes to ``path`` (appended), and
    also to the current stdout / stderr when ``echo``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        out = _Tee(fh, sys.stdout) if echo else fh
        err = _Tee(fh, sys.stderr) if echo else fh
        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s %(name)s] %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        # handlers bound to the terminal when they were made (FusionBench's rich handler) are
        # muted for the block; the file handler above keeps their records
        muted = [h for h in root.handlers if h is not handler] if not echo else []
        levels = [h.level for h in muted]
        for h in muted:
            h.setLevel(logging.CRITICAL + 1)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):  # type: ignore[type-var]
                yield
        finally:
            for h, level in zip(muted, levels, strict=True):
                h.setLevel(level)
            root.removeHandler(handler)


def _print_flush(msg: str, stream=None) -> None:
    print(msg, file=stream or sys.stdout, flush=True)


def _container(cfg: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


class _Evaluator:
    """FusionBench's own ``evaluate_merged_model`` (it uses ``self`` only to recurse)."""

    from fusion_bench.programs import FabricModelFusionProgram

    evaluate_merged_model = FabricModelFusionProgram.evaluate_merged_model


class SuiteSession:
    """Hydra compose context on one suite's generated sweep folder, with the suite's model pool,
    task pool and fabric instantiated once (from the first cell's config). ``previous``: the
    session of the suite before; where this suite composes the same pool and fabric configs
    (suites mapped onto the same ``--pools``), its objects are taken over instead of built again,
    else they are released before this suite's are built."""

    def __init__(
        self, sweep_dir: Path, overrides: Sequence[str] = (), previous: SuiteSession | None = None
    ):
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
        self._ctx = initialize_config_dir(config_dir=str(sweep_dir), version_base=None)
        self._ctx.__enter__()
        self.overrides = list(overrides)
        self.modelpool = self.taskpool = self.fabric = None
        self._shared: dict[str, Any] | None = None
        self._previous = previous
        self.reused = False  # whether the pools are the previous suite's

    def release(self) -> None:
        """Drop the pools and fabric (a later suite that shares none of them)."""
        self.modelpool = self.taskpool = self.fabric = None
        self._shared = None

    def close(self) -> None:
        from hydra.core.global_hydra import GlobalHydra

        self._ctx.__exit__(None, None, None)
        GlobalHydra.instance().clear()

    def compose(self, cell: Cell):
        """The cell's config, composed and resolved as the CLI does for ``-m +cell=<name>``."""
        from hydra import compose
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf, open_dict

        cfg = compose(PRIMARY, overrides=[f"+cell={cell.name}", *self.overrides],
                      return_hydra_config=True)  # fmt: skip
        HydraConfig.instance().set_config(cfg)  # ${hydra:...} resolves as in a CLI run
        OmegaConf.set_readonly(cfg, False)
        with open_dict(cfg):
            cfg.pop("hydra")
        OmegaConf.resolve(cfg)
        self._share(cell, cfg)
        return cfg

    def _share(self, cell: Cell, cfg) -> None:
        fabric = _container(cfg.get("fabric")) or {}
        fabric.pop("loggers", None)  # one fabric for every cell: no per-run logger
        shared = {
            "modelpool": _container(cfg.modelpool),
            "taskpool": _container(cfg.get("taskpool")),
            "fabric": fabric,
        }
        previous, self._previous = self._previous, None
        if self._shared is None and previous is not None and previous._shared == shared:
            self._shared, self.reused = shared, True
            self.fabric, self.modelpool = previous.fabric, previous.modelpool
            self.taskpool = previous.taskpool
            previous.release()
        elif self._shared is None:
            import lightning as L
            from fusion_bench import instantiate

            if previous is not None:
                previous.release()
            self._shared = shared
            self.fabric = instantiate(fabric) if fabric else L.Fabric(devices=1)
            self.fabric.launch()
            self.modelpool = self.instantiate(cfg.modelpool, "modelpool")
            self.taskpool = (
                self.instantiate(cfg.taskpool, "taskpool") if cfg.get("taskpool") else None
            )
        elif shared != self._shared:
            differ = [k for k in shared if shared[k] != self._shared[k]]
            raise ValueError(
                f"{cell.rel_dir}: its {', '.join(differ)} config differs from the suite's first "
                "cell's; the in-process launcher shares them (use a Hydra launcher)"
            )

    def instantiate(self, config, group: str = "method"):
        """As ``FabricModelFusionProgram._instantiate_and_setup``, with the shared fabric: a
        config without ``_target_`` (FusionBench's older form, e.g. Flan-T5's GLUE task pool) is
        built by FusionBench's compat loader of its ``group``."""
        from fusion_bench import import_object, instantiate

        if "_target_" not in config:
            obj = import_object(COMPAT_LOADERS[group])(config)
        else:
            import_object(config._target_)
            obj = instantiate(config, _recursive_=config.get("_recursive_", False))
        if hasattr(obj, "_fabric_instance"):
            obj._fabric_instance = self.fabric
        if hasattr(obj, "_fabric"):  # the older form's classes, as FusionBench's program does
            obj._fabric = self.fabric
        return obj


#: what FusionBench's program builds a config without ``_target_`` with, by config group
COMPAT_LOADERS = {
    "method": "fusion_bench.compat.method.load_algorithm_from_config",
    "modelpool": "fusion_bench.compat.modelpool.load_modelpool_from_config",
    "taskpool": "fusion_bench.compat.taskpool.load_taskpool_from_config",
}


class InProcessLauncher:
    """Runs cells in this process (see the module docstring). ``progress`` gets one line per
    cell; subclass :meth:`merge` to watch what runs (the tests do)."""

    def __init__(
        self,
        out: Path,
        overrides: Sequence[str] = (),
        reuse_base_merge: Sequence[str] = (),
        progress: Callable[[str], None] | None = None,
        echo: bool = True,
    ):
        self.out = Path(out).resolve()
        # Hydra's own settings (launcher options) mean nothing in process
        self.overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
        self.reuse_base_merge = set(reuse_base_merge)
        # bound to this process's stdout now: cells run with their output captured
        stdout = sys.stdout
        self.progress = progress or (lambda msg: _print_flush(msg, stdout))
        self.echo = echo
        self._base_merges: dict[str, Any] = {}  # merger -> its base merge (one at a time)

    # --------------------------------------------------------------------------------------------
    def run(self, cells: Sequence[Cell]) -> list[Cell]:
        """Run every cell not done yet, suite by suite; returns the cells it ran."""
        from fusion_bench.utils.instantiate_utils import set_print_function_call

        ran: list[Cell] = []
        n, i = len(cells), 0
        previous: SuiteSession | None = None  # its pools serve the next suite if it composes them
        with set_print_function_call(False):  # progress lines instead of FusionBench's echo
            for scells in by_suite(cells).values():
                todo = [c for c in scells if not is_done(c, self.out)]
                if not todo:
                    i += len(scells)
                    continue
                bases = [self._base_cell(c) for c in todo if self._reuses(c)]
                sweep_dir = write_sweep(scells[0].suite, todo, self.out, extra_configs=bases)
                session = SuiteSession(sweep_dir, self.overrides, previous)
                try:
                    for cell in scells:
                        i += 1
                        if cell not in todo:
                            self.progress(f"[reproduce] ({i}/{n}) {cell.rel_dir}: done (skipped)")
                            continue
                        self._run_cell(session, cell, f"({i}/{n})")
                        ran.append(cell)
                finally:
                    session.close()
                    self._base_merges.clear()
                if session.reused:
                    self.progress(f"[reproduce] {scells[0].suite.key}: ran on the pools loaded for "
                                  "the suite before it (the same configs)")  # fmt: skip
                previous = session
        return ran

    # --------------------------------------------------------------------------------------------
    def _reuses(self, cell: Cell) -> bool:
        return cell.merger in self.reuse_base_merge and not cell.is_reference

    @staticmethod
    def _base_cell(cell: Cell) -> Cell:
        return Cell(cell.suite, cell.merger, BASE)

    def _base_merge(self, session: SuiteSession, cell: Cell) -> Any:
        """The merger's base merge for this suite: kept from its base cell, else computed once."""
        if cell.merger not in self._base_merges:
            self.progress(f"[reproduce] {cell.merger}: computing the base merge once, for every "
                          "LARV variant")  # fmt: skip
            base = self._base_cell(cell)
            cfg = session.compose(base)
            self._base_merges = {cell.merger: self.merge(session, base, cfg)}
        return self._base_merges[cell.merger]

    def _same_base_config(self, session: SuiteSession, cell: Cell, cfg) -> bool:
        """Whether the cell's method wraps a ``base_method`` identical to the base cell's method
        config (LiNeS over WUDI: yes; over Task Arithmetic: no, it sets the coefficient to 1)."""
        from omegaconf import OmegaConf

        if cell.variant.method is None or cfg.method.get("base_method") is None:
            return False
        base = session.compose(self._base_cell(cell)).method
        return OmegaConf.to_container(cfg.method.base_method, resolve=True) == (
            OmegaConf.to_container(base, resolve=True)
        )

    def merge(self, session: SuiteSession, cell: Cell, cfg, base_merge: Any = None) -> Any:
        """Instantiate and run the cell's method as FusionBench's program does."""
        if cfg.get("seed") is not None:
            import lightning as L

            L.seed_everything(cfg.seed)
        method = session.instantiate(cfg.method)
        if getattr(method, "report_dir", False) is None:  # LARV, LiNeS, testbed AdaMerging
            method.report_dir = str(cell.run_dir(self.out))  # the run's log dir, as in the CLI
        method.on_run_start()
        if base_merge is not None:
            merged = method.run(session.modelpool, base_merge=base_merge)
        else:
            merged = method.run(session.modelpool)
        method.on_run_end()
        return merged

    def _run_cell(self, session: SuiteSession, cell: Cell, counter: str) -> None:
        from .collate import load_run

        run_dir = cell.run_dir(self.out)
        with fusion_bench_output(run_dir / LOG, self.echo):
            cfg = session.compose(cell)
            reuse = self._reuses(cell) and (
                (
                    cell.variant.larv is not None
                    and cell.variant.method is None  # LARV's own config
                    and cfg.method.get("placement", "merged") == "merged"
                )  # another method (LiNeS) over exactly the base cell's merger config
                or self._same_base_config(session, cell, cfg)
            )
            base_merge = self._base_merge(session, cell) if reuse else None
            t = time.time()
            merged = self.merge(session, cell, cfg, base_merge)
            if self._reuses(cell) and cell.variant.larv is None:
                self._base_merges = {cell.merger: merged}  # its LARV cells rescale copies of it
            per_sample.take(session.taskpool)  # nothing left over from an earlier cell
            report = self._save_and_evaluate(session, cfg, merged)
            seconds = time.time() - t
        evaluations = per_sample.take(session.taskpool)
        if evaluations:  # a recording task pool: per_sample.json beside the report, as the CLI
            per_sample.write(run_dir / per_sample.FILE, evaluations)
        meta = read_json(run_dir / CELL) or {}
        meta["launch"] = {
            "launcher": "inprocess",
            "seconds": round(seconds, 3),
            "base_merge": "reused" if base_merge is not None else "computed",
        }
        write_json_atomic(run_dir / CELL, meta)
        # FusionBench's report last: a cell is done when it exists (as with the CLI)
        report_path = str(cfg.report_save_path).format(log_dir=str(run_dir))
        write_json_atomic(report_path, report, indent=None)
        run = load_run(cell, self.out)
        avg = f"avg {run.average:6.2f}" if run else "no accuracy in the report"
        how = ", base merge reused" if base_merge is not None else ""
        self.progress(f"[reproduce] {counter} {cell.rel_dir}: {avg}  ({seconds:.0f}s{how})")

    @staticmethod
    def _save_and_evaluate(session: SuiteSession, cfg, merged: Any) -> Any:
        if cfg.get("merged_model_save_path"):
            path = str(cfg.merged_model_save_path).format(log_dir=cfg.path.log_dir)
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            session.modelpool.save_model(
                merged, path, **(cfg.get("merged_model_save_kwargs") or {})
            )
        if session.taskpool is None:
            return None
        return _Evaluator().evaluate_merged_model(session.taskpool, merged)
