#!/usr/bin/env bash
# Every GPU measurement the model issues name, in one short run (about 5 minutes on one H100/H200):
#   AMC fashioniq preset: training step at batch 32, bf16 (throughput, peak memory)
#   DIME f30k_i2t / f30k_t2i presets: training step at batch 32, bf16
#   two-stage BLIP re-ranker: stage I at batch 32 and stage II at batch 16, bf16
#   CaLa cirr preset (BLIP-2 ViT-L tower shared by three Q-Formers): training step at batch 64, bf16
#   HREM f30k preset (BERT-base fine-tuned): training step at batch 128, bf16 (the paper: about 20 GB)
#   DIME full-matrix evaluation: cirlab shards vs the plain 64 x 64 loop, COCO-5K time projected
# Results go to reports/benchmarks/train_step_gpu.md and dime_eval_gpu.md (and to $OUT when set, for the
# device tool). `bench/gpu_checks.sh --dry` runs the same steps with tiny presets on the CPU (a minute) to check
# the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [[ "${1:-}" == "--dry" ]]; then
    DEVICE=cpu; AMC=tiny; DIME_I=tiny; DIME_T="tiny --set direction=t2i"; BLIP=tiny; CALA=tiny; HREM=tiny
    # one warm-up and one timed step: the dry run checks that every step runs (in bf16), not its speed
    CALA_BATCH=4; HREM_BATCH=8; IMAGES=4; WARMUP=1; STEPS=1
    REPORT_DIR=${REPORT_DIR:-$(mktemp -d)}
else
    DEVICE=cuda; AMC=fashioniq; DIME_I=f30k_i2t; DIME_T=f30k_t2i; BLIP=cirr; CALA=cirr; HREM=f30k
    CALA_BATCH=64; HREM_BATCH=128; IMAGES=200; WARMUP=3; STEPS=10
    REPORT_DIR=reports/benchmarks
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --dry on CPU')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
STEP_REPORT=$REPORT_DIR/train_step_gpu.md
# train_step.py appends one row per call: a rerun starts its own table, and an earlier run's is kept beside it
if [[ -f "$STEP_REPORT" ]]; then
    STAMP=$(date -u -r "$STEP_REPORT" +%Y%m%dT%H%M%SZ)  # when that table was written; its commands keep the same
    mv "$STEP_REPORT" "${STEP_REPORT%.md}.$STAMP.md"
    if [[ -f "${STEP_REPORT%.md}.commands.txt" ]]; then
        mv "${STEP_REPORT%.md}.commands.txt" "${STEP_REPORT%.md}.$STAMP.commands.txt"
    fi
fi
step() { "$PY" bench/train_step.py --device "$DEVICE" --precision bf16 --steps "$STEPS" --warmup "$WARMUP" \
             --report "$STEP_REPORT" "$@"; }

step --model amc --preset $AMC --batch-size 32
step --model dime --preset $DIME_I --batch-size 32
# shellcheck disable=SC2086 # DIME_T carries a --set in dry mode
step --model dime --preset $DIME_T --batch-size 32
step --model blip_rerank_stage1 --preset $BLIP --batch-size 32
step --model blip_rerank_stage2 --preset $BLIP --batch-size 16
step --model cala --preset $CALA --batch-size $CALA_BATCH
step --model hrem --preset $HREM --batch-size $HREM_BATCH
PYTHONPATH=. "$PY" bench/dime_eval.py --images "$IMAGES" --device "$DEVICE" --project-coco5k \
    --out "$REPORT_DIR/dime_eval_gpu.md"

if [[ -n "${OUT:-}" ]]; then
    cp "$STEP_REPORT" "${STEP_REPORT%.md}.commands.txt" "$REPORT_DIR/dime_eval_gpu.md" "$OUT/"
fi
echo "results: $STEP_REPORT, $REPORT_DIR/dime_eval_gpu.md"
