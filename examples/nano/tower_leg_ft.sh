# Sourced by stage11.sh to stage15.sh (with W set to the work directory, run from the repository
# root). `tune` fine-tunes a decoder (finetune.yaml, the tower frozen) on a task mix; `leg` puts a tower leg's tower
# under a decoder (tower_distill.py assemble) and tunes it on the graded tasks' mix of HISTORY items 22-23. Each step
# is skipped when its output exists.
ft() { python -c 'import sys; from qwen2vl.cli import main; sys.exit(main())' train examples/nano/finetune.yaml "$@"; }
ALL=blocks,counting,reading,weather,grounding,video,conversation,drill,tap,phone
MIX=blocks:6,counting:4,reading:2,weather:2,grounding:1,video:2,conversation:3,drill:2,tap:1,phone:3
# stages 13-14's decoder legs: blocks weighed 12 of 32 (HISTORY items 24-25)
BLOCKS_MIX=blocks:12,counting:4,reading:2,weather:2,grounding:1,video:2,conversation:3,drill:2,tap:1,phone:3
tune() {  # tune FROM OUT STEPS LR SEED MIX
    [ -f "$W/$2/train_results.json" ] || ft --model_name_or_path "$W/$1" --output_dir "$W/$2" \
        --max_steps "$3" --learning_rate "$4" --seed "$5" --save_steps 100 --save_total_limit 5 \
        --demo_tasks $ALL --demo_weights "$6"
}
leg() {  # leg TOWER DECODER OUT STEPS LR SEED
    [ -f "$W/$3-asm/model.safetensors" ] || python examples/nano/tower_distill.py assemble "$W/$1" \
        --decoder "$W/$2" --out "$W/$3-asm"
    tune "$3-asm" "$3" "$4" "$5" "$6" $MIX
}
