#!/usr/bin/env bash
# Gathers, on THIS machine, the wheels that lab/benchmarks/gpu_check.sh installs on the GPU machine
# (Python 3.12, x86-64, no registry there): what `import fusion_bench` and this plugin need and
# that machine's image lacks, at the versions this project's .venv runs, plus a fallback
# transformers 4.57 / huggingface-hub 0.36 / tokenizers 0.22 in case the plugin does not import
# with the machine's transformers 5. Torch, numpy, lightning, pytest ... come from the machine.
#
#   bash lab/scripts/gather_gpu_wheels.sh [DIR]        # default lab/benchmarks/wheels (git-ignored)
#
# The device tool's `run` then takes DIR in `carry` (see lab/benchmarks/RESULTS.md, "GPU check",
# and docs/cost.md).
# GATHER_PY_VERSION=3.11 gathers for another Python (the CPU rehearsal of the install stage).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"  # the repository root
cd "$ROOT"
DIR="${1:-lab/benchmarks/wheels}"
PY="${GATHER_PYTHON:-$ROOT/.venv/bin/python}"
# the GPU machine lacks these (KINDS.md's package list; the import closure of fusion_bench,
# fusion_bench_larv.adapter.algorithm and lab.bench_cost as measured in .venv)
CORE=(fusion-bench hydra-core omegaconf antlr4-python3-runtime bidict dill multiprocess datasets)
FALLBACK=(transformers huggingface-hub tokenizers)
rm -rf "$DIR"
mkdir -p "$DIR"
PLAT=(--only-binary=:all: --no-deps --python-version "${GATHER_PY_VERSION:-3.12}" --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for name in "${CORE[@]}" "${FALLBACK[@]}"; do
  ver=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  if [[ "$name" == antlr4-python3-runtime ]]; then
    # published as an sdist only: build its (pure Python) wheel here
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "$name==$ver"
  else
    "$PY" -m pip download -q "${PLAT[@]}" -d "$DIR" "$name==$ver"
  fi
  echo "  $name==$ver"
done
ls -la "$DIR"
wheels=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
tree=$(git archive HEAD | wc -c)
untracked=$(git ls-files -z --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "wheels: $((wheels / 1024)) KiB; tracked tree (git archive HEAD): $((tree / 1024)) KiB;" \
  "untracked, not ignored: $((${untracked:-0} / 1024)) KiB;" \
  "total $(((wheels + tree + ${untracked:-0}) / 1048576)) MiB of the 64 MiB that may travel"
