#!/bin/sh
# The commands that produced results/ (run from the repository root, CPU only).
# TRAIN defaults to the console script; `TRAIN="python -m nnrnn_fused.train" sh results/run.sh` is the same.
set -e
TRAIN=${TRAIN:-nnrnn-train}
$TRAIN copy --out-dir results/copy/nnrnn
$TRAIN copy --model lstm --out-dir results/copy/lstm
for model in nnrnn exprnn lstm; do
    $TRAIN psmnist --model "$model" --threads 1 --out-dir "results/digits/$model"
done
# Added after the first pass (same commands): expRNN on the copy task, other seeds.
$TRAIN copy --model exprnn --out-dir results/copy/exprnn
for seed in 1 2; do
    $TRAIN copy --seed $seed --out-dir results/copy_seeds/nnrnn-$seed
    $TRAIN copy --model lstm --seed $seed --out-dir results/copy_seeds/lstm-$seed
done
python results/plot.py
