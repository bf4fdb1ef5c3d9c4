#!/usr/bin/env bash
# The GPU table of docs/benchmarks.md in one command: base and large pre-training steps in
# bfloat16 with and without rematerialisation, plus the scaled retrieval evaluation, each row
# one JSON line appended to $OUT (default bench/results/gpu-<date>.jsonl).
#
#   bash bench/gpu.sh                  # every row
#   PEAK=989 OUT=rows.jsonl STEPS=20 ROWS="base_b128 large_b64" bash bench/gpu.sh
#
# EXTRA / EXTRA_EVAL: flags appended to every train-step / the evaluation command (the last occurrence of a flag wins), e.g. a CPU smoke
# run of the script itself:
#   EXTRA="--dims width=64,heads=4,layers=1,mlp=128 --image_res 64 --image_batch 4
#     --region_batch 4 --region_max_images 2 --dtype float32 --steps 1 --warmup 0" \
#     ROWS="base_b128" PY=python bash bench/gpu.sh
# PEAK: dense bf16 TFLOP/s of ONE device for MFU (H100 / H200 SXM: 989). A row that fails (e.g.
# out of memory at the batch size tried) is recorded as {"row": ..., "error": ...} and the
# script goes on. Batch sizes are global (one device here) and meant to fill an 80 GB device;
# they are first guesses until a GPU has run this script: lower them where a row runs out of
# memory, raise them where the reported peak memory leaves room.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PEAK=${PEAK:-989}
STEPS=${STEPS:-20}
OUT=${OUT:-bench/results/gpu-$(date -u +%Y%m%d-%H%M).jsonl}
ATTN=${ATTN:-cudnn}  # falls back to xla where cuDNN cannot run (models/attention.py)
mkdir -p "$(dirname "$OUT")"

common=(--image_res 224 --max_tokens 40 --max_masks 12 --dtype bfloat16 --mesh data=1
        --steps "$STEPS" --warmup 2 --peak_tflops "$PEAK" --attention "$ATTN" --out "$OUT")
declare -A ROW=(
  [base_b128]="--variant base --image_batch 128 --region_batch 128 --region_max_images 50"
  [base_b128_savemm]="--variant base --image_batch 128 --region_batch 128 --region_max_images 50 --remat save_matmuls"
  [base_b128_attn]="--variant base --image_batch 128 --region_batch 128 --region_max_images 50 --remat save_all_but_attention"
  [base_b256_remat]="--variant base --image_batch 256 --region_batch 256 --region_max_images 100 --remat full"
  [large_b64]="--variant large --image_batch 64 --region_batch 64 --region_max_images 25"
  [large_b128_remat]="--variant large --image_batch 128 --region_batch 128 --region_max_images 50 --remat full"
)
ORDER=(base_b128 base_b128_savemm base_b128_attn base_b256_remat large_b64 large_b128_remat)
for name in ${ROWS:-${ORDER[@]} eval_base}; do
  if [[ $name == eval_base ]]; then
    cmd=("$PY" bench/eval.py --variant base --dtype bfloat16 --attention "$ATTN"
         --num_images 500 --texts_per_image 5 --k_test 128 --batch 256 --itm_chunk 1024
         --mesh data=1 --out "$OUT" --tag "$name" ${EXTRA_EVAL:-})
  elif [[ -z ${ROW[$name]+set} ]]; then
    echo "unknown row $name (rows: ${ORDER[*]} eval_base)" >&2
    exit 2
  else
    # shellcheck disable=SC2206
    cmd=("$PY" bench/train_step.py ${ROW[$name]} "${common[@]}" --tag "$name" ${EXTRA:-})
  fi
  echo "== $name: ${cmd[*]}" >&2
  if ! "${cmd[@]}" > /dev/null 2> "$OUT.$name.log"; then
    err=$(tail -n 3 "$OUT.$name.log" | tr '\n"\\' '   ')
    printf '{"row": "%s", "error": "%s"}\n' "$name" "$err" >> "$OUT"
    echo "   failed (see $OUT.$name.log)" >&2
  fi
done
echo "rows in $OUT" >&2
