"""``fused_nnrnn``: the recurrence as a registered PyTorch custom op.

The schema is defined once in C++ (csrc/op.cpp), with kernels per backend
(csrc/cpu, csrc/cuda). Here: the fake implementations that torch.compile traces
with, and the autograd formula, which calls the hand-written backward op.
"""
from __future__ import annotations

import torch

from . import _extension
from ._checks import as_lengths, check_backward_inputs, check_inputs

__all__ = ["fused_nnrnn", "cuda_path"]


def fused_nnrnn(x, W, b=None, h0=None, *, nonlinearity="modrelu", lengths=None):
    """Run the nnRNN recurrence over all timesteps in one fused call.

    z_t = x_t + h_{t-1} @ W;  h_t = phi(z_t; b)  (SPEC section 1)

    Args:
        x: (T, B, N) projected input (the input map already applied).
        W: (N, N) recurrent matrix, row convention (hidden states are row vectors).
        b: (N,) bias inside the nonlinearity, or None for zeros.
        h0: (B, N) initial state, or None for zeros.
        nonlinearity: "modrelu" (sign(z) relu(|z| + b)), "tanh" or "relu".
        lengths: (B,) integer tensor (or list): steps t >= lengths[b] leave
            sequence b's state unchanged and output zero there.

    Returns:
        (output, h_n): every h_t, (T, B, N), and the final state, (B, N).
    """
    _extension.require(x.device if isinstance(x, torch.Tensor) else None)
    try:
        return torch.ops.nnrnn_fused.recurrence(x, W, b, h0, as_lengths(lengths), nonlinearity)
    except RuntimeError as e:
        if "setup_context" not in str(e):  # torch's refusal under torch.func transforms
            raise
        raise RuntimeError(
            "fused_nnrnn: torch.func transforms (grad, vjp, jacrev, jvp, ...) cannot differentiate the fused op "
            "yet; use torch.autograd.grad or .backward(), or the reference loop, which supports them: "
            "nnrnn_fused.reference.nnrnn_recurrence or NNRNN(..., backend='reference')") from None


def cuda_path(N, B, dtype=torch.float32, device="cuda"):
    """Which path ``fused_nnrnn`` takes on a CUDA device for hidden size N, batch B, dtype.

    Returns "persistent" (one kernel for all steps, W on chip), "fallback: <reason>"
    (a GEMM per step plus a fused pointwise kernel), "empty: ..." (N or B is 0) or
    "unavailable: <reason>" (no CUDA kernels built, or no GPU). The fallback can be
    forced with the environment variable NNRNN_CUDA_FORCE_FALLBACK=1.
    """
    _extension.require()
    return torch.ops.nnrnn_fused.cuda_path(int(N), int(B), dtype, torch.device(device))


def _register() -> None:
    @torch.library.register_fake("nnrnn_fused::recurrence")
    def _(x, W, b, h0, lengths, nonlinearity):
        T, B, N = check_inputs(x, W, b, h0, lengths, nonlinearity)
        return x.new_empty((T, B, N)), x.new_empty((B, N))

    @torch.library.register_fake("nnrnn_fused::recurrence_backward")
    def _(grad_output, grad_h_n, output, W, h0, lengths, nonlinearity):
        T, B, N = check_backward_inputs(grad_output, grad_h_n, output, W, h0, lengths, nonlinearity)
        return output.new_empty((T, B, N)), W.new_empty((N, N)), W.new_empty((N,)), output.new_empty((B, N))

    def setup_context(ctx, inputs, output):
        x, W, b, h0, lengths, nonlinearity = inputs
        out, _ = output
        ctx.save_for_backward(out, W, h0, lengths)
        ctx.nonlinearity = nonlinearity
        ctx.has_b = b is not None

    def backward(ctx, grad_output, grad_h_n):
        if torch.is_grad_enabled():  # create_graph=True: the backward op has no derivative of its own
            raise RuntimeError("fused_nnrnn: double backward (create_graph=True) is not supported; "
                               "the reference loop supports it: nnrnn_fused.reference.nnrnn_recurrence "
                               "or NNRNN(..., backend='reference')")
        out, W, h0, lengths = ctx.saved_tensors
        if grad_output is None:
            grad_output = torch.zeros_like(out)
        if grad_h_n is None:
            grad_h_n = out.new_zeros(out.shape[1:])
        dx, dW, db, dh0 = torch.ops.nnrnn_fused.recurrence_backward(
            grad_output, grad_h_n, out, W, h0, lengths, ctx.nonlinearity
        )
        return dx, dW, db if ctx.has_b else None, dh0 if h0 is not None else None, None, None

    torch.library.register_autograd("nnrnn_fused::recurrence", backward, setup_context=setup_context)


if _extension.LOADED:
    _register()
