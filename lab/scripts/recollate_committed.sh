#!/usr/bin/env bash
# Re-collate every committed results folder from its committed cells (nothing is merged; ~40 s).
# The committed tables, CSVs and figures must come out byte for byte: afterwards
# `git status --short lab/results` lists nothing. The pilot folders name their candidate builds by
# the pool spec their regime card records (the builds themselves are not needed to collate).
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
PY="${PYTHON:-.venv/bin/python}"
R=("$PY" -m larv_lab.reproduce bench)
B=(ta ties iso_c iso_cts tsvm simple_average pretrained finetuned)
TEXT=(testbed:text_full testbed:text_full_seed1 testbed:text_lora testbed:text_lora_seed1)
export OMP_NUM_THREADS=1
"${R[@]}" --pools "${TEXT[@]}" --out lab/results/text_regime --merger ta ties iso_c iso_cts tsvm wudi simple_average pretrained finetuned testbed_adamerging --collate-only
"${R[@]}" --pools testbed:full testbed:full_seed1 --out lab/results/testbed_regime --merger ta ties iso_c iso_cts tsvm wudi simple_average lot pretrained finetuned testbed_adamerging --collate-only
"${R[@]}" --pools testbed:decoder_full testbed:decoder_full_seed1 --out lab/results/decoder_regime --merger "${B[@]}" ties_streamed iso_cts_retry --variant base --collate-only
"${R[@]}" --pools testbed:full --out lab/results/ceiling_rebuild --merger "${B[@]}" testbed_adamerging --variant base sched-linear larv-tiered 'fitted-scales-val*' lines-val signed-ramp-val larv-guarded --collate-only
"${R[@]}" --pools testbed:text_full --out lab/results/ceiling_text --merger "${B[@]}" wudi testbed_adamerging --variant base sched-linear larv-tiered 'fitted-scales-val*' lines-val signed-ramp-val larv-guarded --collate-only
for pilot in full_lr1e-3:text_full_lr1e-3-48171d1cd1a14b9f/ full_lr5e-4:text_full_lr5e-4-539130533bb538b0/ \
  lora_lr2e-3:text_lora_lr2e-3-7fcff8e01c250ba5 lora_lr5e-3:text_lora_lr5e-3-e74ae79cdf34f548; do
  "${R[@]}" --pools "testbed:/tmp/tb/cand/${pilot#*:}" --merger "${B[@]}" --variant base \
    --out "lab/results/text_pilot/${pilot%%:*}" --collate-only
done
"${R[@]}" --pools "${TEXT[@]}" --merger "${B[@]}" --variant base --out lab/results/text_pilot/full_lr2e-4_and_lora_lr1e-3 --collate-only
git status --short lab/results
