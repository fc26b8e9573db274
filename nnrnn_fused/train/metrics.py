"""The metrics of a run: metrics.csv or metrics.json, a row per logged step and per evaluation."""
from __future__ import annotations

import csv
import json
import os


def write_metrics(rows, out_dir, fmt):
    path = os.path.join(out_dir, "metrics." + fmt)
    if fmt == "json":
        with open(path, "w") as f:
            json.dump(rows, f, indent=0)
        return path
    fields = ["step", "epoch", "split", "loss", "accuracy", "bpc", "lr", "elapsed_s"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_metrics(path):
    """Rows of a metrics.csv or metrics.json written by nnrnn-train."""
    if path.endswith(".json"):
        with open(path) as f:
            return json.load(f)
    with open(path, newline="") as f:
        return [{k: (v if k == "split" else (float(v) if v not in ("", None) else None))
                 for k, v in row.items()} for row in csv.DictReader(f)]
