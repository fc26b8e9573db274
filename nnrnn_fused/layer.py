"""The nnRNN layer: a drop-in recurrent layer shaped like torch.nn.RNN."""
from __future__ import annotations

import numbers

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import _extension
from ._checks import NONLINEARITIES, as_lengths
from .ops import fused_nnrnn
from .parametrization import INITS, DenseRecurrence, OrthogonalRecurrence, SchurRecurrence
from .reference import nnrnn_recurrence

RECURRENT = {"nnrnn": SchurRecurrence, "orthogonal": OrthogonalRecurrence, "free": DenseRecurrence}
BACKENDS = {"fused": fused_nnrnn, "reference": nnrnn_recurrence}
INPUT_INITS = ("xavier", "kaiming")


class RecurrentLayer(nn.Module):
    """One layer's parameters: input map U (no bias), recurrent matrix, bias b."""

    def __init__(self, input_size, hidden_size, recurrent, init, exact_spectrum, input_init, nonlinearity,
                 generator=None, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.U = nn.Linear(input_size, hidden_size, bias=False, **kw)
        if input_init == "xavier":
            nn.init.xavier_normal_(self.U.weight)
        else:
            nn.init.kaiming_normal_(self.U.weight, nonlinearity="relu")
        if recurrent == "nnrnn":
            self.recurrent = SchurRecurrence(hidden_size, init, exact_spectrum, generator, **kw)
        else:
            self.recurrent = RECURRENT[recurrent](hidden_size, init, generator, **kw)
        self.b = nn.Parameter(torch.empty(hidden_size, **kw))
        if nonlinearity == "modrelu":
            nn.init.uniform_(self.b, -0.01, 0.01)
        else:
            nn.init.zeros_(self.b)


class NNRNN(nn.Module):
    """Non-normal RNN (Kerg et al., 2019) over the fused recurrence.

    Args:
        input_size, hidden_size: feature sizes.
        nonlinearity: "modrelu" (default), "tanh" or "relu".
        batch_first: input and output as (B, T, *) instead of (T, B, *).
        num_layers: stacked layers; dropout: dropout between layers (training only).
        recurrent: "nnrnn" (W = P (Lambda + T*M) P^T, hidden_size even), "orthogonal"
            (expRNN, W = P) or "free" (vanilla RNN, dense W).
        init: "cayley" (default), "henaff" or "random" (SPEC section 2).
        exact_spectrum: also mask the in-block entries of T (eigenvalues exactly gamma e^{+-i theta}).
        input_init: "xavier" (normal, default) or "kaiming" (normal) for U.
        backend: "fused" (the C++/CUDA op, default) or "reference" (the PyTorch loop).

    forward(input, h0=None, lengths=None) -> (output, h_n), like torch.nn.RNN:
        input (T, B, input_size) (or batch_first) or a PackedSequence; h0 (num_layers, B, N);
        lengths (B,) for padded input. Output (T, B, N) (zero past each length) or a
        PackedSequence; h_n (num_layers, B, N), the state after each sequence's last step.
    """

    def __init__(self, input_size: int, hidden_size: int, *, nonlinearity: str = "modrelu",
                 batch_first: bool = False, num_layers: int = 1, dropout: float = 0.0,
                 recurrent: str = "nnrnn", init: str = "cayley", exact_spectrum: bool = False,
                 input_init: str = "xavier", backend: str = "fused", generator: torch.Generator | None = None,
                 dtype=None, device=None):
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"NNRNN: {name} must be a positive int, got {value!r}")
        for name, value in (("batch_first", batch_first), ("exact_spectrum", exact_spectrum)):
            if not isinstance(value, bool):
                raise ValueError(f"NNRNN: {name} must be True or False, got {value!r}")
        _one_of("nonlinearity", nonlinearity, NONLINEARITIES)
        _one_of("recurrent", recurrent, tuple(RECURRENT))
        _one_of("init", init, INITS)
        _one_of("input_init", input_init, INPUT_INITS)
        _one_of("backend", backend, tuple(BACKENDS))
        if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"NNRNN: dropout must be a number in [0, 1], got {dropout!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"NNRNN: generator must be a torch.Generator or None, got {type(generator).__name__}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"NNRNN: dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        if recurrent == "nnrnn" and hidden_size % 2:
            raise ValueError(
                f"NNRNN: recurrent='nnrnn' needs an even hidden_size (2x2 rotation blocks), got {hidden_size}")
        if backend == "fused":
            _extension.require(device)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.nonlinearity, self.batch_first, self.dropout = nonlinearity, batch_first, dropout
        self.recurrent, self.backend = recurrent, backend
        self.layers = nn.ModuleList(
            RecurrentLayer(input_size if i == 0 else hidden_size, hidden_size, recurrent, init, exact_spectrum,
                           input_init, nonlinearity, generator, dtype, device)
            for i in range(num_layers)
        )

    def recurrent_matrix(self, layer: int = 0) -> torch.Tensor:
        """W of one layer as the op consumes it (row convention: z = x + h @ W)."""
        return self.layers[layer].recurrent()

    def forward(self, input, h0=None, lengths=None):
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError("NNRNN: lengths must not be given with a PackedSequence input (it has its own)")
            input, lengths = pad_packed_sequence(input)
        elif self.batch_first and isinstance(input, torch.Tensor) and input.dim() == 3:
            input = input.transpose(0, 1)
        self._check_input(input, h0)
        lengths = as_lengths(lengths)
        recurrence = BACKENDS[self.backend]

        x, finals = input, []
        for i, layer in enumerate(self.layers):
            if i > 0 and self.dropout > 0 and self.training:
                x = nn.functional.dropout(x, self.dropout, training=True)
            out, h_n = recurrence(layer.U(x), layer.recurrent(), layer.b, None if h0 is None else h0[i],
                                  nonlinearity=self.nonlinearity, lengths=lengths)
            x = out
            finals.append(h_n)
        h_n = torch.stack(finals)
        if packed:
            return pack_padded_sequence(x, lengths, enforce_sorted=False), h_n
        return (x.transpose(0, 1) if self.batch_first else x), h_n

    def _check_input(self, input, h0):
        if not isinstance(input, torch.Tensor) or input.dim() != 3 or input.shape[2] != self.input_size:
            got = list(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
            layout = "(B, T, input_size)" if self.batch_first else "(T, B, input_size)"
            raise ValueError(f"NNRNN: input must have shape {layout} with input_size={self.input_size}, got {got}")
        weight = self.layers[0].U.weight
        if input.dtype != weight.dtype or input.device != weight.device:
            raise ValueError(f"NNRNN: input is {input.dtype} on {input.device} but the layer's parameters are "
                             f"{weight.dtype} on {weight.device}")
        if h0 is not None:
            expected = (self.num_layers, input.shape[1], self.hidden_size)
            if tuple(h0.shape) != expected:
                raise ValueError(f"NNRNN: h0 must have shape (num_layers, B, hidden_size) = {list(expected)}, "
                                 f"got {list(h0.shape)}")

    def extra_repr(self):
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"nonlinearity={self.nonlinearity!r}, recurrent={self.recurrent!r}, backend={self.backend!r}, "
                f"batch_first={self.batch_first}, dropout={self.dropout}")


def _one_of(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"NNRNN: {name} must be one of {allowed}, got {value!r}")


def count_free_parameters(model: nn.Module) -> int:
    """Trainable scalars of a model, counting only the free entries of structured
    parameters (the strict upper triangles of log_P and T), as the paper does."""
    total = 0
    for module in model.modules():
        counts = module.free_parameter_counts() if hasattr(module, "free_parameter_counts") else {}
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                total += counts.get(name, p.numel())
    return total
