"""The lab of fusion-bench-larv: what the project uses to study LARV, not what a user needs to
run it. It depends on the plugin; the plugin never imports it.

- :mod:`.reproduce`: the paper's experiments and the benchmark, one command each;
- :mod:`.testbed`: the real-weights, offline model-merging testbeds (build, sources, pools) and
  :mod:`.testbed.tiny_clip`, a tiny, fully offline CLIP suite that FusionBench's CLI merges in
  seconds;
- :mod:`.demo`: the main job (README, "Quick start"): merge with and without LARV, compare;
- :mod:`.bench_cost`: LARV's cost on real-size towers with synthetic task vectors.

Its configs (``larv_lab/config``: the merger registry, the regime targets, the testbed's pools)
reach the ``fusion_bench`` CLI through its own Hydra search-path plugin.
"""

from pathlib import Path


def config_dir() -> Path:
    """The lab's config tree (``larv_lab/config``): the merger registry, the regime targets and
    the testbed's pools. Its Hydra search-path plugin and the harness's registry both read it
    from here."""
    return Path(__file__).resolve().parent / "config"
