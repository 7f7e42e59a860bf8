#!/usr/bin/env bash
# qwen2vl-nano stage 14 (HISTORY.md item 25): the weights shipped before stage 15, from stage 13's, in order.
#
#   bash examples/nano/stage14.sh WORKDIR
#
# Stage 13 first (stage13.sh, each of its legs skipped when its output exists), then two more fine-tunes of the decoder
# alone over the same tower (frozen, finetune.yaml) with stage 13's mix, from stage 13's float32 decoder: 800 steps at
# lr 2e-4, then 400 at 1.5e-4; the bf16 export. Every leg ran under this commit's code. Times on this project's 2-core
# CPU VM, one core a job, two jobs at once: about 17 minutes per 400 steps.
set -euo pipefail
W=${1:?usage: stage14.sh WORKDIR}
mkdir -p "$W"
W=$(cd "$W" && pwd)
cd "$(dirname "$0")/../.."
bash examples/nano/stage13.sh "$W"  # $W/fblocks3: stage 13's float32 weights

source examples/nano/tower_leg_ft.sh  # tune, BLOCKS_MIX
tune fblocks3 fblocks5 800 2.0e-4 103 $BLOCKS_MIX
tune fblocks5 fblocks6 400 1.5e-4 107 $BLOCKS_MIX
python -m qwen2vl.nano export "$W/fblocks6" "$W/nano-ship14"  # what qwen2vl/models/nano/ held at stage 14
