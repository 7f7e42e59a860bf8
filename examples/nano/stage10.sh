#!/usr/bin/env bash
# qwen2vl-nano stage 10 (HISTORY.md items 18-21): the shipped weights, taught to act on the phone app, from stage 9's
# weights in git, in order.
#
#   bash examples/nano/stage10.sh WORKDIR
#
# The decoder under rope_theta 1e4, mrope_section [1, 1, 6] over stage 9's tower (r3_decoder.sh, item 18); a tower
# taught tap screens' button labels from close crops (tower_distill.py, item 18's legs); the two assembled and
# fine-tuned on the graded tasks, `tap` and the phone app's recorded runs (items 19 and 20); last, two legs with
# the graded tasks weighed up, counting most in the second (item 21); the bf16 export. The agent's data changed
# between these legs (the phone task, then its taps and typing drill, then typed text as the task's own token, then
# more drills), so each leg runs the code of the commit it ran under, from a git worktree under WORKDIR/code
# (`git worktree prune` forgets them once WORKDIR is gone). Four legs were stopped before their schedules ended and
# the next leg started from there: three tower legs (--stop), and the first fine-tune, whose checkpoint-400 goes on
# (the replay runs that leg to its end, 400 steps more than the weights need). Every leg is resumable or skipped
# when its output exists.
# Times on this project's 2-core CPU VM, one core a job, two jobs at once: r3_decoder.sh about 80 minutes; tower
# legs 15 + 40 + 28 + 21 minutes; fine-tunes about 27 (to step 400) + 30 + 20 + 24 + 28 + 18 minutes.
set -euo pipefail
W=${1:?usage: stage10.sh WORKDIR}
mkdir -p "$W"
W=$(cd "$W" && pwd)
cd "$(dirname "$0")/../.."
bash examples/nano/r3_decoder.sh "$W"  # $W/stage9 (stage 9's weights), $W/tower-s9 (its tower), $W/r3-ft3

at() {  # at COMMIT COMMAND...: run COMMAND in a worktree of COMMIT (its own qwen2vl package first on the path)
    local commit=$1
    shift
    [ -d "$W/code/$commit" ] || git worktree add --detach "$W/code/$commit" "$commit" > /dev/null
    (cd "$W/code/$commit" && PYTHONPATH=. "$@")
}
TAPCROP=70a6a10  # tower_distill with the tapcrop task (the button crops)
ASSEMBLE=805f7f9
PHONE1=0f4593c   # the phone task: recorded runs and taps
PHONE2=c45a2d6   # taps on every recorded screen, the typing drill
TYPED=991c3b4    # typed text carries the task word's leading space (record version 3)
DRILLS=36474ff   # typing drills 3 of 8 phone samples (the graded tasks' leg)

TD="python examples/nano/tower_distill.py train --init $W/stage9 --batch 2 --crops 32 --ce 8 --bf16 --motion \
    --near_weight 3 --score 0"
at $TAPCROP $TD --crop_weights blocks:4,shapes:2,word:6,buttons:6 --out "$W/ttap2" --init_tower "$W/tower-s9" \
    --tasks video:2,reading,blocks,counting --steps 600 --data_from 190000 --lr 1e-3 --save 200
at $TAPCROP $TD --crop_weights blocks:4,shapes:2,word:6,buttons:12 --out "$W/ttap3" --init_tower "$W/ttap2" \
    --tasks video:2,reading,blocks,counting --steps 3000 --stop 1800 --data_from 200000 --lr 1e-3 --save 200
at $TAPCROP $TD --crop_weights blocks:4,shapes:2,word:6,buttons:12 --out "$W/ttap5" --init_tower "$W/ttap3" \
    --tasks tap:2,video,reading,blocks,counting --steps 3000 --stop 1000 --data_from 400000 --lr 1e-3 --save 200
at $TAPCROP $TD --crop_weights blocks:6,shapes:2,word:4,buttons:8 --out "$W/ttap6" --init_tower "$W/ttap5" \
    --tasks tap:1,video,reading,blocks:3,counting --steps 1500 --stop 1000 --data_from 500000 --lr 5e-4 --save 200
[ -f "$W/r3tap-asm/model.safetensors" ] || at $ASSEMBLE python examples/nano/tower_distill.py assemble "$W/ttap6" \
    --decoder "$W/r3-ft3" --out "$W/r3tap-asm"

ft() { python -c 'import sys; from qwen2vl.cli import main; sys.exit(main())' train examples/nano/finetune.yaml "$@"; }
ALL=blocks,counting,reading,weather,grounding,video,conversation,drill,tap,phone
MIX=blocks:3,counting:2,reading:2,weather:2,grounding:1,video:3,conversation:1,drill:2
leg() {  # leg COMMIT FROM OUT STEPS LR SEED WEIGHTS
    [ -f "$W/$3/train_results.json" ] || at "$1" ft --model_name_or_path "$W/$2" --output_dir "$W/$3" \
        --max_steps "$4" --learning_rate "$5" --seed "$6" --save_steps 100 --save_total_limit 8 \
        --demo_tasks $ALL --demo_weights "$7"
}
leg $PHONE1 r3tap-asm r3tap-ft2 800 1.0e-3 52 $MIX,tap:5,phone:6  # its checkpoint-400 goes on
leg $PHONE2 r3tap-ft2/checkpoint-400 r3tap-ft3 400 5.0e-4 54 $MIX,tap:5,phone:6
leg $PHONE2 r3tap-ft3 r3tap-ft4 300 5.0e-4 56 $MIX,tap:3,phone:12
leg $TYPED r3tap-ft4/checkpoint-300 r3tap-ft5 300 5.0e-4 61 $MIX,tap:3,phone:12
leg $DRILLS r3tap-ft5 r3tap-rec2 400 3.0e-4 42 \
    blocks:3,counting:3,reading:2,weather:3,grounding:1,video:2,conversation:3,drill:2,tap:1,phone:3
leg $DRILLS r3tap-rec2 r3tap-rec5 300 2.0e-4 45 \
    blocks:3,counting:7,reading:2,weather:2,grounding:1,video:2,conversation:3,drill:2,tap:1,phone:3
python -m qwen2vl.nano export "$W/r3tap-rec5" "$W/nano-ship"  # what qwen2vl/models/nano/ held at stage 10
