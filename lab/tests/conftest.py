"""The lab's tests: shared fixtures, each built once per session. Every test runs offline:
nothing may reach a model or data set hub."""

from __future__ import annotations

import os

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

import pytest  # noqa: E402


def shared_dir(tmp_path_factory, name: str):
    """A folder every pytest-xdist worker of this run sees (one per run without xdist), and a
    lock for building into it: a session fixture is then built once per run, not per worker."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    return root / name, FileLock(str(root / f"{name}.lock"))


@pytest.fixture(scope="session")
def tiny_clip_suite(tmp_path_factory):
    """The tiny offline CLIP suite (real CLIPModel, local data sets, fine-tuned towers); built
    once per run and reused (``build_tiny_clip_suite`` reuses a complete build in its folder)."""
    from larv_lab.testbed.tiny_clip import build_tiny_clip_suite

    folder, lock = shared_dir(tmp_path_factory, "tiny_clip_suite")
    with lock:
        return build_tiny_clip_suite(folder)


@pytest.fixture(scope="session")
def ta_cli_run(tiny_clip_suite, tmp_path_factory):
    """Task Arithmetic through the real ``fusion_bench`` CLI on the tiny CLIP suite, run once per
    test run (each CLI start costs seconds): (its log dir, the program's report); the merged model
    is saved in ``log_dir / "merged"`` and the log dir was the working directory."""
    import json

    from larv_lab.testbed.tiny_clip import run_fusion_bench

    log_dir, lock = shared_dir(tmp_path_factory, "ta_cli_run")
    report = log_dir / "program_report.json"
    with lock:
        if not report.is_file():
            args = [*tiny_clip_suite.cli_args(), "method=task_arithmetic",
                    f"merged_model_save_path={log_dir / 'merged'}"]  # fmt: skip
            run_fusion_bench(args, cwd=log_dir, log_dir=log_dir)
    return log_dir, json.loads(report.read_text())


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
    folder, _ = shared_dir(tmp_path_factory, "ci_testbed_cache")
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def ci_testbed(ci_testbed_cache, tmp_path_factory):
    """The real-weights testbed on its tiny ``ci`` recipe, built once per run (a complete build
    in the cache is reused)."""
    from larv_lab.testbed import build_testbed

    _, lock = shared_dir(tmp_path_factory, "ci_testbed_cache")
    with lock:
        return build_testbed("ci", ci_testbed_cache, progress=False)
