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

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from fusion_bench_larv.config_paths import fusion_bench_config_dir, larv_config_dir


class FusionBenchLarvSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="fusion-bench-larv", path=f"file://{larv_config_dir()}")
        fb = fusion_bench_config_dir()
        fb_path = f"file://{fb}" if fb is not None else "pkg://fusion_bench_config"
        search_path.append(provider="fusion-bench-larv", path=fb_path)
