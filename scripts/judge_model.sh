#!/usr/bin/env bash
# Translates the held-out images with a model and scores the results with the painting judge:
# prints four JSON lines for models/judge/scores.jsonl, for each direction its own domain's
# held-out set (photo2painting on testA, painting2photo on testB) and, as a control, the other
# domain's (the identity mapping: G on paintings should leave paintings, F on photos photos).
#   judge_model.sh MODEL_FILE NAME DATA_DIR WORK_DIR >> models/judge/scores.jsonl
# DATA_DIR holds testA and testB (scripts/split_heldout.sh); translations go under WORK_DIR.
# CYCLESERVE: the cycleserve binary (default target/release/cycleserve); PYTHON: one with numpy
# and Pillow (default python3).
set -euo pipefail
model=$1 name=$2 data=$3 work=$4
cycleserve=${CYCLESERVE:-target/release/cycleserve}
python=${PYTHON:-python3}
here=$(dirname "$0")
for job in "photo2painting testA" "painting2photo testB" "photo2painting testB" "painting2photo testA"; do
    read -r direction input <<<"$job"
    out="$work/$input-$direction"
    rm -rf "$out"
    # f32, as the card's scores were made: on AMX machines the default would be bf16
    "$cycleserve" translate --model "$model" --direction "$direction" --device cpu --precision f32 \
        --out-dir "$out" "$data/$input" >&2
    "$python" "$here/painting_judge.py" score --model "$name" --model-file "$model" \
        --direction "$direction" --input "$input" "$out"
done
