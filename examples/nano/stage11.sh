#!/usr/bin/env bash
# qwen2vl-nano stage 11 (HISTORY.md item 22): the weights shipped before stage 12, from stage 10's, in order.
#
#   bash examples/nano/stage11.sh WORKDIR
#
# Stage 10 first (stage10.sh, each of its legs skipped when its output exists), then two tower legs from stage 10's
# tower with blocks pictures weighed up (tower_distill.py, the centre anchor), each followed by a fine-tune of the
# decoder over it (the first from stage 10's float32 decoder, the second from the first's), the graded tasks' mix
# with blocks 6 and counting 4 of 26; the bf16 export. Every leg ran under this commit's code.
# Times on this project's 2-core CPU VM, one core a job, two jobs at once: tower legs 36 + 14 minutes; fine-tunes
# 25 + 14 minutes.
set -euo pipefail
W=${1:?usage: stage11.sh WORKDIR}
mkdir -p "$W"
W=$(cd "$W" && pwd)
cd "$(dirname "$0")/../.."
bash examples/nano/stage10.sh "$W"  # $W/r3tap-rec5 (stage 10's float32 weights), $W/nano-ship (their bf16 export)

[ -f "$W/tower-s10/tower.pt" ] || python examples/nano/tower_distill.py extract "$W/nano-ship" --out "$W/tower-s10"
TD="python examples/nano/tower_distill.py train --init $W/nano-ship --batch 2 --crops 32 --ce 8 --bf16 --motion \
    --near_weight 3 --score 60"
$TD --crop_weights blocks:6,shapes:2,word:4,buttons:8 --out "$W/tcentre1" --init_tower "$W/tower-s10" \
    --tasks tap:1,video,reading,blocks:3,counting --steps 1500 --data_from 600000 --lr 1e-3 --save 250
$TD --crop_weights blocks:8,shapes:2,word:4,buttons:6 --out "$W/tcentre2" --init_tower "$W/tcentre1" \
    --tasks tap:1,video,reading,blocks:5,counting --steps 750 --data_from 700000 --lr 5e-4 --save 250

source examples/nano/tower_leg_ft.sh  # ft, leg
leg tcentre1 r3tap-rec5 fcentre1 400 5.0e-4 71
leg tcentre2 fcentre1 fcentre2 300 3.0e-4 72
python -m qwen2vl.nano export "$W/fcentre2" "$W/nano-ship11"  # what qwen2vl/models/nano/ held at stage 11
