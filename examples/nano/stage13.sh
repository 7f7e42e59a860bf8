#!/usr/bin/env bash
# qwen2vl-nano stage 13 (HISTORY.md item 24): the weights shipped before stage 14, from stage 12's, in order.
#
#   bash examples/nano/stage13.sh WORKDIR
#
# Stage 12 first (stage12.sh, each of its legs skipped when its output exists), then fine-tunes of the decoder alone
# over stage 12's tower (frozen, finetune.yaml) with blocks weighed 12 of 32 in the mix instead of 6 of 26, each from
# the one before, the first from stage 12's float32 decoder; the bf16 export. Every leg ran under this commit's code.
# Times on this project's 2-core CPU VM, one core a job, two jobs at once: about 17 minutes a leg.
set -euo pipefail
W=${1:?usage: stage13.sh WORKDIR}
mkdir -p "$W"
W=$(cd "$W" && pwd)
cd "$(dirname "$0")/../.."
bash examples/nano/stage12.sh "$W"  # $W/fnear3: stage 12's float32 weights

source examples/nano/tower_leg_ft.sh  # tune, BLOCKS_MIX
tune fnear3 fblocks1 400 3.0e-4 93 $BLOCKS_MIX
tune fblocks1 fblocks2 400 3.0e-4 94 $BLOCKS_MIX
tune fblocks2 fblocks3 400 2.0e-4 96 $BLOCKS_MIX
python -m qwen2vl.nano export "$W/fblocks3" "$W/nano-ship13"  # what qwen2vl/models/nano/ held at stage 13
