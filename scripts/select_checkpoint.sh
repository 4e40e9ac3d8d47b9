#!/usr/bin/env bash
# Judges candidate checkpoints of one run for choosing the model to ship, and prints JSON lines
# for models/judge/selection.jsonl: for each candidate, the painting judge's verdicts on its
# translations of every 10th training image in name order (photos of trainA through G, paintings
# of trainB through F), which the choice uses, and on the held-out sets (testA through G, testB
# through F), which it must not use and the card shows beside it.
#   select_checkpoint.sh DATA_DIR WORK_DIR NAME=MODEL_FILE... >> models/judge/selection.jsonl
# NAME is how the card names the candidate (e.g. "step 4,500"); DATA_DIR holds trainA, trainB,
# testA and testB (scripts/split_heldout.sh); translations go under WORK_DIR. CYCLESERVE and
# PYTHON as for judge_model.sh. scripts/model_card_tables.py makes the choice and the table.
set -euo pipefail
data=$1 work=$2
shift 2
cycleserve=${CYCLESERVE:-target/release/cycleserve}
python=${PYTHON:-python3}
here=$(dirname "$0")
subset() { # every 10th file of $1 in name order, as links in $2
    rm -rf "$2" && mkdir -p "$2"
    find -L "$1" -maxdepth 1 -type f | sort | awk 'NR % 10 == 1' | while read -r f; do
        ln -s "$(realpath "$f")" "$2/"
    done
}
subset "$data/trainA" "$work/trainA-every-10th"
subset "$data/trainB" "$work/trainB-every-10th"
for candidate in "$@"; do
    name=${candidate%%=*} model=${candidate#*=}
    for job in "photo2painting $work/trainA-every-10th" "painting2photo $work/trainB-every-10th" \
        "photo2painting $data/testA" "painting2photo $data/testB"; do
        read -r direction input <<<"$job"
        out="$work/${name// /_}/$(basename "$input")-$direction"
        rm -rf "$out"
        "$cycleserve" translate --model "$model" --direction "$direction" --device cpu --precision f32 \
            --out-dir "$out" "$input" >&2
        "$python" "$here/painting_judge.py" score --model "$name" --model-file "$model" \
            --direction "$direction" --input "$(basename "$input")" "$out"
    done
done
