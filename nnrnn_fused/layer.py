"""The nnRNN layer: a drop-in recurrent layer shaped like torch.nn.RNN."""
from __future__ import annotations

import contextlib
import functools
import numbers

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import _extension
from ._amp import autocast_active, without_autocast
from ._checks import NONLINEARITIES, as_lengths
from .ops import fused_nnrnn, refuse_onnx_export
from .parametrization import INITS, DenseRecurrence, OrthogonalRecurrence, SchurRecurrence
from .reference import nnrnn_recurrence, nnrnn_recurrence_rounded

RECURRENT = {"nnrnn": SchurRecurrence, "orthogonal": OrthogonalRecurrence, "free": DenseRecurrence}
BACKENDS = {
    "fused": fused_nnrnn,
    "reference": nnrnn_recurrence,
    # the tensor-core path's numerics (bfloat16 operands, float32 state and sums) on any device
    "reference-bf16": functools.partial(nnrnn_recurrence_rounded, operand_dtype=torch.bfloat16),
}
INPUT_INITS = ("xavier", "kaiming")
TORCHSCRIPT_MESSAGE = (
    "NNRNN: TorchScript (torch.jit.script and torch.jit.trace) is not supported (the construction of W is an "
    "autograd.Function, which TorchScript can neither compile nor save); use torch.export.export(model, args) for a "
    "graph to save (torch.export.save), or torch.compile for speed.")


class RecurrentLayer(nn.Module):
    """One direction of one layer: input map U (no bias), recurrent matrix, nonlinearity bias b (None
    when bias=False)."""

    def __init__(self, input_size, hidden_size, recurrent, init, exact_spectrum, input_init, nonlinearity,
                 bias=True, generator=None, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.input_init, self.nonlinearity = input_init, nonlinearity
        # the order of the random draws (U, then the recurrence, then b) is that of earlier
        # versions, so that a seed gives the same model
        self.U = nn.Linear(input_size, hidden_size, bias=False, **kw)
        self._init_input_map()
        if recurrent == "nnrnn":
            self.recurrent = SchurRecurrence(hidden_size, init, exact_spectrum, generator, **kw)
        else:
            self.recurrent = RECURRENT[recurrent](hidden_size, init, generator, **kw)
        self.b = nn.Parameter(torch.empty(hidden_size, **kw)) if bias else None
        self._init_bias()
        self._reused = None  # (W, _state(self)) inside reuse_recurrent_matrices

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x U^T, the input of every step at once. With U^T made contiguous (a copy of
        input_size x hidden_size numbers), autograd computes U's gradient as X^T dZ; through
        F.linear, as dZ^T X, a layout in which MKL's GEMM is several times slower on AMD
        CPUs for a thin X (the copy task's 10 inputs, 2200 rows: 700 against 120 µs)."""
        return torch.matmul(x, self.U.weight.t().contiguous())

    def recurrent_matrix(self) -> torch.Tensor:
        """W in the parameters' dtype, under autocast too: P stays exactly orthogonal, and the
        op casts W once. Inside reuse_recurrent_matrices, the W built on entry."""
        if self._reused is not None:
            return self._reused_matrix()
        with without_autocast(self.U.weight):
            return self.recurrent()

    def _reused_matrix(self) -> torch.Tensor:
        W, state = self._reused
        if _state(self) != state:
            raise RuntimeError("NNRNN: the recurrent parameters changed inside reuse_recurrent_matrices(); leave the "
                               "block (W is rebuilt from the new values at the next call) or enter it again")
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.recurrent.parameters()):
            raise RuntimeError("NNRNN: reuse_recurrent_matrices() is for inference: W was built without gradients. "
                               "Run the calls under torch.no_grad() or torch.inference_mode(), or leave the block "
                               "to train")
        return W

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        self._init_input_map()
        self.recurrent.reset_parameters(generator)
        self._init_bias()

    def _init_input_map(self):
        if self.input_init == "xavier":
            nn.init.xavier_normal_(self.U.weight)
        else:
            nn.init.kaiming_normal_(self.U.weight, nonlinearity="relu")

    def _init_bias(self):
        if self.b is None:
            return
        if self.nonlinearity == "modrelu":
            nn.init.uniform_(self.b, -0.01, 0.01)
        else:
            nn.init.zeros_(self.b)


class NNRNN(nn.Module):
    """Non-normal RNN (Kerg et al., 2019) over the fused recurrence, with torch.nn.RNN's
    constructor and call conventions.

    Args, in torch.nn.RNN's order:
        input_size, hidden_size: feature sizes.
        num_layers: stacked layers.
        nonlinearity: "modrelu" (default), "tanh" or "relu".
        bias: the nonlinearity's bias b; False: none (modReLU without a bias is the identity).
        batch_first: input and output as (B, T, *) instead of (T, B, *).
        dropout: dropout on the output of every layer but the last (training only).
        bidirectional: a second, reversed direction per layer; the outputs are concatenated.
        device, dtype: of the parameters.
    NNRNN's own, keyword only:
        proj_size: refused unless 0 (an LSTM option; torch.nn.RNN refuses it too).
        recurrent: "nnrnn" (W = P (Lambda + T*M) P^T, hidden_size even), "orthogonal"
            (expRNN, W = P) or "free" (vanilla RNN, dense W).
        init: "cayley" (default), "henaff" or "random" (SPEC section 2).
        exact_spectrum: also mask the in-block entries of T (eigenvalues exactly gamma e^{+-i theta}).
        input_init: "xavier" (normal, default) or "kaiming" (normal) for U.
        backend: "fused" (the C++/CUDA op, default), "reference" (the PyTorch loop) or
            "reference-bf16" (the loop with the CUDA tensor-core path's numerics: bfloat16
            operands, float32 state and sums; see nnrnn_recurrence_rounded).
        generator: draws the recurrent matrices' initial state (None: the global generator).

    forward(input, h0=None, lengths=None) -> (output, h_n), like torch.nn.RNN, with
    D = 2 if bidirectional else 1:
        input (T, B, input_size) (or batch_first), (T, input_size) unbatched, or a PackedSequence;
        h0 (num_layers * D, B, N), or (num_layers * D, N) unbatched; lengths (B,) for padded input.
        Output (T, B, D * N) (zero past each length), (T, D * N) unbatched, or a PackedSequence;
        h_n like h0: index layer * D + direction, the state after each sequence's last step
        (for the reverse direction: after its first step).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "modrelu",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, proj_size: int = 0, recurrent: str = "nnrnn", init: str = "cayley",
                 exact_spectrum: bool = False, input_init: str = "xavier", backend: str = "fused",
                 generator: torch.Generator | None = None):
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"NNRNN: {name} must be a positive int, got {value!r}")
        for name, value in (("bias", bias), ("batch_first", batch_first), ("bidirectional", bidirectional),
                            ("exact_spectrum", exact_spectrum)):
            if not isinstance(value, bool):
                raise ValueError(f"NNRNN: {name} must be a bool, got {value!r}")
        if proj_size != 0:
            raise ValueError(f"NNRNN: proj_size is not supported (an LSTM option, which torch.nn.RNN refuses too); "
                             f"got proj_size={proj_size!r}")
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
        self.nonlinearity, self.bias, self.batch_first, self.dropout = nonlinearity, bias, batch_first, dropout
        self.bidirectional, self.recurrent, self.backend = bidirectional, recurrent, backend
        directions = 2 if bidirectional else 1

        def layer(i):
            return RecurrentLayer(input_size if i == 0 else directions * hidden_size, hidden_size, recurrent, init,
                                  exact_spectrum, input_init, nonlinearity, bias, generator, dtype, device)

        # state_dict names: layers.{i}.* for the forward direction (as before bidirectional
        # existed), layers_reverse.{i}.* for the reverse one
        self.layers = nn.ModuleList()
        self.layers_reverse = nn.ModuleList() if bidirectional else None
        for i in range(num_layers):
            self.layers.append(layer(i))
            if bidirectional:
                self.layers_reverse.append(layer(i))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw every parameter afresh, as the constructor does (U and b from the global
        generator, the recurrent matrices from `generator` or the global one)."""
        for i in range(self.num_layers):
            for layer in self._directions(i):
                layer.reset_parameters(generator)

    def recurrent_matrix(self, layer: int = 0, reverse: bool = False) -> torch.Tensor:
        """W of one layer and direction as the op consumes it (row convention: z = x + h @ W)."""
        return self._directions(layer)[int(reverse)].recurrent_matrix()

    def _directions(self, i):
        return (self.layers[i], self.layers_reverse[i]) if self.bidirectional else (self.layers[i],)

    def __prepare_scriptable__(self):  # torch.jit.script calls this first
        raise RuntimeError(TORCHSCRIPT_MESSAGE)

    def forward(self, input, h0=None, lengths=None):
        refuse_onnx_export()  # before W is built: its eigendecomposition would fail first, less clearly
        if torch.jit.is_tracing():
            raise RuntimeError(TORCHSCRIPT_MESSAGE)
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError("NNRNN: lengths must not be given with a PackedSequence input (it has its own)")
            input, lengths = pad_packed_sequence(input)
        batch_first = self.batch_first and not packed
        batched = self._check_input(input, h0, batch_dim=0 if batch_first else 1)
        if not batched:
            input, h0 = input.unsqueeze(1), (None if h0 is None else h0.unsqueeze(1))
        elif batch_first:
            input = input.transpose(0, 1)
        lengths = as_lengths(lengths)

        x, finals = input, []
        for i in range(self.num_layers):
            if i > 0 and self.dropout > 0 and self.training:
                x = nn.functional.dropout(x, self.dropout, training=True)
            outputs = []
            for reverse, layer in enumerate(self._directions(i)):
                out, h_n = self._run(layer, x, None if h0 is None else h0[len(finals)], lengths, bool(reverse))
                outputs.append(out)
                finals.append(h_n)
            x = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
        h_n = torch.stack(finals)
        if packed:
            return pack_padded_sequence(x, lengths, enforce_sorted=False), h_n
        if not batched:
            return x.squeeze(1), h_n.squeeze(1)
        return (x.transpose(0, 1) if batch_first else x), h_n

    def _run(self, layer, x, h0, lengths, reverse):
        """One direction of one layer over time-major x; the reverse direction runs the
        recurrence over each sequence reversed within its length."""
        if reverse:
            x = reverse_padded(x, lengths)
        out, h_n = BACKENDS[self.backend](layer.project(x), layer.recurrent_matrix(), layer.b, h0,
                                          nonlinearity=self.nonlinearity, lengths=lengths)
        return (reverse_padded(out, lengths) if reverse else out), h_n

    def _check_input(self, input, h0, batch_dim):
        """Checks input and h0 against torch.nn.RNN's shapes; returns whether input is batched."""
        if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3) or input.shape[-1] != self.input_size:
            got = list(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
            layout = "(B, T, input_size)" if batch_dim == 0 else "(T, B, input_size)"
            raise ValueError(f"NNRNN: input must have shape {layout}, or (T, input_size) unbatched, with "
                             f"input_size={self.input_size}, got {got}")
        weight = self.layers[0].U.weight
        if input.device != weight.device or (input.dtype != weight.dtype and not autocast_active(input)):
            raise ValueError(f"NNRNN: input is {input.dtype} on {input.device} but the layer's parameters are "
                             f"{weight.dtype} on {weight.device} (other dtypes only under torch.autocast)")
        batched = input.dim() == 3
        if h0 is not None:
            states = self.num_layers * (2 if self.bidirectional else 1)
            expected = (states, input.shape[batch_dim], self.hidden_size) if batched else (states, self.hidden_size)
            if not isinstance(h0, torch.Tensor) or tuple(h0.shape) != expected:
                got = list(h0.shape) if isinstance(h0, torch.Tensor) else type(h0).__name__
                layout = "(num_layers * num_directions, " + ("B, " if batched else "") + "hidden_size)"
                raise ValueError(f"NNRNN: h0 must have shape {layout} = {list(expected)} for "
                                 f"{'batched' if batched else 'unbatched'} input, got {got}")
        return batched

    def extra_repr(self):
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"nonlinearity={self.nonlinearity!r}, recurrent={self.recurrent!r}, backend={self.backend!r}, "
                f"bias={self.bias}, batch_first={self.batch_first}, dropout={self.dropout}, "
                f"bidirectional={self.bidirectional}")


def _state(layer: RecurrentLayer):
    """Where the recurrent parameters and buffers live, and their version counters (every in-place
    change through autograd-visible ops bumps them; changes through .data do not)."""
    return tuple((t.data_ptr(), t._version) for t in (*layer.recurrent.parameters(), *layer.recurrent.buffers()))


@contextlib.contextmanager
def reuse_recurrent_matrices(module: nn.Module):
    """Build the recurrent matrix W of every NNRNN layer in `module` once, on entry, and reuse it
    for every call inside the block: for inference, above all step by step (T = 1 per call),
    where building W (an eigendecomposition: about 0.7 ms at N=128, 17 ms at N=512 on one CPU
    thread) would otherwise cost more than the step itself.

        with torch.no_grad(), nnrnn_fused.reuse_recurrent_matrices(model):
            for x_t in inputs:
                out, h = model(x_t, h)

    W is built without gradients. A call inside the block raises a RuntimeError where it would
    need them (grad mode on and a recurrent parameter requiring grad), and where the recurrent
    parameters changed in place since entry (their version counters; changes through .data are
    invisible to them) or moved. Blocks do not nest on the same layer.
    """
    layers = [m for m in module.modules() if isinstance(m, RecurrentLayer)]
    if any(layer._reused is not None for layer in layers):
        raise RuntimeError("NNRNN: reuse_recurrent_matrices() is already active on this module")
    with torch.no_grad():
        reused = [(layer.recurrent_matrix(), _state(layer)) for layer in layers]
    try:
        for layer, entry in zip(layers, reused):
            layer._reused = entry
        yield module
    finally:
        for layer in layers:
            layer._reused = None


def reverse_padded(x, lengths):
    """x (T, B, ...) with each sequence b's first lengths[b] steps in reverse order and its
    padding in place (all T steps reversed when lengths is None). Its own inverse.
    lengths must be valid: the layer's forward direction, which runs first, checks them."""
    if lengths is None:
        return x.flip(0)
    T = x.shape[0]
    steps = torch.arange(T, device=x.device).unsqueeze(1)
    ends = lengths.to(x.device).unsqueeze(0)
    index = torch.where(steps < ends, ends - 1 - steps, steps)
    return x.gather(0, index.view(T, -1, *([1] * (x.dim() - 2))).expand_as(x))


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
