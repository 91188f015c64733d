"""The plugin apart from the lab: what `import fusion_bench_larv` and a `larv_*` run load, and what
the package's core dependencies are (README, "Install")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAB_ONLY = ("onnx", "onnxruntime", "sklearn", "scikit-learn")


def loaded_after(code: str) -> set[str]:
    """Top-level names of the modules a fresh interpreter holds after running ``code``."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})  # fmt: skip
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_loads_neither_the_lab_nor_its_dependencies():
    mods = loaded_after("import fusion_bench_larv")
    assert "fusion_bench_larv" in mods  # the probe itself works
    assert not {m for m in mods if m.split(".")[0] in LAB_ONLY}
    assert not {m for m in mods if m.startswith("fusion_bench_larv.lab")}


def test_a_larv_merge_does_not_import_the_lab():
    code = """
import torch
from torch import nn
from fusion_bench_larv import LARVAlgorithm

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(3))

torch.manual_seed(0)
pre = Net()
tuned = {}
for t in ("a", "b"):
    m = Net()
    m.load_state_dict({k: v + 0.1 * torch.randn_like(v) for k, v in pre.state_dict().items()})
    tuned[t] = m
alg = LARVAlgorithm(base_method={"_target_": "fusion_bench.method.TaskArithmeticAlgorithm",
                                 "scaling_factor": 0.3})
alg.run({"_pretrained_": pre, **tuned})
assert len(alg.last_result.scales) == 3
"""
    mods = loaded_after(code)
    assert "fusion_bench.method" in mods  # the merge really went through FusionBench
    assert not {m for m in mods if m.startswith("fusion_bench_larv.lab")}
    assert not {m for m in mods if m.split(".")[0] in ("onnx", "onnxruntime")}


def test_core_dependencies_leave_the_lab_to_its_extra():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {r.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip()
                for r in reqs}  # fmt: skip

    core, lab = names(project["dependencies"]), names(project["optional-dependencies"]["lab"])
    assert {"onnx", "onnxruntime", "scikit-learn"} <= lab
    assert not core & {"onnx", "onnxruntime", "scikit-learn"}
    assert "fusion-bench" in core


def test_plugin_configs_do_not_target_the_lab():
    # only the testbed's own pools point into fusion_bench_larv.lab
    for path in (REPO / "config").rglob("*.yaml"):
        if "fusion_bench_larv.lab" in path.read_text():
            assert "LarvTestbed" in path.parts, path
