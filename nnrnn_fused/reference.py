"""The recurrence as a plain PyTorch loop: the truth for tests, and a backend a
user may ask for by name (``NNRNN(..., backend="reference")``). Gradients come
from autograd through the loop."""
from __future__ import annotations

import torch

from ._amp import under_autocast_policy
from ._checks import as_lengths, check_inputs, check_length_values


def activation(z, b, nonlinearity):
    """phi(z; b) of SPEC section 1; b may be None (zeros)."""
    if nonlinearity == "modrelu":
        return torch.sign(z) * torch.relu(z.abs() + b) if b is not None else torch.sign(z) * torch.relu(z.abs())
    a = z + b if b is not None else z
    return torch.tanh(a) if nonlinearity == "tanh" else torch.relu(a)


def nnrnn_recurrence(x, W, b=None, h0=None, *, nonlinearity="modrelu", lengths=None):
    """Same signature and results as :func:`nnrnn_fused.fused_nnrnn` (under torch.autocast too)."""
    return under_autocast_policy(_loop, x, W, b, h0, nonlinearity, lengths)


def _loop(x, W, b, h0, nonlinearity, lengths):
    lengths = as_lengths(lengths)
    T, B, N = check_inputs(x, W, b, h0, lengths, nonlinearity)
    check_length_values(lengths, T)
    h = h0 if h0 is not None else x.new_zeros(B, N)
    valid_until = lengths.to(x.device).unsqueeze(1) if lengths is not None else None
    outputs = []
    for t in range(T):
        h_new = activation(x[t] + h @ W, b, nonlinearity)
        if valid_until is not None:
            valid = t < valid_until
            outputs.append(torch.where(valid, h_new, torch.zeros_like(h_new)))
            h = torch.where(valid, h_new, h)
        else:
            outputs.append(h_new)
            h = h_new
    output = torch.stack(outputs) if T > 0 else x.new_zeros(0, B, N)
    return output, h
