#!/usr/bin/env bash
# qwen2vl-nano stage 8 (HISTORY.md items 11-13): how the shipped weights were made from the stage-5 weights, in
# order.
#
#   bash examples/nano/stage8.sh WORKDIR
#
# A decoder taught one task at a time on oracle vision features (curriculum1-3.yaml, from scratch), a tower taught
# to produce those features (tower_distill.py, from the stage-5 tower), the two put together (assemble), then the
# decoder fine-tuned on the real tower's features (finetune.yaml; the tower frozen) and exported in bf16.
# Every leg is resumable (the trainer's checkpoints, tower.pt) and skipped when its output exists. The tower legs
# before this stage's (items 9 and 10) are replayed as those items record them; two of them had their schedule
# redrawn on resuming (noted below), so a replay is close to, not bit-equal with, the shipped tower.
# Times on this project's 2-core CPU VM: decoder legs 12 + 8 + 19 minutes on one core; tower legs about 62 + 50 +
# 20 + 33 + 20 + 35 + 23 minutes on one core; the fine-tunes 37 minutes on two cores shared with a tower leg, then 7.
# Item 12: tower legs 24 + 25 + 26 + 18 minutes on one core; fine-tunes 11 + 21 + 31 + 12 minutes on one core
# (the middle two sharing it with another run). Item 13: tower legs 26 + 18 + 16 minutes, fine-tunes 12 + 12 + 13
# minutes, one core each (a tower leg and a fine-tune side by side). Item 14: fine-tune 16 minutes, tower leg 16,
# fine-tune 13, one core each (side by side). The legs before item 13 drew their pictures
# from the generators as they then were (narrower: one reading of a sign's size, fewer fonts); a replay draws
# today's for every leg.
set -euo pipefail
W=${1:?usage: stage8.sh WORKDIR}
mkdir -p "$W"
cd "$(dirname "$0")/../.."
STAGE5=d0a6324  # the commit that shipped the stage-5 weights (items 6 and 9 start from them)

if [ ! -f "$W/stage5/model.safetensors" ]; then  # the stage-5 model directory
    mkdir -p "$W/stage5"
    for f in $(git ls-tree --name-only "$STAGE5" qwen2vl/models/nano/); do
        git show "$STAGE5:$f" > "$W/stage5/$(basename "$f")"
    done
fi

# the decoder: three legs on oracle features (the tower is never run)
OP="python examples/nano/oracle_probe.py train"
[ -f "$W/nano-cur1/train_results.json" ] || $OP examples/nano/curriculum1.yaml --mode centre --geometry \
    --output_dir "$W/nano-cur1"
for leg in 2 3; do
    [ -f "$W/nano-cur$leg/train_results.json" ] || $OP "examples/nano/curriculum$leg.yaml" --mode centre --geometry \
        --model_name_or_path "$W/nano-cur$((leg - 1))" --output_dir "$W/nano-cur$leg"
done

# the tower, from the stage-5 tower: item 9's run (its first 750 steps in float32 under a 3000-step schedule, then
# bf16 under a 4000-step one, stopped at 3000), item 10's runs A (750 steps of 4 pictures + 32 crops, then 2 + 40
# with signs weighted 6) and B, then this stage's three legs (reading and blocks pictures, close crops mostly of
# signs, a strong naming cross-entropy). A finished leg only loads and returns.
TD="python examples/nano/tower_distill.py train --init $W/stage5 --save 250 --score 0"
$TD --out "$W/tower-i9" --steps 3000 --stop 750
$TD --out "$W/tower-i9" --steps 4000 --stop 3000 --bf16
$TD --out "$W/tower-a" --init_tower "$W/tower-i9" --batch 4 --crops 32 --ce 1 --steps 2000 --stop 750 --bf16
$TD --out "$W/tower-a" --batch 2 --crops 40 --crop_weights blocks:3,shapes:1,word:6 --ce 1 --steps 2000 --bf16
$TD --out "$W/tower-b" --init_tower "$W/tower-a" --batch 1 --crops 48 --crop_weights blocks:3,shapes:1,word:8 \
    --ce 3 --steps 1500 --bf16
$TD --out "$W/tower4" --init_tower "$W/tower-b" --tasks reading,blocks --batch 1 --crops 48 \
    --crop_weights blocks:2,shapes:1,word:8 --ce 5 --steps 2000 --bf16
$TD --out "$W/tower5" --init_tower "$W/tower4" --tasks reading,blocks --batch 1 --crops 48 \
    --crop_weights blocks:2,shapes:1,word:10 --ce 8 --steps 1000 --bf16
$TD --out "$W/tower6" --init_tower "$W/tower5" --tasks reading,blocks --batch 1 --crops 48 \
    --crop_weights blocks:4,shapes:1,word:8 --ce 8 --steps 1500 --bf16
$TD --out "$W/tower7" --init_tower "$W/tower6" --tasks reading,blocks --batch 1 --crops 48 \
    --crop_weights blocks:3,shapes:1,word:10 --ce 8 --steps 1000 --bf16

# together: the curriculum's decoder over tower4, fine-tuned; tower6 in its place, fine-tuned again; tower7 in its
# place; bf16 export
AS="python examples/nano/tower_distill.py assemble"
[ -f "$W/nano-asm/model.safetensors" ] || $AS "$W/tower4" --decoder "$W/nano-cur3" --out "$W/nano-asm"
[ -f "$W/nano-ft/train_results.json" ] || qwen2vl train examples/nano/finetune.yaml \
    --model_name_or_path "$W/nano-asm" --output_dir "$W/nano-ft"
[ -f "$W/nano-asm2/model.safetensors" ] || $AS "$W/tower6" --decoder "$W/nano-ft" --out "$W/nano-asm2"
[ -f "$W/nano-ft2/train_results.json" ] || qwen2vl train examples/nano/finetune.yaml \
    --model_name_or_path "$W/nano-asm2" --output_dir "$W/nano-ft2" --max_steps 400 --learning_rate 5.0e-4 --seed 13
[ -f "$W/nano-asm3/model.safetensors" ] || $AS "$W/tower7" --decoder "$W/nano-ft2" --out "$W/nano-asm3"

# stage 8, continued (item 12): the tower trained on pictures no earlier leg drew (--data_from), the decoder
# fine-tuned over each new tower in turn (400 steps but one of 600, lr 5e-4, each with its own seed)
FT="qwen2vl train examples/nano/finetune.yaml --learning_rate 5.0e-4"
[ -f "$W/nano-ft3/train_results.json" ] || $FT --model_name_or_path "$W/nano-asm3" --output_dir "$W/nano-ft3" \
    --max_steps 400 --seed 14
# each line: the tower leg, the step its data starts at, the decoder it goes under, the model it makes (then
# fine-tuned into the next decoder), that fine-tune's steps and seed
while read -r leg from dec asm ft steps seed; do
    $TD --out "$W/tower$leg" --init_tower "$W/tower$((leg - 1))" --tasks reading,blocks --batch 1 --crops 48 \
        --crop_weights blocks:3,shapes:1,word:10 --ce 8 --steps 1500 --bf16 --data_from "$from"
    [ -f "$W/$asm/model.safetensors" ] || $AS "$W/tower$leg" --decoder "$W/$dec" --out "$W/$asm"
    [ -f "$W/$ft/train_results.json" ] || $FT --model_name_or_path "$W/$asm" --output_dir "$W/$ft" \
        --max_steps "$steps" --seed "$seed"
done <<'LEGS'
8 40000 nano-ft3 nano-asm4 nano-ft4 400 15
9 50000 nano-ft4 nano-asm5 nano-ft5 600 16
10 60000 nano-ft5 nano-asm6 nano-ft6 400 17
LEGS
# the last tower leg adds counting and video pictures (shapes' centres); it goes under the last decoder as is
$TD --out "$W/tower11" --init_tower "$W/tower10" --tasks blocks,counting,reading,video --batch 1 --crops 48 \
    --crop_weights blocks:4,shapes:2,word:6 --ce 8 --steps 1000 --bf16 --data_from 70000
[ -f "$W/nano-asm7/model.safetensors" ] || $AS "$W/tower11" --decoder "$W/nano-ft6" --out "$W/nano-asm7"
# (item 12 shipped nano-asm7's bf16 export)

# item 13: the demo generators widened (condensed and narrow faces, a sign's size read three ways, block gaps up
# to 10 px); three tower legs on the wider pictures, the last two weighing the cells round each centre 4 and 3
# times (--near_weight), the decoder fine-tuned over each new tower in turn (400 steps, lr 5e-4, its own seed)
TD13="$TD --batch 1 --crops 48 --ce 8 --bf16"
$TD13 --out "$W/tower13" --init_tower "$W/tower11" --tasks reading,blocks --crop_weights blocks:4,shapes:1,word:8 \
    --steps 1500 --data_from 90000
$TD13 --out "$W/tower14" --init_tower "$W/tower13" --tasks reading,blocks --crop_weights blocks:4,shapes:1,word:8 \
    --steps 1000 --data_from 100000 --near_weight 4
$TD13 --out "$W/tower15" --init_tower "$W/tower14" --tasks reading,blocks,counting \
    --crop_weights blocks:4,shapes:2,word:6 --steps 1000 --data_from 110000 --near_weight 3
# each line: the tower, the decoder it goes under, the model it makes, the fine-tune of that model and its seed
while read -r tower dec asm ft seed; do
    [ -f "$W/$asm/model.safetensors" ] || $AS "$W/$tower" --decoder "$W/$dec" --out "$W/$asm"
    [ -f "$W/$ft/train_results.json" ] || $FT --model_name_or_path "$W/$asm" --output_dir "$W/$ft" \
        --max_steps 400 --seed "$seed"
done <<'LEGS'
tower13 nano-ft6 nano-asm8 nano-ft7 18
tower14 nano-ft7 nano-asm9 nano-ft8 19
tower15 nano-ft8 nano-asm10 nano-ft9 20
LEGS
# (item 13 shipped nano-ft9's bf16 export)

# item 14: the decoder fine-tuned 500 steps more over tower15; a tower leg on fresh pictures (counting ones too)
# under it, fine-tuned again (the shipped weights); a second leg with video pictures (grid lines) was not kept
[ -f "$W/nano-ft10/train_results.json" ] || $FT --model_name_or_path "$W/nano-ft9" --output_dir "$W/nano-ft10" \
    --max_steps 500 --seed 21
$TD13 --out "$W/tower17" --init_tower "$W/tower15" --tasks reading,blocks,counting \
    --crop_weights blocks:4,shapes:2,word:6 --steps 1000 --data_from 130000 --near_weight 3
[ -f "$W/nano-asm11/model.safetensors" ] || $AS "$W/tower17" --decoder "$W/nano-ft10" --out "$W/nano-asm11"
[ -f "$W/nano-ft11/train_results.json" ] || $FT --model_name_or_path "$W/nano-asm11" --output_dir "$W/nano-ft11" \
    --max_steps 400 --seed 22
python -m qwen2vl.nano export "$W/nano-ft11" "$W/nano-ship"  # what qwen2vl/models/nano/ holds
