"""lab/benchmarks/gpu_check.sh (issue 16: every GPU figure in one prepared run), rehearsed on the CPU:
its dry run (tiny tower, K = 2, every merger, the CUDA tests, the summary, the packed outputs) in
this environment with the install stage skipped, and its refusal to run the real check without
CUDA. The real run and its wheels: lab/benchmarks/RESULTS.md, "GPU check"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository root
SCRIPT = ROOT / "lab" / "benchmarks" / "gpu_check.sh"


def _env(tmp_path: Path, **extra: str) -> dict:
    return {
        **os.environ,
        "GPU_CHECK_SKIP_INSTALL": "1",  # CI has everything installed
        "GPU_CHECK_PYTHON": sys.executable,
        "GPU_CHECK_RESULTS": str(tmp_path / "results"),
        "HF_HUB_OFFLINE": "1",
        **extra,
    }


def test_dry_run_writes_every_output(tmp_path):
    pack = tmp_path / "pack"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--pack", str(pack)],
        cwd=ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = tmp_path / "results"
    res = json.loads((results / "cost-cpu-dryrun-tiny-k2.json").read_text())
    assert res["device"] == "cpu" and res["pool_device"] == "cpu"
    for key in ("command", "date", "torch", "python", "host", "settings", "base_overrides"):
        assert key in res, key
    assert res["base_overrides"] == {"wudi": ["method.base_method.iter_num=2"]}
    tiny = res["models"]["tiny"]
    mergers = tiny["pool_runs"][0]["mergers"]
    assert list(mergers) == ["ta", "ties", "iso_c", "iso_cts", "tsvm", "wudi"]
    assert mergers["ta"]["larv_extra_seconds_cold"] > 0  # θ_0 statistics computed in the run
    for name in ("ties", "iso_c", "iso_cts", "tsvm", "wudi"):
        x = mergers[name]
        assert x["protocol"].startswith("single pass"), name
        assert x["base_seconds"] > 0 and x["larv_extra_seconds_warm"] > 0, name  # reused
        assert x["larv_extra_seconds_randomized_warm"] > 0, name
        assert x["peak_bytes_with_larv"] >= x["peak_bytes_base"], name
    floor = tiny["floor"]
    assert floor["floor_exact_seconds"] >= floor["floor_randomized_seconds"] > 0
    # the synthetic updates spread their energy with depth: the paper's top-k entropy
    # (docs/method.md, "Exact and randomized spectra") inverts the exact ranking of e, the uniform
    # tail keeps it
    spectra = tiny["spectra"]
    assert spectra["spearman_e_uniform_tail"] > spectra["spearman_e"]
    md = (results / "cost-cpu-dryrun-tiny-k2.md").read_text()
    assert "| WUDI (iter_num=2, single pass) |" in md and "# LARV cost benchmark (cpu)" in md
    assert "Spearman e (uniform tail)" in md
    # the CUDA tests ran (skipped without a GPU), and the summary says so
    junit = (results / "cuda-tests-cpu-dryrun.xml").read_text()
    assert "test_cpu_and_cuda_give_the_same_scales" in junit
    summary = (results / "gpu-check-summary-cpu-dryrun.md").read_text()
    skipped = "2 skipped" if not torch.cuda.is_available() else "2 passed"
    assert skipped in summary and "| TSV-M (single pass) |" in summary
    assert "# GPU check: summary" in proc.stdout
    # what the device tool would bring back: one tarball, the summary, the log
    assert sorted(p.name for p in pack.iterdir()) == [
        "gpu-check-cpu-dryrun.log",
        "gpu-check-results.tar.gz",
        "gpu-check-summary-cpu-dryrun.md",
    ]
    with tarfile.open(pack / "gpu-check-results.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"cost-cpu-dryrun-tiny-k2.json", "cost-cpu-dryrun-tiny-k2.md"} <= names
    assert not (ROOT / "lab" / "benchmarks" / "results" / "cost-cpu-dryrun-tiny-k2.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_real_mode_refuses_without_cuda(tmp_path):
    proc = subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=ROOT,
        env=_env(tmp_path, GPU_CHECK_SMOKE="0"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 5, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "torch.cuda.is_available() is False" in proc.stdout
    assert not list((tmp_path / "results").glob("cost-cuda-*"))
