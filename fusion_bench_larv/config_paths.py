"""Where the config trees are, found without importing them: this plugin's (the Hydra search-path
plugin appends it; the lab's harness reads its method configs) and FusionBench's own."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(name: str) -> Path | None:
    """The folder of an importable package, found without importing it (None if absent)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        if Path(location).is_dir():
            return Path(location)
    return None


def larv_config_dir() -> Path:
    """This plugin's config tree: the installed ``fusion_bench_larv_config`` package (a wheel, a
    regular or a default editable install), else the repository's ``config/`` folder (an
    ``editable_mode=compat`` install, where that package is not importable)."""
    found = package_dir("fusion_bench_larv_config")
    if found is not None and (found / "method").is_dir():
        return found
    return Path(__file__).resolve().parent.parent / "config"


def fusion_bench_config_dir() -> Path | None:
    """FusionBench's own ``fusion_bench_config`` folder. FusionBench 0.2.33 ships it without an
    ``__init__.py``, so Hydra is given it as a ``file://`` path: under ``pkg://`` it reads it but
    warns on every run."""
    return package_dir("fusion_bench_config")
