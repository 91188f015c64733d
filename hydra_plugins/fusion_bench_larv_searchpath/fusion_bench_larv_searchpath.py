"""Hydra search-path plugin: makes `method=larv_*` (and the suite configs) visible to the
`fusion_bench` CLI right after `pip install`, with no extra flag.

Hydra finds this module by scanning the `hydra_plugins` namespace package (pkgutil over its
`__path__`); pyproject.toml lists that namespace so that every install mode, setuptools' default
editable finder included, leaves this folder on it (tests/test_install.py).

We *append* (never prepend) so FusionBench's own configs win on any name clash. We also append
FusionBench's own config folder: when the working directory has a `config/` folder (e.g. this
repository's root), FusionBench makes that folder its primary config path, and the primary config
`fabric_model_fusion` must still be found.
"""

import importlib.util
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


def _package_dir(name: str) -> Path | None:
    """The folder of an importable package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        if Path(location).is_dir():
            return Path(location)
    return None


def larv_config_path() -> str:
    """`pkg://fusion_bench_larv_config` when that package is importable (a regular, wheel or
    default editable install); in an `editable_mode=compat` install, where it is not, the
    repository's `config/` folder."""
    if _package_dir("fusion_bench_larv_config") is not None:
        return "pkg://fusion_bench_larv_config"
    spec = importlib.util.find_spec("fusion_bench_larv")
    root = Path(spec.origin).resolve().parent.parent if spec and spec.origin else None
    if root is not None and (root / "config" / "method").is_dir():
        return f"file://{root / 'config'}"
    return "pkg://fusion_bench_larv_config"


def fusion_bench_config_path() -> str:
    """FusionBench's config folder as a `file://` path: FusionBench 0.2.33 ships
    `fusion_bench_config` without an `__init__.py`, which Hydra reports as "not available" under
    `pkg://` (it still reads it, but warns on every run with a `hydra.searchpath`)."""
    folder = _package_dir("fusion_bench_config")
    return f"file://{folder}" if folder is not None else "pkg://fusion_bench_config"


class FusionBenchLarvSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="fusion-bench-larv", path=larv_config_path())
        search_path.append(provider="fusion-bench-larv", path=fusion_bench_config_path())
