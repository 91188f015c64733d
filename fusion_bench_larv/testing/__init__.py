"""Test helpers: a tiny, fully offline CLIP suite that FusionBench's real CLI can merge and
evaluate on CPU in seconds (see :mod:`fusion_bench_larv.testing.tiny_clip`)."""

from .tiny_clip import (
    MODELPOOL_CONFIG,
    TASKPOOL_CONFIG,
    TinyClipSuite,
    build_tiny_clip_suite,
    fusion_bench_executable,
    offline_env,
    run_fusion_bench,
    zero_shot_accuracy,
)

__all__ = [
    "MODELPOOL_CONFIG",
    "TASKPOOL_CONFIG",
    "TinyClipSuite",
    "build_tiny_clip_suite",
    "fusion_bench_executable",
    "offline_env",
    "run_fusion_bench",
    "zero_shot_accuracy",
]
