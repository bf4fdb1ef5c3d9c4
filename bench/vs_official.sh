#!/usr/bin/env bash
# Issue 19's side-by-side table in one command: the official PyTorch step
# (bench/official_step.py) and ours (bench/train_step.py) for the three cases, one after the
# other in this process tree, each row one JSON line appended to $OUT. Run it on an idle machine:
# both steps slow down under load, the official one much more than ours.
#
#   bash bench/vs_official.sh                       # every case, official checkout extracted
#   CASES="tiny" OUT=rows.jsonl bash bench/vs_official.sh
#   EXTRA_OURS="--remat save_matmuls" CASES="mixed" bash bench/vs_official.sh
#
# OFFICIAL: a checkout of zengyan-97/X2-VLM (default /tmp/x2vlm_official; when it is missing and
# the workplace mirror exists, it is extracted from there). CASES: any of tiny image mixed.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results/vs-official-$(date -u +%Y%m%d-%H%M).jsonl}
OFFICIAL=${OFFICIAL:-/tmp/x2vlm_official}
MIRROR=${MIRROR:-/work/.mirror/zengyan-97+X2-VLM/repo}
mkdir -p "$(dirname "$OUT")"
if [[ ! -d $OFFICIAL/models ]]; then
  if [[ -d $MIRROR ]]; then
    mkdir -p "$OFFICIAL"
    git -C "$MIRROR" archive HEAD -- . ':(exclude)*.jar' | tar -x -C "$OFFICIAL"
  else
    echo "no official checkout at $OFFICIAL (set OFFICIAL=...)" >&2
    exit 2
  fi
fi

tiny_dims="--dims width=64,heads=4,mlp=256,layers=2+2+2,vocab=1024,embed=32"
declare -A BOTH=(  # flags both benchmarks take
  [tiny]="$tiny_dims --image_res 96 --max_tokens 16 --max_masks 6 --image_batch 8 --region_batch 8 --region_max_images 4 --steps 10 --warmup 2"
  [image]="--image_res 224 --max_tokens 30 --max_masks 12 --image_batch 8 --region_batch 0 --steps 3 --warmup 1"
  [mixed]="--image_res 224 --max_tokens 30 --max_masks 12 --image_batch 8 --region_batch 8 --region_max_images 4 --steps 3 --warmup 1"
)
# base: the remat policy of the pre-training configs (configs/common.py `pretrain_config`);
# tiny: its 2-layer loops unrolled (model.scan_unroll, docs/train_step.md#layer-loops)
declare -A OURS=([tiny]="--scan_unroll 2" [image]="--variant base --remat save_matmuls" [mixed]="--variant base --remat save_matmuls")
for name in ${CASES:-tiny image mixed}; do
  echo "== $name: official (load $(cut -d' ' -f1 /proc/loadavg))" >&2
  # shellcheck disable=SC2086
  $PY bench/official_step.py --official_repo "$OFFICIAL" ${BOTH[$name]} --tag "vs_official_$name" --out "$OUT" >/dev/null ||
    echo "{\"case\": \"$name\", \"side\": \"official\", \"error\": \"exit $?\"}" >>"$OUT"
  echo "== $name: ours (load $(cut -d' ' -f1 /proc/loadavg))" >&2
  # shellcheck disable=SC2086
  $PY bench/train_step.py ${OURS[$name]} ${BOTH[$name]} --mesh data=1 --tag "vs_official_$name" \
    ${EXTRA_OURS:-} --out "$OUT" >/dev/null ||
    echo "{\"case\": \"$name\", \"side\": \"ours\", \"error\": \"exit $?\"}" >>"$OUT"
done
echo "rows: $OUT" >&2
