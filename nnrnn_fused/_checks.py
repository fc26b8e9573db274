"""Argument checks of the recurrence in Python, for the reference loop and the
fake (meta) implementation used by torch.compile. The C++ kernels make the same
checks (csrc/checks.cpp) with the same messages."""
from __future__ import annotations

import operator

import torch

NONLINEARITIES = ("modrelu", "tanh", "relu")
_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = _CPU_DTYPES + (torch.float16, torch.bfloat16)


def _check_like(name, t, ref, shape, shape_text):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"fused_nnrnn: {name} must have shape {shape_text} = {list(shape)}, got {list(t.shape)}")
    if t.dtype != ref.dtype:
        raise ValueError(f"fused_nnrnn: {name} has dtype {t.dtype} but x has dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"fused_nnrnn: {name} is on {t.device} but x is on {ref.device}")


def check_inputs(x, W, b, h0, lengths, nonlinearity):
    """Validate the recurrence's arguments; returns (T, B, N)."""
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"fused_nnrnn: nonlinearity must be one of 'modrelu', 'tanh', 'relu', got {nonlinearity!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        got = f"{x.dim()} dimensions {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"fused_nnrnn: x must have shape (T, B, N), got {got}")
    allowed = _CUDA_DTYPES if x.device.type == "cuda" else _CPU_DTYPES
    if x.dtype not in allowed:
        raise ValueError(
            f"fused_nnrnn: x has dtype {x.dtype} on {x.device}; supported: "
            + ", ".join(str(d).replace("torch.", "") for d in allowed)
        )
    T, B, N = x.shape
    _check_like("W", W, x, (N, N), "(N, N)")
    if b is not None:
        _check_like("b", b, x, (N,), "(N,)")
    if h0 is not None:
        _check_like("h0", h0, x, (B, N), "(B, N)")
    if lengths is not None:
        if lengths.dim() != 1 or lengths.shape[0] != B:
            raise ValueError(f"fused_nnrnn: lengths must have shape (B,) = ({B},), got {list(lengths.shape)}")
        if lengths.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"fused_nnrnn: lengths must be int64 or int32, got {lengths.dtype}")
        if lengths.device.type != "cpu" and lengths.device != x.device:
            raise ValueError(
                f"fused_nnrnn: lengths must be on the CPU or on x's device ({x.device}), got {lengths.device}"
            )
    return T, B, N


def check_backward_inputs(grad_output, grad_h_n, output, W, h0, lengths, nonlinearity):
    """Validate the backward op's arguments (as csrc/checks.cpp does); returns (T, B, N)."""
    T, B, N = check_inputs(output, W, None, h0, lengths, nonlinearity)
    _check_like("grad_output", grad_output, output, (T, B, N), "(T, B, N)")
    _check_like("grad_h_n", grad_h_n, output, (B, N), "(B, N)")
    return T, B, N


def check_length_values(lengths, T):
    """Values in [0, T]; reads the values (a device sync for CUDA tensors)."""
    if lengths is not None and lengths.numel() > 0:
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > T:
            raise ValueError(f"fused_nnrnn: lengths must lie in [0, T] = [0, {T}], got values in [{lo}, {hi}]")


def as_lengths(lengths):
    """Accept a list/tuple of ints (or a NumPy array) as lengths; tensors pass through.
    Floats are refused, not truncated, as a float tensor is."""
    if lengths is None or isinstance(lengths, torch.Tensor):
        return lengths
    if isinstance(lengths, (list, tuple)):
        for value in lengths:
            try:
                operator.index(value)
            except TypeError:
                raise ValueError(f"fused_nnrnn: lengths must hold ints, got {type(value).__name__} {value!r}") from None
        return torch.tensor([operator.index(v) for v in lengths], dtype=torch.int64)
    if hasattr(lengths, "__array__"):  # a NumPy array keeps its dtype, which check_inputs then checks
        try:
            return torch.as_tensor(lengths)
        except (TypeError, RuntimeError) as e:
            raise ValueError(f"fused_nnrnn: lengths could not be read as a tensor: {e}") from None
    raise ValueError(f"fused_nnrnn: lengths must be a (B,) int64/int32 tensor or a list of ints, "
                     f"got {type(lengths).__name__}")
