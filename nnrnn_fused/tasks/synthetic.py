"""Generated tasks (SPEC section 4): the copy task and the adding task.

Both return time-major tensors: inputs (L, B, features), targets (L, B) for the
copy task and (B,) for the adding task. A fresh batch is drawn from ``generator``.
"""
from __future__ import annotations

import math

import torch

COPY_SYMBOLS = 8      # symbols 1..8
COPY_LENGTH = 10      # symbols to remember
COPY_INPUTS = 10      # one-hot over {blank 0, symbols 1..8, cue 9}
COPY_CLASSES = 9      # outputs: blank 0 and symbols 1..8
ADDING_BASELINE = 1.0 / 6.0  # MSE of always predicting 1 (variance of the sum of two U(0, 1))


def copy_baseline(T: int, n_symbols: int = COPY_SYMBOLS, copy_length: int = COPY_LENGTH) -> float:
    """Cross-entropy per step of the memoryless strategy: blanks right, the copied
    symbols guessed uniformly: copy_length ln(n_symbols) / (T + 2 copy_length)."""
    return copy_length * math.log(n_symbols) / (T + 2 * copy_length)


def copy_batch(batch_size: int, T: int, generator: torch.Generator | None = None,
               n_symbols: int = COPY_SYMBOLS, copy_length: int = COPY_LENGTH):
    """One batch of the copy task with delay T.

    Input: copy_length symbols from {1..n_symbols}, T - 1 blanks (0), the cue
    (n_symbols + 1), copy_length blanks; length T + 2 copy_length, one-hot over
    n_symbols + 2 values. Target: blank (0) everywhere except the last
    copy_length steps, which hold the symbols.

    Returns (x (L, B, n_symbols + 2) float32, y (L, B) int64, symbols (B, copy_length)).
    """
    if T < 1 or batch_size < 1:
        raise ValueError(f"copy task needs T >= 1 and batch_size >= 1, got T={T}, batch_size={batch_size}")
    L = T + 2 * copy_length
    symbols = torch.randint(1, n_symbols + 1, (batch_size, copy_length), generator=generator)
    tokens = torch.zeros(L, batch_size, dtype=torch.int64)
    tokens[:copy_length] = symbols.T
    tokens[copy_length + T - 1] = n_symbols + 1
    y = torch.zeros(L, batch_size, dtype=torch.int64)
    y[-copy_length:] = symbols.T
    x = torch.nn.functional.one_hot(tokens, n_symbols + 2).float()
    return x, y, symbols


def adding_batch(batch_size: int, T: int, generator: torch.Generator | None = None):
    """One batch of the adding task: channel 0 holds values ~ U(0, 1), channel 1
    marks one step in the first half and one in the second; the target is the sum
    of the two marked values.

    Returns (x (T, B, 2) float32, y (B,) float32).
    """
    if T < 2 or batch_size < 1:
        raise ValueError(f"adding task needs T >= 2 and batch_size >= 1, got T={T}, batch_size={batch_size}")
    values = torch.rand(T, batch_size, generator=generator)
    half = T // 2
    first = torch.randint(0, half, (batch_size,), generator=generator)
    second = torch.randint(half, T, (batch_size,), generator=generator)
    markers = torch.zeros(T, batch_size)
    cols = torch.arange(batch_size)
    markers[first, cols] = 1.0
    markers[second, cols] = 1.0
    y = values[first, cols] + values[second, cols]
    return torch.stack([values, markers], dim=2), y
