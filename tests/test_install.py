"""Installs that just work (README, "Install"): after ``pip install -e .`` (setuptools' default
editable mode), ``pip install .`` or a built wheel, ``fusion_bench`` finds ``method=larv_*`` from
any directory.

Hydra finds the search-path plugin by ``pkgutil.walk_packages`` over ``hydra_plugins.__path__``
(a PEP 420 namespace package shared by all Hydra plugins). Each install mode must leave a real
folder holding ``fusion_bench_larv_searchpath`` on that path:

- regular install and wheel: ``site-packages/hydra_plugins/fusion_bench_larv_searchpath``;
- default editable install: setuptools writes a finder (not a ``.pth`` to the project root,
  because ``config/`` is remapped to ``fusion_bench_larv_config``). The finder puts the project's
  ``hydra_plugins/`` folder on the namespace path only because pyproject.toml lists
  ``hydra_plugins`` itself as a package; otherwise it offers a placeholder path entry that pkgutil
  cannot list and the plugin is never loaded (``Could not find 'method/larv_ta'``);
- ``editable_mode=compat``: a ``.pth`` puts the project root on ``sys.path``.

The slow tests install a copy of the project (``--no-deps``, offline, no build isolation) into a
throwaway venv of the same base interpreter that sees this environment's dependencies but not
this environment's own install of the project, then run the real ``fusion_bench`` console script
from an unrelated directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT = ("pyproject.toml", "README.md", "fusion_bench_larv", "config", "hydra_plugins")
PLUGIN = "fusion_bench_larv_searchpath"
COMPOSE = [
    "--cfg", "job", "method=larv_ta",
    "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8",
    "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
]  # fmt: skip
# `pip install .` (a regular install) builds this same wheel and installs it: the wheel mode covers
# it. Where the plugin's config tree must come from, per install mode ("{proj}": the copy installed
# in editable mode; "{site}": the throwaway venv's site-packages)
MODES = {
    "editable": (["-e", "{proj}"], "{proj}/config"),
    "editable-compat": (["-e", "{proj}", "--config-settings", "editable_mode=compat"],
                        "{proj}/config"),
    "wheel": (["{wheel}"], "{site}/fusion_bench_larv_config"),
}  # fmt: skip
PROBE = """
import importlib.util, json, pkgutil
import hydra_plugins
from fusion_bench_larv.config_paths import larv_config_dir
print(json.dumps({"scanned": [m.name for m in pkgutil.iter_modules(hydra_plugins.__path__)],
                  "config": str(larv_config_dir())}))
"""


def _setuptools() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_parent_package_is_listed():
    """A listed package whose parent is not listed is a "virtual namespace" to setuptools'
    editable finder, which then hides it from pkgutil (and ``hydra_plugins`` from Hydra)."""
    packages = set(_setuptools()["packages"])
    assert "hydra_plugins" in packages and f"hydra_plugins.{PLUGIN}" in packages
    for pkg in packages:
        parent = pkg.rpartition(".")[0]
        assert not parent or parent in packages, f"{pkg}: list {parent} too"


def test_hydra_plugins_stays_a_namespace_package():
    # an __init__.py here would shadow every other Hydra plugin (joblib, submitit launchers)
    assert not (REPO / "hydra_plugins" / "__init__.py").exists()
    assert (REPO / "hydra_plugins" / PLUGIN / "__init__.py").is_file()


# ------------------------------------------------------------------------------------------------
# each install mode, end to end
# ------------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(cmd: list, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def dependencies(tmp_path_factory) -> Path:
    """This environment's site-packages without this project: one link per entry (and per
    other Hydra plugin), leaving out the project's own packages, metadata and ``.pth`` files."""
    import setuptools

    major = int(setuptools.__version__.split(".")[0])
    assert major >= 68, "the install tests build with this environment's setuptools (>= 68)"
    site = Path(sysconfig.get_paths()["purelib"])
    view = tmp_path_factory.mktemp("dependencies")
    own = ("fusion_bench_larv", "__editable__", "__editable___fusion_bench_larv")
    for entry in site.iterdir():
        if entry.name.startswith(own) or entry.suffix == ".pth":
            continue
        if entry.name == "hydra_plugins":
            (view / entry.name).mkdir()
            for sub in entry.iterdir():
                if sub.name != PLUGIN:
                    (view / entry.name / sub.name).symlink_to(sub)
            continue
        (view / entry.name).symlink_to(entry)
    return view


def _project_copy(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    dest.mkdir()
    for name in PROJECT:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    return dest


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_install_mode_gives_a_working_plugin(mode, dependencies, tmp_path):
    proj = _project_copy(tmp_path / "project")
    elsewhere = tmp_path / "elsewhere"  # unrelated working directory, no config/ folder
    elsewhere.mkdir()
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    python = venv / "bin" / "python"
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                tmp_path).stdout.strip()  # fmt: skip
    # this environment's dependencies, as a site dir after the venv's own
    Path(site, "_dependencies.pth").write_text(
        f"import site; site.addsitedir({str(dependencies)!r})\n"
    )
    pip = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation"]
    args, want_config = MODES[mode]
    wheel = ""
    if mode == "wheel":
        dist = tmp_path / "dist"
        _run([python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
              "--no-build-isolation", "-w", dist, proj], tmp_path)  # fmt: skip
        (whl,) = dist.glob("fusion_bench_larv-*.whl")
        wheel = str(whl)
    _run([*pip, *(a.format(proj=proj, wheel=wheel) for a in args)], tmp_path)

    # the mechanism: Hydra's scan lists the plugin, whose config tree is the one just installed
    probe = json.loads(_run([python, "-c", PROBE], elsewhere).stdout.strip().splitlines()[-1])
    assert PLUGIN in probe["scanned"], probe
    want = Path(want_config.format(proj=proj, site=site)).resolve()
    assert Path(probe["config"]).resolve() == want
    assert (want / "method" / "larv_ta.yaml").is_file()

    # the CLI, from an unrelated directory (the probe above has shown where the configs come
    # from); the default editable mode is this environment's own, whose CLI tests/test_configs.py
    # runs from the repo root and from elsewhere
    if mode == "editable":
        return
    fusion_bench = Path(sys.executable).parent / "fusion_bench"  # FusionBench's console script
    assert fusion_bench.is_file(), f"no fusion_bench script next to {sys.executable}"
    out = _run([python, fusion_bench, *COMPOSE], elsewhere).stdout
    cfg = yaml.safe_load(out)
    assert cfg["method"]["_target_"] == "fusion_bench_larv.LARVAlgorithm"
    assert cfg["method"]["base_method"]["_target_"] == "fusion_bench.method.TaskArithmeticAlgorithm"
    assert "clip-vit-base-patch32" in str(cfg["modelpool"])


@pytest.mark.slow
def test_the_wheel_holds_the_plugin_and_nothing_of_the_lab(tmp_path):
    """The root project's wheel: the plugin, its config tree and its search-path plugin; no lab,
    harness or testbed module and no lab config. Its build prints no setuptools warning."""
    proj = _project_copy(tmp_path / "project")
    dist = tmp_path / "dist"
    proc = _run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-index",
                 "--no-build-isolation", "-w", dist, proj], tmp_path)  # fmt: skip
    (whl,) = dist.glob("fusion_bench_larv-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"fusion_bench_larv", "fusion_bench_larv_config", "hydra_plugins",
                    whl.name.split("-py")[0] + ".dist-info"}, tops  # fmt: skip
    lab_words = ("larv_lab", "reproduce", "testbed", "tiny_clip", "demo", "bench_cost",
                 "paper_anchors", "LarvTestbed", "mergers.yaml", "regime.yaml")  # fmt: skip
    assert not [n for n in names if any(w in n for w in lab_words)]
    assert "fusion_bench_larv_config/method/larv_ta.yaml" in names
    assert "hydra_plugins/fusion_bench_larv_searchpath/fusion_bench_larv_searchpath.py" in names
    log = proc.stdout + proc.stderr
    assert "SetuptoolsDeprecationWarning" not in log and "absent from the `packages`" not in log
