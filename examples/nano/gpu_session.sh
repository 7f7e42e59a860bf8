#!/bin/bash
# What a session lent a GPU machine runs, as one command (about SECONDS + 4 minutes):
#   1. bench/gpu_check.py: the CUDA path's float32 tokens against the CPU's and transformers', bf16 agreement,
#      the 2B's TTFT and decode against transformers (report in $OUT/check.json);
#   2. qwen2vl-nano's stage 5 continued from the shipped weights for SECONDS (examples/nano/gpu.yaml, one run,
#      14 sample workers, the batched step), its compact weights in $OUT/C (examples/nano/assemble.py rebuilds it);
#   3. qwen2vl eval --device cuda on the result (video left out: no PyAV there).
#   bash examples/nano/gpu_session.sh SECONDS       (build .fonts first: examples/nano/gpu_fonts.sh; carry .fonts)
set -u
secs=${1:-300}
out=${OUT:-/tmp/nano-out}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 QWEN2VL_FONT_DIR=$PWD/.fonts
mount -o remount,size=48G /dev/shm 2>/dev/null
timeout 300 python3 bench/gpu_check.py --bench-2b --out "$out/check.json" > /tmp/check.log 2>&1
OMP_NUM_THREADS=1 python3 examples/nano/timed_train.py examples/nano/gpu.yaml --seconds "$secs" --out "$out/C" \
  model_name_or_path=qwen2vl/models/nano output_dir=/tmp/nano-C overwrite_output_dir=true \
  dataloader_num_workers=14 seed=46 ${EXTRA:-} > /tmp/train-C.log 2>&1
cp /tmp/nano-C/trainer_log.jsonl "$out/C-log.jsonl" 2>/dev/null
timeout 120 python3 -m qwen2vl.cli eval --model /tmp/nano-C --device cuda --dtype float32 -n 50 \
  --tasks blocks,counting,reading,weather,grounding,tap > /tmp/eval-C.txt 2>&1
{ tail -c 3000 /tmp/check.log; tr '\r' '\n' < /tmp/train-C.log | grep -v '^train: ' | tail -c 8000
  cat /tmp/eval-C.txt; } > "$out/report.txt"
