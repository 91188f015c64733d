"""mergekit 0.1.4 itself applies the config ``larv-mergekit`` writes (docs/mergekit.md): on tiny
random Llamas, ``mergekit-yaml`` gives θ_0 + s_ℓ·Δθ for every tensor, with Δθ the base merge's
update, for ``task_arithmetic`` and for ``ties`` (whose update the export computes as mergekit
does, per-tensor trim included: checked here against mergekit's own TIES merge).

Opt-in (``LARV_MERGEKIT=1``): mergekit is installed into a venv of its own (0.1.5 needs
transformers 5), which takes about 40 s the first time, more than CI's budget for one test; the
venv is cached under ``~/.cache/fusion-bench-larv/`` and later runs reuse it (about 90 s for the
four mergekit runs here, each mostly imports)::

    LARV_MERGEKIT=1 .venv/bin/python -m pytest -q -n 0 lab/tests/test_mergekit_e2e.py
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_llama import save_tiny_llamas

from fusion_bench_larv.core.settings import LarvSettings
from fusion_bench_larv.export.mergekit import export, render_yaml

MERGEKIT = "mergekit==0.1.4"

pytestmark = pytest.mark.skipif(
    os.environ.get("LARV_MERGEKIT") != "1",
    reason="installs mergekit into a cached venv (about 40 s the first time); set LARV_MERGEKIT=1",
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")  # fmt: skip
    return env


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], env=_env(), capture_output=True, text=True,
                          timeout=900, **kw)  # fmt: skip
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="session")
def mergekit_python() -> Path:
    """The Python of a venv holding mergekit 0.1.4 that reuses this environment's torch and
    transformers: a ``.pth`` line puts this environment's site-packages after the venv's own, so
    pip installs only what mergekit pins differently or what is missing here (accelerate 1.6,
    safetensors 0.5, pydantic 2.10, click, immutables, sentencepiece, tqdm 4.67), and those
    shadow this environment's copies inside that venv alone. Cached under
    ``~/.cache/fusion-bench-larv/``, one venv per site-packages path and Python version; the
    stamp file marks a finished install."""
    from filelock import FileLock

    site = sysconfig.get_paths()["purelib"]
    key = hashlib.sha256(f"{site}|{sys.version}|{MERGEKIT}".encode()).hexdigest()[:10]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fusion-bench-larv"
    venv = cache / f"mergekit-0.1.4-{key}"
    python, stamp = venv / "bin" / "python", venv / "installed"
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f"{venv.name}.lock")):
        if not stamp.is_file():
            subprocess.run(["rm", "-rf", str(venv)], check=True)
            _run([sys.executable, "-m", "venv", venv])
            own = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
            Path(own.stdout.strip(), "_larv_project.pth").write_text(site + "\n")
            _run([python, "-m", "pip", "install", "-q", MERGEKIT])
            stamp.write_text(MERGEKIT + "\n")
    return python


def run_mergekit(python: Path, config: dict, result, out: Path) -> dict[str, torch.Tensor]:
    """``mergekit-yaml`` on the config as ``larv-mergekit`` writes it; the merged weights."""
    path = out.with_suffix(".yaml")
    path.write_text(render_yaml(config, result))
    _run([python, "-m", "mergekit.scripts.run_yaml", path, out, "--no-copy-tokenizer"])
    return load_file(out / "model.safetensors")


def expected(base: Path, merged: dict, param_scale: dict) -> dict[str, torch.Tensor]:
    """θ_0 + s·Δθ for every tensor the base model's file holds, in float32."""
    theta0 = load_file(base / "model.safetensors")
    return {k: t.float() + param_scale[k] * (merged[k] - t.float()) for k, t in theta0.items()}


def assert_matches(out: dict, want: dict, merged: dict, dtype: torch.dtype) -> None:
    assert set(out) == set(want)
    rtol = 1e-6 if dtype == torch.float32 else 2.0**-7  # float32 rounding, or one bfloat16 ulp
    moved = 0.0
    for k, w in want.items():
        assert out[k].dtype == dtype, k
        torch.testing.assert_close(out[k].float(), w.to(dtype).float(), rtol=rtol, atol=rtol * 1e-2)
        moved = max(moved, (w - merged[k]).abs().max().item())
    # LARV moves the base merge by far more than the tolerance: unit scales would fail above
    assert moved > 1e-3


@pytest.mark.parametrize(
    ("tied", "dtype"), [(False, torch.float32), (True, torch.bfloat16)], ids=["f32", "tied-bf16"]
)
def test_mergekit_task_arithmetic_gives_larv(mergekit_python, tmp_path, tied, dtype):
    base, models = save_tiny_llamas(tmp_path / "models", tied=tied, dtype=dtype)
    config, result, merged = export(base, models, "task_arithmetic", weights=[0.3])
    assert len(set(result.scales)) > 1
    assert config.get("out_dtype") == (None if dtype == torch.float32 else "bfloat16")
    out = run_mergekit(mergekit_python, config, result, tmp_path / "larv")
    assert_matches(out, expected(base, merged, result.param_scale), merged, dtype)


def test_mergekit_ties_gives_larv_on_its_own_update(mergekit_python, tmp_path):
    base, models = save_tiny_llamas(tmp_path / "models")
    settings = LarvSettings(gate="continuous")  # scales off the tiers: any λ_ℓ slip shows
    config, result, merged = export(base, models, "ties", density=0.5, settings=settings)
    # the export's TIES update is mergekit's: mergekit's own TIES (lambda 1) equals the base merge
    plain = {**config, "parameters": {**config["parameters"], "lambda": 1.0}}
    out = run_mergekit(mergekit_python, plain, result, tmp_path / "ties")
    assert set(out) == set(load_file(base / "model.safetensors"))
    for k, t in out.items():
        assert torch.equal(t, merged[k]), k
    out = run_mergekit(mergekit_python, config, result, tmp_path / "larv")
    assert_matches(out, expected(base, merged, result.param_scale), merged, torch.float32)
