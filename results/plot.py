"""Comparison figures of the runs under results/ (see run.sh); writes results/*.png
and prints a table of the final numbers."""
import json
import os

from nnrnn_fused.train.metrics import read_metrics
from nnrnn_fused.train.plots import plot_curves

HERE = os.path.dirname(os.path.abspath(__file__))


def load(group):
    runs, summaries = {}, {}
    for model in ("nnrnn", "exprnn", "lstm"):
        d = os.path.join(HERE, group, model)
        if os.path.isfile(os.path.join(d, "summary.json")):  # finished runs only
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

psmnist_runs, psmnist_summary = load("psmnist")
if psmnist_summary:
    plot_curves(psmnist_runs, os.path.join(HERE, "psmnist.png"), None,
                "psMNIST, 5,000 real digits (784 steps, ~269K parameters)")
for model, s in psmnist_summary.items():
    rows = psmnist_runs[model]
    best = max((r for r in rows if r["split"] == "valid"), key=lambda r: r["accuracy"])
    train_acc = [r["accuracy"] for r in rows if r["split"] == "train"][-10:]
    print(f"psmnist {model:7s} test accuracy {s['test']['accuracy']:.4f} (loss {s['test']['loss']:.4f}), "
          f"last validation {s['valid']['accuracy']:.4f}, best validation {best['accuracy']:.4f} at epoch "
          f"{int(best['epoch']) + 1}, training accuracy {sum(train_acc) / len(train_acc):.3f} (last 10 logged "
          f"batches), {s['step']} steps, {s['parameters']:,} parameters, {s['train_seconds'] / 60:.0f} min")

adding_runs, adding_summary = load("adding")
if adding_summary:
    plot_curves(adding_runs, os.path.join(HERE, "adding.png"), next(iter(adding_summary.values()))["baseline"],
                "adding task T=750, ~17K parameters")
for model, s in adding_summary.items():
    print(f"adding  {model:7s} final MSE {s['final_train_loss']:.4f} (last 10: {s['final_train_loss_mean10']:.4f}), "
          f"baseline {s['baseline']:.4f}, {s['parameters']:,} parameters, {s['train_seconds'] / 60:.0f} min")

init_dir = os.path.join(HERE, "copy_init", "cayley", "summary.json")
if os.path.isfile(init_dir):
    with open(init_dir) as f:
        s = json.load(f)
    print(f"copy    cayley    final loss {s['final_train_loss']:.4f} (last 10: {s['final_train_loss_mean10']:.4f}), "
          f"{s['train_seconds']:.0f} s")

seeds_dir = os.path.join(HERE, "copy_seeds")
for name in sorted(os.listdir(seeds_dir)) if os.path.isdir(seeds_dir) else []:
    with open(os.path.join(seeds_dir, name, "summary.json")) as f:
        s = json.load(f)
    print(f"copy    {name:9s} final loss {s['final_train_loss']:.4f} (last 10: {s['final_train_loss_mean10']:.4f}), "
          f"{s['train_seconds']:.0f} s")
