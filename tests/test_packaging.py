"""The plugin apart from the lab: what `import fusion_bench_larv` and a `larv_*` run load, that its
dependencies are exactly what it imports, and that its configs never point into the lab
(tests/test_install.py builds the wheel and looks inside)."""

from __future__ import annotations

import ast
import json
import re
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
    assert not {m for m in mods if m.startswith("larv_lab")}


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
    assert not {m for m in mods if m.startswith("larv_lab")}
    assert not {m for m in mods if m.split(".")[0] in ("onnx", "onnxruntime")}


# pyproject.toml's dependencies that the plugin needs without importing them itself: constraints on
# what fusion-bench's CLIP task pool (subclassed by clip_taskpool.py) imports (transformers, pinned
# there too, larv-mergekit imports)
CONSTRAINTS = {"datasets", "huggingface-hub"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_distributions() -> set[str]:
    """The distributions whose modules the plugin's code imports (AST of every file)."""
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    top = set()
    for path in [
        *(REPO / "fusion_bench_larv").rglob("*.py"),
        *(REPO / "hydra_plugins").rglob("*.py"),
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                top |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                top.add(node.module.split(".")[0])
    top -= set(sys.stdlib_module_names) | {"fusion_bench_larv", "hydra_plugins", "__future__"}
    return {_canonical(d) for name in top for d in owners.get(name, [name])}


def test_dependencies_are_exactly_what_the_plugin_imports():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {
        _canonical(re.split(r"[<>=;\[ ]", r, maxsplit=1)[0]) for r in project["dependencies"]
    }
    assert declared - CONSTRAINTS == _imported_distributions()
    assert not declared & {"onnx", "onnxruntime", "scikit-learn", "open-clip-torch", "matplotlib"}


def test_plugin_configs_do_not_target_the_lab():
    for path in (REPO / "config").rglob("*.yaml"):
        text = path.read_text()
        assert "larv_lab" not in text and "LarvTestbed" not in text, path


# -- structure: no import circle, the maths without FusionBench -----------------------------------
def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """module → the modules of the same package it imports (at any depth of the file: a
    function-local import counts), read from the source with ``ast``. ``from . import x`` names
    the module ``x`` when it is one; an import of a package points at its ``__init__``, except
    from a module inside it (that is Python's own loading order, not a dependency)."""
    root = package_dir.parent
    files = {_module_name(p, root): p for p in package_dir.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                           for a in node.names]  # fmt: skip
            for t in targets:
                if t in files and t != mod and not mod.startswith(t + "."):
                    graph[mod].add(t)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v), on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_circle_finder_finds_a_circle(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "c.py").write_text("from pkg import a\n")
    assert circles(import_graph(pkg)) == [["pkg.a", "pkg.b"]]


@pytest.mark.parametrize("package", ["fusion_bench_larv", "lab/larv_lab"])
def test_no_import_circle(package):
    graph = import_graph(REPO / package)
    assert len(graph) > 10  # the walk found the modules
    assert circles(graph) == []


def test_core_imports_nothing_of_fusion_bench_or_the_other_rooms():
    for path in (REPO / "fusion_bench_larv" / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                name = "." * node.level + (node.module or "")
            elif isinstance(node, ast.Import):
                name = ",".join(a.name for a in node.names)
            else:
                continue
            assert "fusion_bench" not in name.replace("fusion_bench_larv", ""), (path, name)
            assert not re.match(r"\.\.(adapter|methods|evaluation)", name), (path, name)
