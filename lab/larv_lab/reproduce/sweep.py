"""Turn cells into Hydra multiruns of the real ``fusion_bench`` CLI.

One multirun per suite: a generated primary config (the suite's primary config with its
``method`` choice dropped) and a generated config group ``cell`` with one option per cell
(``# @package _global_``: it picks the method and sets ``path.log_dir`` /
``report_save_path`` to the cell's own folder), swept as ``-m +cell=a,b,c``. Any Hydra launcher
spreads the cells (``hydra/launcher=joblib``, ``submitit_slurm``, ...). Only cells without a
report are launched, so an interrupted sweep resumes where it stopped. The generated folder is
the primary config folder (``--config-path``, as the in-process launcher composes it): first on
the search path, so what it holds (a custom config root's copies, :class:`.registry.
use_config_root`) wins over the same names elsewhere; FusionBench's own configs come after it,
through this plugin's search-path plugin.

    fusion_bench --config-path <out>/_sweeps/<suite> --config-name reproduce_suite \\
        -m +cell=ta__base,ta__larv-tiered hydra/launcher=joblib
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from fusion_bench_larv.core.io import write_json_atomic, write_text_atomic

from .experiments import Cell, PoolSpec, Suite, flat_overrides
from .registry import custom_config_root, find_primary

REPORT = "program_report.json"
LAYERS = "larv_layers.json"
#: the wrapper reports that may hold a choice on validation (their ``validation`` block):
#: guarded LARV's, LiNeS's and the signed depth ramp's (their method configs' ``report_name``)
CHOICE_REPORTS = (LAYERS, "lines_layers.json", "signed_depth_ramp_layers.json")
CELL = "cell.json"
PRIMARY = "reproduce_suite"
#: the config groups a custom config root (:class:`.registry.use_config_root`) supplies
CUSTOM_GROUPS = ("method", "larv", "modelpool", "taskpool")


# ------------------------------------------------------------------------------------------------
# state of a cell
# ------------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def is_done(cell: Cell, out: Path) -> bool:
    """A cell is done when its program report exists and parses (FusionBench writes it last)."""
    return read_json(cell.run_dir(out) / REPORT) is not None


# ------------------------------------------------------------------------------------------------
# config generation
# ------------------------------------------------------------------------------------------------
def _is_group(entry: Any, group: str) -> bool:
    if not isinstance(entry, Mapping) or len(entry) != 1:
        return False
    key = next(iter(entry)).strip()
    return key.removeprefix("override").strip().lstrip("/") == group


def primary_config(pool: PoolSpec, sweep_dir: Path) -> dict[str, Any]:
    """The suite's primary config without its ``method`` choice, plus the pool overrides."""
    if pool.parent == "fabric_model_fusion":
        defaults: list[Any] = ["fabric_model_fusion"]
        body: dict[str, Any] = {}
    else:
        parent = yaml.safe_load(find_primary(pool.parent, pool.searchpath).read_text()) or {}
        defaults = [d for d in parent.pop("defaults", []) if not _is_group(d, "method")]
        body = parent
    defaults = [d for d in defaults if d != "_self_"]
    for group, choice in (("modelpool", pool.modelpool), ("taskpool", pool.taskpool)):
        if choice is None:
            continue
        defaults = [d for d in defaults if not _is_group(d, group)]
        defaults.append({f"override /{group}": choice})
    defaults.append("_self_")
    cfg: dict[str, Any] = {"defaults": defaults, **body}
    for k, v in pool.values.items():
        if isinstance(v, Mapping) and isinstance(cfg.get(k), Mapping):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    hydra = cfg.setdefault("hydra", {})
    if pool.searchpath:
        hydra["searchpath"] = [f"file://{Path(p).resolve()}" for p in pool.searchpath]
    hydra["sweep"] = {"dir": str(sweep_dir / "hydra"), "subdir": "${hydra.job.override_dirname}"}
    return cfg


def cell_config(cell: Cell, out: Path) -> dict[str, Any]:
    """The cell's option of the generated ``cell`` group: its method (from the registry) and its
    own folder as the run's log dir and report path."""
    method, values = cell.method()
    run_dir = cell.run_dir(out).resolve()
    cfg: dict[str, Any] = {"defaults": [{"override /method": method}, *cell.method_defaults()]}
    if values:
        cfg["method"] = values
    cfg["path"] = {"log_dir": str(run_dir)}
    cfg["report_save_path"] = str(run_dir / REPORT)
    return cfg


def _dump(path: Path, cfg: Mapping[str, Any], header: str = "") -> None:
    write_text_atomic(path, header + yaml.safe_dump(dict(cfg), sort_keys=False, allow_unicode=True))


def write_sweep(
    suite: Suite, cells: Sequence[Cell], out: Path, extra_configs: Sequence[Cell] = ()
) -> Path:
    """Write the generated config folder of one suite's sweep (and each cell's ``cell.json``);
    returns it. Both launchers compose their cells from it. ``extra_configs``: cells that only
    need their config option (a finished base cell whose merge is computed again for reuse)."""
    out = Path(out).resolve()
    sweep_dir = out / "_sweeps" / suite.key
    header = "# generated by larv_lab.reproduce; rewritten on every launch\n"
    _dump(sweep_dir / f"{PRIMARY}.yaml", primary_config(suite.pool, sweep_dir), header)
    custom = custom_config_root()
    if custom is not None:
        # an edited copy of this plugin's configs, or stand-in pools under the paper's names:
        # first on the search path (the sweep folder is the primary config folder, in process
        # and on the command line), so the LARV configs and pools come from it as the
        # registry's lookups do
        for group in CUSTOM_GROUPS:
            if (custom / group).is_dir():
                shutil.copytree(custom / group, sweep_dir / group, dirs_exist_ok=True)
    for cell in [*cells, *extra_configs]:
        _dump(
            sweep_dir / "cell" / f"{cell.name}.yaml",
            cell_config(cell, out),
            "# @package _global_\n" + header,
        )
    models = models_fingerprint(suite.pool) if cells else None
    for cell in cells:
        meta = {
            "suite": suite.key,
            "suite_label": suite.label,
            "pool": suite.pool.label or suite.pool.parent,
            "merger": cell.merger,
            "variant": cell.variant.slug,
            "overrides": cell.overrides(),
        }
        if models is not None:
            meta["models"] = models
        write_json_atomic(cell.run_dir(out) / CELL, meta)
    return sweep_dir


def models_fingerprint(pool: PoolSpec) -> dict | None:
    """What identifies the models a suite's cells merge and the test sets they are scored on,
    for ``cell.json``: for a built testbed pool, its folder's name and
    :meth:`~larv_lab.testbed.toolkit.BuiltTestbed.weights_digest` (a rebuild on another machine
    shares the name, not the digest); None for other pools (FusionBench's named checkpoints)
    and for a testbed not built yet (it is built when the cells run)."""
    if not (pool.modelpool or "").startswith("LarvTestbed/"):
        return None
    from ..testbed.pools import open_testbed

    given = dict(pool.values.get("modelpool") or {})
    try:
        testbed = open_testbed(pool.modelpool.split("/", 1)[1], cache_dir=given.get("cache_dir"),
                               testbed_dir=given.get("testbed_dir"))  # fmt: skip
    except FileNotFoundError:
        return None
    return {"testbed": testbed.root.name, "weights_sha256": testbed.weights_digest()}


# ------------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------------
def fusion_bench_exe() -> str:
    exe = Path(sys.executable).parent / "fusion_bench"
    return str(exe) if exe.exists() else "fusion_bench"


# ``--jobs N``: how each launcher caps the runs at once (other launchers: set it with ``-o``)
JOBS_OVERRIDE = {
    "joblib": "hydra.launcher.n_jobs",
    "submitit_slurm": "hydra.launcher.array_parallelism",
    # submitit's local executor starts every job it is given: the sweeper hands out N at a time
    "submitit_local": "hydra.sweeper.max_batch_size",
}


def launcher_overrides(launcher: str, jobs: int | None) -> list[str]:
    if launcher in ("", "basic"):
        return []
    out = [f"hydra/launcher={launcher}"]
    if jobs and launcher in JOBS_OVERRIDE:
        out.append(f"{JOBS_OVERRIDE[launcher]}={jobs}")
    return out


def sweep_command(
    sweep_dir: Path,
    cells: Sequence[Cell],
    launcher: str = "basic",
    jobs: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    return [
        fusion_bench_exe(),
        # the primary config folder (`--config-dir` would come after FusionBench's own configs)
        "--config-path",
        str(sweep_dir),
        "--config-name",
        PRIMARY,
        "-m",
        "+cell=" + ",".join(c.name for c in cells),
        *launcher_overrides(launcher, jobs),
        *extra,
    ]


def human_command(cell: Cell, extra: Sequence[str] = ()) -> str:
    """The cell as one plain ``fusion_bench`` command (what a person would type)."""
    pool = cell.suite.pool
    args = ["fusion_bench"]
    if pool.parent != "fabric_model_fusion":
        args += ["--config-name", pool.parent]
    args += [f"{k}={v}" for k, v in pool.values.items() if not isinstance(v, Mapping)]
    nested = {k: v for k, v in pool.values.items() if isinstance(v, Mapping)}
    args += ["++" + o for o in flat_overrides(nested)]  # cache dirs, a mapped suite's larv_suite
    if pool.modelpool:
        args.append(f"modelpool={pool.modelpool}")
    if pool.taskpool:
        args.append(f"taskpool={pool.taskpool}")
    args += cell.overrides()
    return " ".join(shlex.quote(a) for a in [*args, *extra])


def run_sweep(
    cmd: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    echo: bool = True,
) -> int:
    """Run one multirun; its output goes to ``log_path`` (and to stdout with ``echo``)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    run_env = dict(os.environ)
    run_env.setdefault("HYDRA_FULL_ERROR", "1")
    if env:
        run_env.update(env)
    with open(log_path, "a") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')}  {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
            list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=run_env, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if echo:
                sys.stdout.write(line)
        return proc.wait()
