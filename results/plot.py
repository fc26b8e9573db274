"""Comparison figures of the runs under results/ (see run.sh); writes results/*.png
and prints a table of the final numbers."""
import json
import os

from nnrnn_fused.train import plot_curves, read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))


def load(group):
    runs, summaries = {}, {}
    for model in ("nnrnn", "exprnn", "lstm"):
        d = os.path.join(HERE, group, model)
        if os.path.isdir(d):
            runs[model] = read_metrics(os.path.join(d, "metrics.csv"))
            with open(os.path.join(d, "summary.json")) as f:
                summaries[model] = json.load(f)
    return runs, summaries


copy_runs, copy_summary = load("copy")
baseline = next(iter(copy_summary.values()))["baseline"]
plot_curves(copy_runs, os.path.join(HERE, "copy.png"), baseline, "copy task T=200, N=128, batch 10")
for model, s in copy_summary.items():
    print(f"copy    {model:7s} final loss {s['final_train_loss']:.4f} (last 10: {s['final_train_loss_mean10']:.4f}), "
          f"baseline {s['baseline']:.4f}, {s['parameters']:,} parameters, {s['train_seconds']:.0f} s")

digit_runs, digit_summary = load("digits")
plot_curves({m: [r for r in rows if r["split"] != "train"] for m, rows in digit_runs.items()},
            os.path.join(HERE, "digits.png"), None, "permuted 8x8 digits (validation)")
for model, s in digit_summary.items():
    print(f"digits  {model:7s} test accuracy {s['test']['accuracy']:.4f}, validation {s['valid']['accuracy']:.4f}, "
          f"{s['parameters']:,} parameters, {s['train_seconds']:.0f} s")

seeds_dir = os.path.join(HERE, "copy_seeds")
for name in sorted(os.listdir(seeds_dir)) if os.path.isdir(seeds_dir) else []:
    with open(os.path.join(seeds_dir, name, "summary.json")) as f:
        s = json.load(f)
    print(f"copy    {name:9s} final loss {s['final_train_loss']:.4f} (last 10: {s['final_train_loss_mean10']:.4f}), "
          f"{s['train_seconds']:.0f} s")
