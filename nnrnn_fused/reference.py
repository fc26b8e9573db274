"""The recurrence as a plain PyTorch loop: the truth for tests, and a backend a
user may ask for by name (``NNRNN(..., backend="reference")``). Gradients come
from autograd through the loop. ``nnrnn_recurrence_rounded`` is the same loop with
the CUDA tensor-core path's roundings (``backend="reference-bf16"``)."""
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
    return _steps(x, h, b, nonlinearity, lengths, lambda h: h @ W)


def _steps(x, h, b, nonlinearity, lengths, product):
    """The time loop: h_t = phi(x_t + product(h_{t-1}); b); past a row's length the
    output is zero and h is kept. Returns (output, h_T)."""
    T, B, N = x.shape
    valid_until = lengths.to(x.device).unsqueeze(1) if lengths is not None else None
    outputs = []
    for t in range(T):
        h_new = activation(x[t] + product(h), b, nonlinearity)
        if valid_until is not None:
            valid = t < valid_until
            outputs.append(torch.where(valid, h_new, torch.zeros_like(h_new)))
            h = torch.where(valid, h_new, h)
        else:
            outputs.append(h_new)
            h = h_new
    output = torch.stack(outputs) if T > 0 else x.new_zeros(0, B, N)
    return output, h


def round_operand(t, operand):
    """float32 t rounded to the operand type, as float32: torch.bfloat16 or torch.float16
    (to nearest even), "tf32" (10 mantissa bits, to nearest with ties away from zero,
    as cvt.rna.tf32.f32), or torch.float32 (unchanged)."""
    if operand == "tf32":
        bits = t.contiguous().view(torch.int32)
        sign = bits & -(2**31)
        magnitude = ((bits & (2**31 - 1)) + 0x1000) & -0x2000  # add half of the dropped unit, truncate
        rounded = (sign | magnitude).view(torch.float32)
        return torch.where(torch.isfinite(t), rounded, t)
    return t.to(operand).float()


class _Rounded(torch.autograd.Function):
    """t rounded to `dtype` and returned as float32; the gradient rounded to `grad_dtype`
    (what a tensor stored in that type receives and passes on)."""

    @staticmethod
    def forward(ctx, t, dtype, grad_dtype):
        ctx.grad_dtype = grad_dtype
        return round_operand(t, dtype)

    @staticmethod
    def backward(ctx, grad):
        return round_operand(grad, ctx.grad_dtype), None, None


class _RoundedOperandProduct(torch.autograd.Function):
    """h @ W with h rounded to `operand` as the matmul operand, float32 products and
    sums (W is already an `operand` value); the backward rounds the incoming gradient
    the same way for the chain through time. Its share of dW comes from the values
    the tensor-core path stores, in `io` (its dW is one GEMM of the outputs and
    dx after the loop): for float16/bfloat16 the same roundings, for TF32 none."""

    @staticmethod
    def forward(ctx, h, W, operand, io):
        ctx.save_for_backward(round_operand(h, io), W)
        ctx.operand, ctx.io = operand, io
        return round_operand(h, operand) @ W

    @staticmethod
    def backward(ctx, grad):
        h_stored, W = ctx.saved_tensors
        return round_operand(grad, ctx.operand) @ W.t(), h_stored.t() @ round_operand(grad, ctx.io), None, None


def nnrnn_recurrence_rounded(x, W, b=None, h0=None, *, nonlinearity="modrelu", lengths=None,
                             operand_dtype=torch.bfloat16):
    """A model of the CUDA tensor-core path's numerics on any device (docs/tensor_cores.md): x, W, b, h0 and the outputs are `operand_dtype` values (so are
    their gradients); the state h_t, each step's sum and the nonlinearity are float32;
    h_t (and, backward, the gradient da_t) is rounded to `operand_dtype` only as the
    matmul's operand. Returns float32 tensors holding `operand_dtype` values. With
    operand_dtype "tf32" (float32 inputs on tensor cores) only the matmul's operands,
    W and h_t (da_t), are rounded; inputs and outputs stay float32. For training with
    these numerics where the tensor-core path is not available:
    ``NNRNN(..., backend="reference-bf16")``."""
    lengths = as_lengths(lengths)
    T, B, N = check_inputs(x, W, b, h0, lengths, nonlinearity)
    check_length_values(lengths, T)
    io = operand_dtype if operand_dtype != "tf32" else torch.float32
    rnd = lambda t: None if t is None else _Rounded.apply(t.float(), io, io)  # noqa: E731
    x, b = rnd(x), rnd(b)
    W = _Rounded.apply(W.float(), operand_dtype, io)  # TF32: W rounded as the operand, its gradient float32
    h = rnd(h0) if h0 is not None else x.new_zeros(B, N)
    output, h = _steps(x, h, b, nonlinearity, lengths,
                       lambda h: _RoundedOperandProduct.apply(h, W, operand_dtype, io))
    return (rnd(output) if T > 0 else output), rnd(h)
