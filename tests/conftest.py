"""Shared fixtures. Every test runs offline: nothing may reach a model or data set hub."""

from __future__ import annotations

import os

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip_suite(tmp_path_factory):
    """The tiny offline CLIP suite (real CLIPModel, local data sets, fine-tuned towers)."""
    from fusion_bench_larv.lab.tiny_clip import build_tiny_clip_suite

    return build_tiny_clip_suite(tmp_path_factory.mktemp("tiny_clip_suite"))


@pytest.fixture(scope="session")
def ci_testbed(tmp_path_factory):
    """The real-weights testbed on its tiny ``ci`` recipe, built once per session into a temporary
    cache (skips, saying what is missing, without the sources)."""
    from fusion_bench_larv.lab.testbed import build_testbed, missing_requirements

    reason = missing_requirements()
    if reason:
        pytest.skip(f"testbed sources missing (run scripts/install_testbed_sources.sh): {reason}")

    cache = tmp_path_factory.mktemp("ci_testbed_cache")
    return build_testbed("ci", cache, progress=False)
