#!/usr/bin/env bash
# Splits a CycleGAN dataset (trainA/, trainB/) into training and held-out folders by symlink:
# every 18th file in name order is held out. This is the split the shipped model used.
#   split_heldout.sh SOURCE_DIR OUT_DIR   # OUT_DIR gets trainA, trainB, testA, testB
set -euo pipefail
src=$(cd "$1" && pwd)
out=$2
mkdir -p "$out"/{trainA,trainB,testA,testB}
for d in A B; do
    i=0
    for f in $(ls "$src/train$d" | sort); do
        if [ $((i % 18)) -eq 0 ]; then dest="$out/test$d"; else dest="$out/train$d"; fi
        ln -sf "$src/train$d/$f" "$dest/$f"
        i=$((i + 1))
    done
done
for d in trainA trainB testA testB; do echo "$d: $(ls "$out/$d" | wc -l) images"; done
