"""The training command ``nnrnn-train`` (``python -m nnrnn_fused.train``); its usage: ``nnrnn-train --help``.

Each module imports only from those below it (and from the rest of nnrnn_fused):

    cli         presets, the command line and its checks, ``main``
    loop        the training loop (``run``), evaluation rows, the summary, signals
    data        the task adapters: each task's training batches and evaluation
    checkpoint  checkpoint files and their integrity checks
    metrics     metrics.csv / metrics.json
    plots       learning curves and the spectrum of W
    devices     the device of a run, and the DDP helpers (batch sharding, gathering)
"""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .cli import EXIT_INTERRUPTED, main, resolve_config
from .data import DATA, AddingData, CopyData, Data, MnistData, TextData
from .devices import pick_device
from .loop import halve_lr_on_plateau, run, stop_on_signals
from .metrics import read_metrics, write_metrics
from .plots import plot_curves, plot_eigenvalues

__all__ = ["main", "run", "resolve_config", "stop_on_signals", "EXIT_INTERRUPTED", "halve_lr_on_plateau",
           "Data", "CopyData", "AddingData", "MnistData", "TextData", "DATA",
           "CheckpointError", "load_checkpoint", "save_checkpoint", "read_metrics", "write_metrics",
           "plot_curves", "plot_eigenvalues", "pick_device"]
