#!/usr/bin/env bash
# qwen2vl-nano's decoder under rope_theta 1e4, mrope_section [1, 1, 6] (rows and columns visible to it, HISTORY.md
# item 15) over stage 9's tower (HISTORY.md item 18; not shipped: 65.9 % in all where the shipped weights get 66.4).
#
#   bash examples/nano/r3_decoder.sh WORKDIR
#
# The curriculum of item 11 under that rotary on oracle features (curriculum1-3.yaml; item 16's run, with the
# rotary file as it was then, two-frame patch), widened to the four-frame patch (temporal4.py), stage 9's shipped
# tower put in (tower_distill.py assemble), the decoder fine-tuned over it twice (finetune.yaml, the tower frozen),
# the bf16 export. Every leg is resumable and skipped when its output exists.
# Times on this project's 2-core CPU VM, one core a job: curriculum 14 + 10 + 20 minutes, fine-tunes 24 + 13 minutes.
set -euo pipefail
W=${1:?usage: r3_decoder.sh WORKDIR}
mkdir -p "$W"
cd "$(dirname "$0")/../.."
STAGE8=04c0a9b  # stage 8's weights (item 14): the directory item 16's curriculum ran from (tokenizer, two frames)
STAGE9=0532ddf  # stage 9's shipped weights (item 17): their tower
ROPE=4edce2e  # the commit whose rope1e4-1-1-6-config.json item 16's curriculum ran under (two-frame patch)

for stage in stage8:$STAGE8 stage9:$STAGE9; do
    name=${stage%%:*} commit=${stage#*:}
    if [ ! -f "$W/$name/model.safetensors" ]; then
        mkdir -p "$W/$name"
        for f in $(git ls-tree --name-only "$commit" qwen2vl/models/nano/); do
            git show "$commit:$f" > "$W/$name/$(basename "$f")"
        done
    fi
done
git show "$ROPE:examples/nano/rope1e4-1-1-6-config.json" > "$W/rope1e4-1-1-6-tp2-config.json"
OP="python examples/nano/oracle_probe.py train"
[ -f "$W/r3-cur1/train_results.json" ] || $OP examples/nano/curriculum1.yaml --mode centre --geometry \
    --model_name_or_path "$W/stage8" --config_path "$W/rope1e4-1-1-6-tp2-config.json" --output_dir "$W/r3-cur1"
[ -f "$W/r3-cur2/train_results.json" ] || $OP examples/nano/curriculum2.yaml --mode centre --geometry \
    --model_name_or_path "$W/r3-cur1" --output_dir "$W/r3-cur2"
[ -f "$W/r3-cur3/train_results.json" ] || $OP examples/nano/curriculum3.yaml --mode centre --geometry \
    --model_name_or_path "$W/r3-cur2" --output_dir "$W/r3-cur3"
[ -f "$W/r3c3-tp4/model.safetensors" ] || python examples/nano/temporal4.py "$W/r3-cur3" "$W/r3c3-tp4"
[ -f "$W/tower-s9/tower.pt" ] || python examples/nano/tower_distill.py extract "$W/stage9" --out "$W/tower-s9"
[ -f "$W/r3-asm/model.safetensors" ] || python examples/nano/tower_distill.py assemble "$W/tower-s9" \
    --decoder "$W/r3c3-tp4" --out "$W/r3-asm"
[ -f "$W/r3-ft1/train_results.json" ] || qwen2vl train examples/nano/finetune.yaml --model_name_or_path "$W/r3-asm" \
    --output_dir "$W/r3-ft1" --max_steps 800 --learning_rate 1.0e-3 --seed 41 \
    --demo_weights blocks:3,counting:2,reading:2,weather:2,grounding:1,video:3,conversation:1,drill:2
[ -f "$W/r3-ft3/train_results.json" ] || qwen2vl train examples/nano/finetune.yaml --model_name_or_path "$W/r3-ft1" \
    --output_dir "$W/r3-ft3" --max_steps 400 --learning_rate 5.0e-4 --seed 43 \
    --demo_weights blocks:3,counting:2,reading:2,weather:2,grounding:1,video:4,conversation:1,drill:2
python -m qwen2vl.nano export "$W/r3-ft3" "$W/r3-ship"
