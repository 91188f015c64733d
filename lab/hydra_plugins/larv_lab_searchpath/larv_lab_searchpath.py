"""Hydra search-path plugin of the lab: makes the testbed's pools (``modelpool=LarvTestbed/full``,
``taskpool=LarvTestbed/full``, ...) visible to the ``fusion_bench`` CLI once the lab is
installed. Appended after the plugin's and FusionBench's trees, so neither is shadowed."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class LarvLabSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        try:  # larv_lab's __init__ imports nothing heavy
            from larv_lab import config_dir
        except ImportError:  # a plugin file left behind by an uninstalled lab
            return
        search_path.append(provider="fusion-bench-larv-lab", path=f"file://{config_dir()}")
