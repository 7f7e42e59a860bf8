#!/usr/bin/env bash
# qwen2vl-nano stage 9 (HISTORY.md item 17): the shipped weights, from stage 8's (item 14) in order.
#
#   bash examples/nano/stage9.sh WORKDIR
#
# The temporal patch widened from two frames to four (temporal4.py: every picture embeds exactly as before, the
# video task's four frames become one temporal patch), the tower taught on video pictures whose oracle names each
# block where it ends and the moved one with " moved" and its direction (tower_distill.py --motion), then the
# decoder fine-tuned over it (finetune.yaml, video weighed up), a second tower leg, a second fine-tune, the bf16
# export. Every leg is resumable and skipped when its output exists.
# Times on this project's 2-core CPU VM, one core a job: tower legs 18 + 11 minutes, fine-tunes 19 + 13 minutes.
set -euo pipefail
W=${1:?usage: stage9.sh WORKDIR}
mkdir -p "$W"
cd "$(dirname "$0")/../.."
STAGE8=04c0a9b  # the last commit holding stage 8's shipped weights (item 14)

if [ ! -f "$W/stage8/model.safetensors" ]; then
    mkdir -p "$W/stage8"
    for f in $(git ls-tree --name-only "$STAGE8" qwen2vl/models/nano/); do
        git show "$STAGE8:$f" > "$W/stage8/$(basename "$f")"
    done
fi
[ -f "$W/nano4/model.safetensors" ] || python examples/nano/temporal4.py "$W/stage8" "$W/nano4"
[ -f "$W/tower-s8/tower.pt" ] || python examples/nano/tower_distill.py extract "$W/nano4" --out "$W/tower-s8"

TD="python examples/nano/tower_distill.py train --init $W/nano4 --batch 2 --crops 32 --ce 8 --bf16 --motion \
    --crop_weights blocks:4,shapes:2,word:6 --near_weight 3 --score 0"
AS="python examples/nano/tower_distill.py assemble"
FT="qwen2vl train examples/nano/finetune.yaml --learning_rate 5.0e-4"
$TD --out "$W/tower19" --init_tower "$W/tower-s8" --tasks video:3,reading,blocks,counting --steps 1000 \
    --data_from 160000 --lr 1e-3
[ -f "$W/nano-asm12/model.safetensors" ] || $AS "$W/tower19" --decoder "$W/nano4" --out "$W/nano-asm12"
[ -f "$W/nano-ft12/train_results.json" ] || $FT --model_name_or_path "$W/nano-asm12" --output_dir "$W/nano-ft12" \
    --max_steps 600 --seed 32 \
    --demo_weights blocks:2,counting:2,reading:2,weather:2,grounding:1,video:6,conversation:1,drill:2
$TD --out "$W/tower20" --init_tower "$W/tower19" --tasks video:2,reading,blocks,counting --steps 600 \
    --data_from 170000 --lr 5e-4 --save 300
[ -f "$W/nano-asm13/model.safetensors" ] || $AS "$W/tower20" --decoder "$W/nano-ft12" --out "$W/nano-asm13"
[ -f "$W/nano-ft13/train_results.json" ] || $FT --model_name_or_path "$W/nano-asm13" --output_dir "$W/nano-ft13" \
    --max_steps 400 --seed 33 \
    --demo_weights blocks:3,counting:2,reading:2,weather:2,grounding:1,video:4,conversation:1,drill:2
python -m qwen2vl.nano export "$W/nano-ft13" "$W/nano-ship"  # what qwen2vl/models/nano/ holds
