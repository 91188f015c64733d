#!/usr/bin/env bash
# Every GPU figure in one prepared run (issue 16): the CUDA tests, then the cost benchmark grid,
# on the GPU machine, with nothing to install by hand and no registry (wheels travel with the tree).
#
#   bash lab/benchmarks/gpu_check.sh [--dry-run] [--pack DIR]
#
# Stages, each under `timeout`, the whole within GPU_CHECK_BUDGET_S (default 420 s):
#   1. install: what `import fusion_bench` and this plugin need and the machine lacks, from the
#      wheels in GPU_CHECK_WHEELS (default lab/benchmarks/wheels, made by lab/scripts/gather_gpu_wheels.sh),
#      --no-index --no-deps into a --target folder first on PYTHONPATH (the machine's torch,
#      transformers, pytest, scipy... stay as they are), and this repository on PYTHONPATH. If the
#      plugin does not import with the machine's transformers, the carried transformers 4.57 /
#      huggingface-hub 0.36 / tokenizers 0.22 go into that folder too (shadowing it), and again.
#   2. the CUDA tests (CUDA equals CPU within the stated tolerances, exact and randomized spectra).
#   3. the cost benchmark, most important first, so that a time limit loses the least:
#      ViT-L/14 K=8, then ViT-B/32 K=8 (TA, TIES, Iso-C, Iso-CTS, TSV-M, WUDI with a reduced
#      iter_num, reported as such; exact and randomized spectra; cold and warm θ_0 statistics),
#      then K = 14 and 20 (TA and TIES). Each JSON/MD is rewritten after every merger.
#   4. a summary (printed, and written as gpu-check-summary-<prefix>.md).
# Outputs go to GPU_CHECK_RESULTS (default lab/benchmarks/results): cost-cuda-*.{json,md}, the tests'
# JUnit XML, the log. --pack DIR also puts them, as one gpu-check-results.tar.gz, plus the summary
# and the log, into DIR (the device tool returns at most 8 files from $OUT).
#
# --dry-run (or GPU_CHECK_DRY_RUN=1): CPU, the tiny tower, K=2, seconds; the CUDA tests then skip.
# GPU_CHECK_SKIP_INSTALL=1: use the current python3 (GPU_CHECK_PYTHON) as it is (CI, rehearsals).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"  # the repository root
cd "$ROOT"

DRY="${GPU_CHECK_DRY_RUN:-0}"
PACK=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --pack) PACK="$2"; shift ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

START=$SECONDS
BUDGET="${GPU_CHECK_BUDGET_S:-420}"
PY="${GPU_CHECK_PYTHON:-python3}"
WHEELS="${GPU_CHECK_WHEELS:-$ROOT/lab/benchmarks/wheels}"
RESULTS="${GPU_CHECK_RESULTS:-$ROOT/lab/benchmarks/results}"
WUDI_ITERS="${GPU_CHECK_WUDI_ITERS:-50}"
if [[ "$DRY" == 1 ]]; then PREFIX="cpu-dryrun"; DEVICE=cpu; else PREFIX="cuda"; DEVICE=cuda; fi
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu-check-$PREFIX.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

say() { echo "[gpu_check +$((SECONDS - START))s] $*"; }
left() { echo $((BUDGET - (SECONDS - START))); }
# seconds for a stage: its cap, or what is left of the budget minus a reserve for later stages
stage_s() {
  local cap=$1 reserve=${2:-0} l
  l=$(($(left) - reserve))
  ((l < cap)) && cap=$l
  echo "$cap"
}
STATUS=0
note_fail() { say "FAILED: $*"; STATUS=1; }

pack() {
  [[ -n "$PACK" ]] || return 0
  mkdir -p "$PACK"
  (cd "$RESULTS" && tar czf "$PACK/gpu-check-results.tar.gz" \
    $(ls cost-"$PREFIX"-*.json cost-"$PREFIX"-*.md cuda-tests-"$PREFIX".xml \
      gpu-check-*"$PREFIX"*.md "gpu-check-$PREFIX.log" 2>/dev/null)) || true
  cp -f "$RESULTS/gpu-check-summary-$PREFIX.md" "$PACK/" 2>/dev/null || true
  cp -f "$LOG" "$PACK/" 2>/dev/null || true
}
trap pack EXIT

say "mode: $([[ $DRY == 1 ]] && echo "dry run (CPU, tiny)" || echo "GPU") budget ${BUDGET}s results $RESULTS"

# -- 1. install -----------------------------------------------------------------------------------
# wheel file prefixes (lab/scripts/gather_gpu_wheels.sh fetches them)
CORE_WHL=(fusion_bench hydra_core omegaconf antlr4_python3_runtime bidict dill multiprocess datasets)
FALLBACK_WHL=(transformers huggingface_hub tokenizers)
SMOKE='import torch, transformers, fusion_bench, fusion_bench_larv.adapter.algorithm
from larv_lab.reproduce.registry import base_method_config
from hydra.utils import instantiate
for m in ("ta", "ties", "iso_c", "iso_cts", "tsvm", "wudi"):
    instantiate(base_method_config(m), _recursive_=False)
print("smoke: torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers",
      transformers.__version__, "fusion_bench ok")'

VPY="$PY"
SITE="${GPU_CHECK_SITE:-/tmp/gpu-check-site}"
# whl FILE-PREFIX...: the wheel of each package in $WHEELS (one version of each there)
whl() { local n f; for n in "$@"; do f=$(ls "$WHEELS"/"$n"-[0-9]*.whl | head -1); echo "$f"; done; }
# wheels go to a --target folder put first on PYTHONPATH, not a venv: the machine's python3 is
# itself a venv (/opt/torch/.venv), and a venv made from it would not see its torch
pip_in() { timeout "$(stage_s 120 240)" "$VPY" -m pip install -q --no-index --no-deps \
  --no-compile --no-cache-dir --upgrade --target "$SITE" $(whl "$@"); }
if [[ "${GPU_CHECK_SKIP_INSTALL:-0}" == 1 ]]; then
  say "install skipped (GPU_CHECK_SKIP_INSTALL=1): $VPY as it is"
else
  [[ -d "$WHEELS" ]] || { say "no wheel folder $WHEELS: run lab/scripts/gather_gpu_wheels.sh here and carry it"; exit 3; }
  say "install: ${CORE_WHL[*]} from $WHEELS into $SITE; this repository on PYTHONPATH"
  rm -rf "$SITE"
  pip_in "${CORE_WHL[@]}"
  export PYTHONPATH="$SITE:$ROOT:$ROOT/lab${PYTHONPATH:+:$PYTHONPATH}"
fi
# the import check (skipped with the install unless GPU_CHECK_SMOKE=1: CI's env is known good)
if [[ "${GPU_CHECK_SKIP_INSTALL:-0}" == 1 && "${GPU_CHECK_SMOKE:-0}" != 1 ]]; then
  :
elif ! timeout "$(stage_s 90 200)" "$VPY" -c "$SMOKE"; then
  [[ "${GPU_CHECK_SKIP_INSTALL:-0}" == 1 ]] && { say "the plugin does not import"; exit 4; }
  say "the plugin does not import with this transformers: installing the carried ${FALLBACK_WHL[*]}"
  pip_in "${FALLBACK_WHL[@]}"
  timeout "$(stage_s 90 200)" "$VPY" -c "$SMOKE" || { say "the plugin still does not import"; exit 4; }
fi
"$VPY" -m pip list 2>/dev/null | grep -iE '^(torch|transformers|huggingface.hub|tokenizers|fusion.bench|hydra-core|omegaconf|datasets|pytest) ' || true
if [[ "$DRY" != 1 ]] && ! "$VPY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  say "torch.cuda.is_available() is False: this is the GPU check (use --dry-run on a CPU)"
  exit 5
fi
"$VPY" -c 'import torch; print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "| torch", torch.__version__, "cuda", torch.version.cuda)'

# -- 2. the CUDA tests ----------------------------------------------------------------------------
JUNIT="$RESULTS/cuda-tests-$PREFIX.xml"
t=$(stage_s 120 200)
say "CUDA tests, ${t}s"
# -o addopts="": pyproject.toml's addopts start pytest-xdist workers, which this one test neither
# needs nor finds on the GPU machine
timeout "$t" "$VPY" -m pytest -o addopts="" --import-mode=importlib -p no:cacheprovider -q -rA \
  "tests/test_inputs.py::test_cpu_and_cuda_give_the_same_scales" --junitxml="$JUNIT" \
  || note_fail "CUDA tests (rc $?)"
if [[ "$DRY" != 1 ]] && [[ -f "$JUNIT" ]] && grep -q '<skipped' "$JUNIT"; then
  note_fail "a CUDA test was skipped on the GPU machine"
fi

# -- 3. the cost benchmark grid, most important first ---------------------------------------------
BENCH=("$VPY" -m larv_lab.bench_cost --device "$DEVICE" --out "$RESULTS")
HEAVY=(ties iso_c iso_cts tsvm wudi)
ALL=(ta ties iso_c iso_cts tsvm wudi)
bench() {  # bench TAG CAP RESERVE ARGS...
  local tag=$1 cap=$2 reserve=$3 t rc=0
  shift 3
  t=$(stage_s "$cap" "$reserve")
  if ((t < 20)); then say "skipped $tag: ${t}s left"; return 0; fi
  say "bench $tag, ${t}s: $*"
  timeout --kill-after=10 "$t" "${BENCH[@]}" --tag "$PREFIX-$tag" "$@" || rc=$?
  if ((rc == 124 || rc == 137)); then
    say "$tag stopped at its time limit: the JSON holds the mergers finished before it"
  elif ((rc != 0)); then
    note_fail "bench $tag (rc $rc)"
  fi
}
if [[ "$DRY" == 1 ]]; then
  bench tiny-k2 120 10 --models tiny --tasks 2 --mergers "${ALL[@]}" --single-pass "${HEAVY[@]}" \
    --wudi-iter-num 2 --repeats 1 --spectra-models tiny --spearman-models tiny
else
  bench l14-k8 210 110 --models l14 --tasks 8 --mergers "${ALL[@]}" --single-pass "${HEAVY[@]}" \
    --wudi-iter-num "$WUDI_ITERS" --repeats 3 --spectra-models l14 --spearman-models l14
  bench b32-k8 100 30 --models b32 --tasks 8 --mergers "${ALL[@]}" --single-pass "${HEAVY[@]}" \
    --wudi-iter-num "$WUDI_ITERS" --repeats 3 --spectra-models b32 --spearman-models b32
  bench k14-20 200 10 --models l14 b32 --tasks 14 20 --mergers ta ties --single-pass ties \
    --ties-max-tasks 20 --repeats 2 --spectra-models none --spearman-models none
fi

# -- 4. summary -----------------------------------------------------------------------------------
shopt -s nullglob
JSONS=("$RESULTS"/cost-"$PREFIX"-*.json)
"$VPY" -m larv_lab.bench_summary "${JSONS[@]}" --junit "$JUNIT" \
  --out "$RESULTS/gpu-check-summary-$PREFIX.md" || note_fail "summary"
say "done in $((SECONDS - START))s, status $STATUS; results in $RESULTS"
exit "$STATUS"
