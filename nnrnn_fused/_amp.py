"""The recurrence under torch.autocast (README, "Mixed precision").

One policy, applied by the op's autocast kernels (ops.py) and by the reference loop:
- CUDA: x, W, b and h0 are cast to the autocast dtype (float16/bfloat16), which the
  CUDA kernels run with float32 state and accumulation; outputs in that dtype.
- CPU: the CPU kernels have float32 and float64 only, so the inputs are cast to float32,
  the recurrence runs in float32, and the outputs are cast to the autocast dtype, as
  torch.nn.RNN and torch.nn.LSTM return under CPU autocast.
As in torch's own autocast ops, float64 tensors are never cast, and a float64 x runs
(and returns) float64.
"""
from __future__ import annotations

import contextlib

import torch

AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_dtypes(device_type: str) -> tuple[torch.dtype, torch.dtype]:
    """(dtype the recurrence computes in, dtype it returns) inside an autocast region."""
    low = torch.get_autocast_dtype(device_type)
    return (low if device_type == "cuda" else torch.float32), low


def autocast_active(x) -> bool:
    """Whether x is a tensor on a device whose autocast region is on."""
    return (isinstance(x, torch.Tensor) and x.device.type in AUTOCAST_DEVICES
            and torch.is_autocast_enabled(x.device.type))


def without_autocast(x):
    """A context with autocast off on x's device (nothing to do where it is off)."""
    return torch.autocast(x.device.type, enabled=False) if autocast_active(x) else contextlib.nullcontext()


def _cast(t, device_type, dtype):
    eligible = (isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type == device_type
                and t.dtype != torch.float64)
    return t.to(dtype) if eligible else t


def under_autocast_policy(recurrence, x, W, b, h0, *rest):
    """recurrence(x, W, b, h0, *rest) -> (output, h_n) under the policy: the casts outside
    it (autograd records them), autocast off inside it. Outside autocast, just the call."""
    if not autocast_active(x):
        return recurrence(x, W, b, h0, *rest)
    compute, output_dtype = autocast_dtypes(x.device.type)
    if x.dtype == torch.float64:
        output_dtype = torch.float64
    x, W, b, h0 = (_cast(t, x.device.type, compute) for t in (x, W, b, h0))
    with without_autocast(x):
        output, h_n = recurrence(x, W, b, h0, *rest)
    return output.to(output_dtype), h_n.to(output_dtype)
