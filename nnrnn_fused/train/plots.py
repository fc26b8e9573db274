"""The plots of a run (matplotlib, Agg): learning curves, and the eigenvalues of W against the unit circle."""
from __future__ import annotations

import math

import torch


def plot_curves(runs: dict, path: str, baseline: float | None = None, title: str = "", smooth: int = 20):
    """Learning curves of one or more runs ({label: metrics rows}): training loss
    (a running mean over `smooth` rows) and accuracy; evaluation rows as markers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for index, (label, rows) in enumerate(runs.items()):
        for split, style in (("train", "-"), ("valid", "o-"), ("test", "s")):
            sel = [r for r in rows if r["split"] == split and r["loss"] is not None]
            if not sel:
                continue
            steps = [r["step"] for r in sel]
            for ax, key in zip(axes, ("loss", "accuracy")):
                vals = [r[key] for r in sel]
                if any(v is None for v in vals):
                    continue
                if split == "train" and len(vals) > smooth:
                    k = smooth
                    vals = [sum(vals[max(0, i - k + 1):i + 1]) / len(vals[max(0, i - k + 1):i + 1])
                            for i in range(len(vals))]
                ax.plot(steps, vals, style, color=f"C{index}", label=f"{label} {split}", markersize=3)
    if baseline is not None:
        axes[0].axhline(baseline, color="k", ls="--", lw=1, label=f"memoryless baseline {baseline:.4f}")
    axes[0].set(xlabel="step", ylabel="loss", title=title)
    if all(v > 0 for line in axes[0].get_lines() for v in line.get_ydata()):
        axes[0].set_yscale("log")
    axes[1].set(xlabel="step", ylabel="accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_eigenvalues(before, after, path: str, title: str = ""):
    """Eigenvalues of W (as (n, 2) real/imag) before and after training against the unit circle."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    t = torch.linspace(0, 2 * math.pi, 400)
    ax.plot(torch.cos(t), torch.sin(t), "k-", lw=0.8, label="unit circle")
    for ev, style, label in ((before, "o", "before"), (after, "x", "after")):
        if ev is not None:
            ax.plot(ev[:, 0], ev[:, 1], style, ms=4, mfc="none" if style == "o" else None,
                    label=f"{label} training")
    ax.set(aspect="equal", xlabel="Re", ylabel="Im", title=title or "eigenvalues of W")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
