"""The training command ``nnrnn-train`` (``python -m nnrnn_fused.train``); its usage: ``nnrnn-train --help``.

Each module imports only from those below it (and from the rest of nnrnn_fused):

    cli         presets, the command line and its checks, ``main``
    loop        the training loop (``run``), evaluation rows, the summary, signals
    data        the task adapters: each task's training batches and evaluation
    checkpoint  checkpoint files and their integrity checks
    metrics     metrics.csv / metrics.json
    plots       learning curves and the spectrum of W
    devices     the device of a run, and the DDP helpers (batch sharding, gathering)

The package itself exports only what the README and docs/training.md document: ``main`` (the command)
and ``load_checkpoint`` (with the ``CheckpointError`` it raises); the rest is imported from its module,
e.g. ``nnrnn_fused.train.loop.run``.
"""
from .checkpoint import CheckpointError, load_checkpoint
from .cli import main

__all__ = ["main", "load_checkpoint", "CheckpointError"]
