"""The lab's tests: shared fixtures, each built once per session. Every test runs offline:
nothing may reach a model or data set hub."""

from __future__ import annotations

import os

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip_suite(tmp_path_factory):
    """The tiny offline CLIP suite (real CLIPModel, local data sets, fine-tuned towers)."""
    from larv_lab.testbed.tiny_clip import build_tiny_clip_suite

    return build_tiny_clip_suite(tmp_path_factory.mktemp("tiny_clip_suite"))


@pytest.fixture(scope="session")
def ci_testbed_cache(tmp_path_factory):
    """The one testbed cache of the session: every test that needs the ``ci`` recipe's build
    reads it from here, so it is built once (skips, saying what is missing, without the
    sources)."""
    from larv_lab.testbed import missing_requirements

    reason = missing_requirements()
    if reason:
        pytest.skip(
            f"testbed sources missing (run lab/scripts/install_testbed_sources.sh): {reason}"
        )
    return tmp_path_factory.mktemp("ci_testbed_cache")


@pytest.fixture(scope="session")
def ci_testbed(ci_testbed_cache):
    """The real-weights testbed on its tiny ``ci`` recipe, built once per session."""
    from larv_lab.testbed import build_testbed

    return build_testbed("ci", ci_testbed_cache, progress=False)
