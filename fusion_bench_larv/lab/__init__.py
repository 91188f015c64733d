"""The lab: what the project uses to study LARV, not what a user needs to run it.

Install with ``pip install "fusion-bench-larv[lab]"``. Nothing in the plugin imports this package.

- :mod:`.testbed`: the real-weights, offline model-merging testbed (build, sources, pools);
- :mod:`.tiny_clip`: a tiny, fully offline CLIP suite that FusionBench's CLI merges in seconds;
- :mod:`.demo`: the main job (README, "Quick start"): merge with and without LARV, compare;
- :mod:`.bench_cost`: LARV's cost on real-size towers with synthetic task vectors.
"""
