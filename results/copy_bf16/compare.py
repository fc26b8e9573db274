"""The copy task with the tensor-core path's numerics (bfloat16 operands, float32 state and
sums: backend "reference-bf16") against the float32 runs of results/copy and results/copy_seeds,
same seeds. Writes results/copy_bf16/compare.png and prints the table of docs/tensor_cores.md."""
import json
import os
import statistics

from nnrnn_fused.train import plot_curves, read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.dirname(HERE)
PAIRS = [(0, os.path.join(RESULTS, "copy", "nnrnn"), os.path.join(HERE, "nnrnn")),
         (1, os.path.join(RESULTS, "copy_seeds", "nnrnn-1"), os.path.join(HERE, "nnrnn-1")),
         (2, os.path.join(RESULTS, "copy_seeds", "nnrnn-2"), os.path.join(HERE, "nnrnn-2"))]


def numbers(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        s = json.load(f)
    losses = [r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.csv")) if r["split"] == "train"]
    return s["final_train_loss"], s["final_train_loss_mean10"], statistics.median(losses[-100:]), s["baseline"]


runs = {}
print("| seed | float32: final (mean of last 10, median of last 100) | bfloat16 model: final (same) |")
print("| --- | --- | --- |")
for seed, f32, bf16 in PAIRS:
    a, b = numbers(f32), numbers(bf16)
    print(f"| {seed} | {a[0]:.4f} ({a[1]:.4f}, {a[2]:.4f}) | {b[0]:.4f} ({b[1]:.4f}, {b[2]:.4f}) |")
    runs[f"float32 seed {seed}"] = read_metrics(os.path.join(f32, "metrics.csv"))
    runs[f"bfloat16 operands seed {seed}"] = read_metrics(os.path.join(bf16, "metrics.csv"))
print(f"memoryless baseline {a[3]:.4f}")
plot_curves(runs, os.path.join(HERE, "compare.png"), a[3], "copy task T=200, N=128: float32 vs bfloat16 operands")
