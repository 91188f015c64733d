"""Hydra search-path plugin: makes `method=larv_*` (and the suite configs) visible to the
`fusion_bench` CLI right after `pip install`, with no extra flag.

We *append* (never prepend) so FusionBench's own configs win on any name clash. We also append
FusionBench's own config package: when the working directory has a `config/` folder (e.g. this
repository's root), FusionBench makes that folder its primary config path, and the primary config
`fabric_model_fusion` must still be found.
"""

import importlib.util
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


def larv_config_path() -> str:
    """`pkg://fusion_bench_larv_config` when installed; in an editable (compat) install, where
    that package is not importable, the repository's `config/` folder."""
    if importlib.util.find_spec("fusion_bench_larv_config") is not None:
        return "pkg://fusion_bench_larv_config"
    spec = importlib.util.find_spec("fusion_bench_larv")
    root = Path(spec.origin).resolve().parent.parent if spec and spec.origin else None
    if root is not None and (root / "config" / "method").is_dir():
        return f"file://{root / 'config'}"
    return "pkg://fusion_bench_larv_config"


class FusionBenchLarvSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="fusion-bench-larv", path=larv_config_path())
        search_path.append(provider="fusion-bench-larv", path="pkg://fusion_bench_config")
