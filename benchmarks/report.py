"""Turn pytest-benchmark JSON into markdown tables and PNG plots.

    python -m benchmarks.report RESULTS.json [MORE.json ...] [--out DIR]

Speed: microseconds per timestep (median time of a call / T) per implementation,
and how many times faster fused_nnrnn is than each baseline in the same run.
Several JSON files are repeated passes of the same grid: each figure is the median
over the passes, and each ratio also shows its range over the passes (the noise).
Memory: bytes saved for backward (and CUDA peak) per implementation.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict

IMPL_NAMES = {"fused": "fused_nnrnn", "fused_packed": "packed path", "fused_blas": "previous (BLAS per step)",
              "reference": "reference loop", "torch_rnn": "nn.RNN(tanh)", "torch_lstm": "nn.LSTM",
              "nnrnn_layer": "NNRNN layer", "nnrnn_layer_reused": "NNRNN layer, W reused"}
BASELINES = ("fused_blas", "reference", "torch_rnn", "torch_lstm")
KEY_FIELDS = ("device", "dtype", "mode", "N", "B", "T")


def load(path):
    with open(path) as f:
        data = json.load(f)
    return (data,) + tables((b["extra_info"], b["stats"]["median"]) for b in data["benchmarks"])


def combine(passes):
    """The median over passes of each case's µs/step (a case missing from a pass is left out there)."""
    speed = defaultdict(dict)
    for key in {k for p in passes for k in p}:
        for impl in {i for p in passes for i in p.get(key, {})}:
            speed[key][impl] = statistics.median([p[key][impl] for p in passes if impl in p.get(key, {})])
    return speed


def tables(entries):
    """(speed, memory) from (extra_info, median seconds) pairs: µs per step by case and implementation."""
    speed, memory = defaultdict(dict), defaultdict(dict)
    for info, median in entries:
        key = tuple(info[k] for k in KEY_FIELDS)
        if info["mode"] == "memory":
            memory[key][info["impl"]] = info
        else:
            speed[key][info["impl"]] = median / info["T"] * 1e6  # us per step
    return speed, memory


def header(data) -> str:
    m = data.get("machine_info", {})
    device = m.get("cuda_device") or m.get("cpu", {}).get("brand_raw", m.get("processor", "?"))
    parts = [f"device: {device}", f"torch {m.get('torch', '?')}"]
    if m.get("cuda"):
        parts.append(f"CUDA {m['cuda']}")
    parts.append(f"{m.get('torch_threads', '?')} CPU threads")
    commit = data.get("commit_info", {}).get("id")
    if commit:
        parts.append(f"commit {commit[:10]}")
    parts.append(data.get("datetime", "")[:10])
    return "; ".join(parts)


def speed_table(speed, passes=()) -> str:
    """Ratios are of the op as shipped ("fused"), or of the forced packed path when only it ran;
    with several passes, each ratio is followed by its (min-max) over the passes."""
    impls = [i for i in IMPL_NAMES if any(i in v for v in speed.values())]
    subject = "fused" if "fused" in impls else "fused_packed"
    baselines = [b for b in BASELINES if b in impls and subject in impls]
    cols = ["device", "dtype", "mode", "N", "B", "T"] + [f"{IMPL_NAMES[i]} µs/step" for i in impls]
    cols += [f"{IMPL_NAMES[subject]} vs {IMPL_NAMES[b]}" for b in baselines]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for key in sorted(speed):
        row = speed[key]
        cells = [str(k) for k in key] + [f"{row[i]:.2f}" if i in row else "" for i in impls]
        for b in baselines:
            if b not in row or subject not in row:
                cells.append("")
                continue
            cell = f"{row[b] / row[subject]:.2f}x"
            per_pass = [p[key][b] / p[key][subject] for p in passes if {b, subject} <= set(p.get(key, {}))]
            if len(per_pass) > 1:
                cell += f" ({min(per_pass):.2f}-{max(per_pass):.2f})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_table(memory) -> str:
    impls = [i for i in IMPL_NAMES if any(i in v for v in memory.values())]
    has_peak = any("peak_bytes" in r for v in memory.values() for r in v.values())
    what = "saved for backward / CUDA peak, MiB" if has_peak else "saved for backward, MiB"
    cols = ["device", "dtype", "N", "B", "T"] + [f"{IMPL_NAMES[i]} ({what})" for i in impls]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for key in sorted(memory):
        device, dtype, _, N, B, T = key
        cells = [device, dtype, str(N), str(B), str(T)]
        for i in impls:
            r = memory[key].get(i)
            if r is None:
                cells.append("")
            elif "peak_bytes" in r:
                cells.append(f"{r['saved_bytes'] / 2**20:.1f} / {r['peak_bytes'] / 2**20:.1f}")
            else:
                cells.append(f"{r['saved_bytes'] / 2**20:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(speed, out_dir) -> list[str]:
    """One PNG per (device, dtype, mode): µs/step against N, a panel per (B, T), a line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for (device, dtype, mode, N, B, T), row in speed.items():
        for impl, us in row.items():
            figures[(device, dtype, mode)][(B, T)][impl][N] = us
    paths = []
    for (device, dtype, mode), panels in sorted(figures.items()):
        keys = sorted(panels)
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6), squeeze=False)
        for ax, (B, T) in zip(axes[0], keys):
            for impl in IMPL_NAMES:
                if impl in panels[(B, T)]:
                    pts = sorted(panels[(B, T)][impl].items())
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=IMPL_NAMES[impl])
            ax.set(xscale="log", yscale="log", xlabel="hidden size N", title=f"B={B}, T={T}")
            ax.set_xticks(sorted({n for r in panels[(B, T)].values() for n in r}))
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axes[0][0].set_ylabel("µs per timestep")
        axes[0][-1].legend(fontsize=8)
        fig.suptitle(f"{device} {dtype} {'forward+backward' if mode == 'fwdbwd' else 'forward'}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"speed_{device}_{dtype}_{mode}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="pytest-benchmark JSON (--benchmark-json); several: passes")
    parser.add_argument("--out", default=None, help="folder for report.md and the PNGs (default: beside RESULTS)")
    args = parser.parse_args(argv)
    loaded = [load(path) for path in args.results]
    data, _, memory = loaded[0]
    passes = [speed for _, speed, _ in loaded]
    speed = combine(passes)
    out_dir = args.out or os.path.dirname(os.path.abspath(args.results[0]))
    os.makedirs(out_dir, exist_ok=True)
    parts = [header(data)]
    if len(passes) > 1:
        parts.append(f"{len(passes)} passes: " + ", ".join(d.get("datetime", "?")[:19] for d, _, _ in loaded))
    if speed:
        what = "median over the passes of each pass's median" if len(passes) > 1 else "median"
        parts.append(f"Speed ({what} µs per timestep; ratios: times faster than the baseline, same run)\n\n"
                     + speed_table(speed, passes))
    if memory:
        parts.append("Memory of forward+backward\n\n" + memory_table(memory))
    text = "\n\n".join(parts) + "\n"
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)
    pngs = plot(speed, out_dir) if speed else []
    print(text)
    for p in pngs:
        print("plot:", p)


if __name__ == "__main__":
    main()
