#!/bin/bash
# qwen2vl-nano stage 5 on a lent GPU machine (16 cores), as one command of a few minutes: two runs of
# examples/nano/gpu.yaml at once, from the shipped weights (stage 3's when it ran, stage 5's now), 7 sample
# workers each, one with the answers' loss stopping at the vision features (A: vision_lm_grad false, as stages
# 3-4) and one reaching the tower (B), each in a time box; then the CUDA inference path (qwen2vl eval --device
# cuda) on both results.
#   bash examples/nano/gpu_run.sh SECONDS          (writes under $OUT; fonts from ./.fonts, see below)
# The machine has no Debian fonts and no network: .fonts holds DejaVu / Liberation / Noto Sans and Noto Sans
# CJK SC cut to the six CJK sign words (pyftsubset --font-number=2; renders those glyphs pixel for pixel as the
# full collection does). PyAV is not there either: video is trained from frame lists, and not evaluated there.
set -u
secs=${1:-330}
out=${OUT:-/tmp/nano-out}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 QWEN2VL_FONT_DIR=$PWD/.fonts OMP_NUM_THREADS=1
mount -o remount,size=48G /dev/shm 2>/dev/null
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; ulimit -n; df -h /dev/shm
  python3 -c "import torch, sys; print(torch.__version__, torch.cuda.is_available(), sys.version.split()[0])"
  python3 -c "from qwen2vl.demo import fonts; print(sorted(fonts.find_font_files()))"; } > "$out/report.txt" 2>&1
for run in A B; do
  grad=true; [ $run = A ] && grad=false
  python3 examples/nano/timed_train.py examples/nano/gpu.yaml --seconds "$secs" --out "$out/$run" \
    model_name_or_path=qwen2vl/models/nano output_dir=/tmp/nano-$run overwrite_output_dir=true vision_lm_grad=$grad ${EXTRA:-} > /tmp/train-$run.log 2>&1 &
done
wait
rm -f "$out"/A/timed.json "$out"/B/timed.json
for run in A B; do
  timeout 110 python3 -m qwen2vl.cli eval --model /tmp/nano-$run --device cuda --dtype float32 -n 50 \
    --tasks blocks,counting,reading,weather,grounding --no-progress > /tmp/eval-$run.txt 2>&1 &
done
wait
for run in A B; do
  { echo "=== train $run"; tr '\r' '\n' < /tmp/train-$run.log | grep -v '^train: ' | tail -c 12000
    echo "=== eval $run (cuda)"; tail -c 6000 /tmp/eval-$run.txt; } >> "$out/report.txt"
  cp /tmp/nano-$run/trainer_log.jsonl "$out/$run-log.jsonl" 2>/dev/null
done
date -u >> "$out/report.txt"
