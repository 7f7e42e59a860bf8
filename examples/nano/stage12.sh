#!/usr/bin/env bash
# qwen2vl-nano stage 12 (HISTORY.md item 23): the weights shipped before stage 13, from stage 11's, in order.
#
#   bash examples/nano/stage12.sh WORKDIR
#
# Stage 11 first (stage11.sh, each of its legs skipped when its output exists), then three tower legs from stage 11's
# tower (its bf16 export, as shipped) with blocks pictures weighed up and the cells next to a centre weighing 5 times
# a background cell (tower_distill.py, the centre anchor), and a fine-tune of the decoder over the first, the second
# and the third (the first from stage 11's bf16 decoder, each next from the one before), the mix of stage 11; the
# bf16 export. Every leg ran under this commit's code.
# Times on this project's 2-core CPU VM, one core a job, two jobs at once: tower legs 31 + 21 + 21 minutes;
# fine-tunes 20 + 14 + 15 minutes.
set -euo pipefail
W=${1:?usage: stage12.sh WORKDIR}
mkdir -p "$W"
W=$(cd "$W" && pwd)
cd "$(dirname "$0")/../.."
bash examples/nano/stage11.sh "$W"  # $W/nano-ship11: stage 11's bf16 export

[ -f "$W/tower-s11/tower.pt" ] || python examples/nano/tower_distill.py extract "$W/nano-ship11" --out "$W/tower-s11"
TD="python examples/nano/tower_distill.py train --init $W/nano-ship11 --batch 2 --crops 32 --ce 8 --bf16 --motion \
    --near_weight 5 --score 60 --crop_weights blocks:8,shapes:2,word:4,buttons:6 \
    --tasks tap:1,video,reading,blocks:5,counting --save 250"
$TD --out "$W/tnear1" --init_tower "$W/tower-s11" --steps 1500 --data_from 900000 --lr 1e-3
$TD --out "$W/tnear2" --init_tower "$W/tnear1" --steps 1000 --data_from 1000000 --lr 5e-4
$TD --out "$W/tnear3" --init_tower "$W/tnear2" --steps 1000 --data_from 1100000 --lr 5e-4

source examples/nano/tower_leg_ft.sh  # ft, leg
leg tnear1 nano-ship11 fnear1 400 5.0e-4 81
leg tnear2 fnear1 fnear2 300 3.0e-4 82
leg tnear3 fnear2 fnear3 300 3.0e-4 83
python -m qwen2vl.nano export "$W/fnear3" "$W/nano-ship12"  # what qwen2vl/models/nano/ held at stage 12
