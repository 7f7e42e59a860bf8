#!/usr/bin/env bash
# qwen2vl-nano stage 15 (HISTORY.md items 27-28): the shipped weights, from stage 14's, in order.
#
#   bash examples/nano/stage15.sh WORKDIR
#
# Stage 14 first (stage14.sh, each of its legs skipped when its output exists), then the decoder alone over the same
# tower (frozen, finetune.yaml): three legs of counting alone from stage 14's float32 weights (400, 800 and 1200 steps
# at lr 3e-4), then one leg of stage 13's mix with counting weighed 8 instead of 4 and the phone tasks 8 instead of 3
# (400 steps at lr 2e-4) to win back part of the blocks walk and the app's layout the counting legs cost; the bf16
# export. Every leg ran under this commit's code. Times on this project's 2-core CPU VM, one core a job, two jobs at
# once: about 1.2-1.7 s a step of counting alone, 3.1 s a step of the mix (21 minutes).
set -euo pipefail
W=${1:?usage: stage15.sh WORKDIR}
mkdir -p "$W"
W=$(cd "$W" && pwd)
cd "$(dirname "$0")/../.."
bash examples/nano/stage14.sh "$W"  # $W/fblocks6: stage 14's float32 weights

source examples/nano/tower_leg_ft.sh  # tune
COUNT_ONLY=counting:1,blocks:0,reading:0,weather:0,grounding:0,video:0,conversation:0,drill:0,tap:0,phone:0
COUNT_MIX=blocks:12,counting:8,reading:2,weather:2,grounding:1,video:2,conversation:3,drill:2,tap:1,phone:8
tune fblocks6 count1 400 3.0e-4 201 $COUNT_ONLY
tune count1 count2 800 3.0e-4 205 $COUNT_ONLY
tune count2 count3 1200 3.0e-4 209 $COUNT_ONLY
tune count3 recount2 400 2.0e-4 213 $COUNT_MIX
python -m qwen2vl.nano export "$W/recount2" "$W/nano-ship15"  # what qwen2vl/models/nano/ holds
