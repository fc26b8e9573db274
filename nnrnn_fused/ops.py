"""``fused_nnrnn``: the recurrence as a registered PyTorch custom op.

The schema is defined once in C++ (csrc/op.cpp), with kernels per backend
(csrc/cpu, csrc/cuda). Here, in Python: the fake implementations that torch.compile
traces with; the autograd formula, which calls the hand-written backward op; the
autocast kernels (CPU and CUDA; the policy is in _amp.py); and the vmap rules, which
fold the vmapped dimension into the batch.

torch.func.grad cannot differentiate a custom op through its registered autograd
formula (torch builds that formula into an autograd.Function without setup_context,
which torch.func requires), so under torch.func transforms ``fused_nnrnn`` runs the
same formula as its own autograd.Function.
"""
from __future__ import annotations

import torch

from . import _extension
from ._amp import AUTOCAST_DEVICES, under_autocast_policy
from ._checks import as_lengths, check_backward_inputs, check_inputs

__all__ = ["fused_nnrnn", "cuda_path", "cpu_path", "cpu_cache_info", "empty_cpu_cache"]

DOUBLE_BACKWARD_MESSAGE = (
    "fused_nnrnn: double backward (create_graph=True, or torch.func.grad of a gradient) is not supported; "
    "the reference loop supports it: nnrnn_fused.reference.nnrnn_recurrence or NNRNN(..., backend='reference')")


ONNX_MESSAGE = (
    "nnrnn_fused: ONNX export is not supported (ONNX has no operator for the fused recurrence, nor the "
    "eigendecomposition that P = exp(A) needs); export with torch.export.export(model, args) instead, which keeps "
    "the op and saves with torch.export.save.")


try:  # the ONNX exporter's own flag (torch 2.11 to 2.14): torch.onnx.export(dynamo=True) also captures the
    # model with dynamo, which folds torch.onnx.is_in_onnx_export() to False
    from torch.onnx._internal.exporter import _flags as _onnx_flags
except ImportError:
    _onnx_flags = None


def refuse_onnx_export() -> None:
    # ONNX export traces (with torch.jit.trace, torch.export or dynamo): that cheap test comes
    # first, since torch.onnx.is_in_onnx_export() costs microseconds at every call
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()
    if tracing and (torch.onnx.is_in_onnx_export() or getattr(_onnx_flags, "_is_onnx_exporting", False)):
        raise RuntimeError(ONNX_MESSAGE)


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
    refuse_onnx_export()
    _extension.require(x.device if isinstance(x, torch.Tensor) else None)
    args = (x, W, b, h0, as_lengths(lengths), nonlinearity)
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        return under_autocast_policy(_FunctorchRecurrence.apply, *args)
    return torch.ops.nnrnn_fused.recurrence(*args)


def cuda_path(N, B, dtype=torch.float32, device="cuda"):
    """Which path ``fused_nnrnn`` takes on a CUDA device for hidden size N, batch B, dtype.

    Returns "persistent <kernel version>: <plan>" (one kernel for all steps, W on chip;
    e.g. "persistent v1: 22 x 6 blocks (column x row groups) of 512 threads, ..."),
    "fallback: <reason>" (a GEMM per step plus a fused pointwise kernel), "empty: ..."
    (N or B is 0) or "unavailable: <reason>" (no CUDA kernels built, or no GPU). The
    fallback can be forced with NNRNN_CUDA_FORCE_FALLBACK=1, a kernel with
    NNRNN_CUDA_KERNEL=v1|v2|tc, kernel v1's layout with NNRNN_CUDA_PLAN=<col_groups>x<row_groups>,
    kernel v2's and the tensor-core kernel's team layout with
    NNRNN_CUDA_TEAMS=<exchange>:<blocks per team>[x<teams>] (docs/cuda.md).
    """
    _extension.require()
    return torch.ops.nnrnn_fused.cuda_path(int(N), int(B), dtype, torch.device(device))


def cpu_path(N, B, dtype=torch.float32):
    """Which path ``fused_nnrnn`` takes on the CPU for hidden size N, batch B, dtype.

    Returns "packed: <isa>, <s> batch slices, <k> threads" (W packed once per call,
    one slice of the batch per thread with no barrier, or for a single slice a team of
    threads in lockstep over the columns; the nonlinearity fused into the
    micro-kernel) or "blas: <reason>, <s> batch slices" (one BLAS GEMM per step, per
    slice: sliced where W fits a core's L2 with room to spare), as the measured
    crossover table in csrc/cpu/packed_cpu.cpp decides (one per CPU vendor: torch's BLAS
    is much slower on AMD CPUs). Environment variables, read at every call:
    NNRNN_CPU_KERNEL=packed|blas forces a path, NNRNN_CPU_CROSSOVER=intel|amd picks the
    table, NNRNN_CPU_ISA=avx512|avx2|generic caps the packed kernels' instruction set,
    NNRNN_CPU_SLICES=<n> sets the number of batch slices (docs/cpu.md).
    """
    _extension.require()
    return torch.ops.nnrnn_fused.cpu_path(int(N), int(B), dtype)


def cpu_cache_info():
    """The cache of big CPU blocks behind ``fused_nnrnn``'s outputs, as a dict.

    On the CPU, the forward's output and the backward's grad_x of at least 1 MiB take
    their memory from blocks that earlier outputs freed: fresh memory that big is mapped
    anew at every call and faulted in page by page (at N=512, B=100, T=220 that took a
    seventh of a forward+backward). At most NNRNN_CPU_CACHE_MB MiB (default 1024, read
    at every call; 0: no cache) are kept while unused. Keys: ``unused_bytes`` and
    ``unused_blocks`` (kept now, for the next calls), ``hits`` and ``misses`` (requests
    served from the cache, and those that were not, since the process started).
    """
    _extension.require()
    unused_bytes, unused_blocks, hits, misses = torch.ops.nnrnn_fused.cpu_cache_info()
    return dict(unused_bytes=unused_bytes, unused_blocks=unused_blocks, hits=hits, misses=misses)


def empty_cpu_cache():
    """Give the memory of the unused blocks of the CPU cache back to the system
    (see :func:`cpu_cache_info`); tensors still alive keep theirs."""
    _extension.require()
    torch.ops.nnrnn_fused.empty_cpu_cache()


# Autograd: one setup_context and one formula, for the op and for _FunctorchRecurrence.

def _setup_context(ctx, inputs, output):
    x, W, b, h0, lengths, nonlinearity = inputs
    out, _ = output
    ctx.save_for_backward(out, W, h0, lengths)
    ctx.nonlinearity = nonlinearity
    ctx.has_b = b is not None


def _gradients(ctx, grad_output, grad_h_n, backward_op):
    out, W, h0, lengths = ctx.saved_tensors
    if grad_output is None:
        grad_output = torch.zeros_like(out)
    if grad_h_n is None:
        grad_h_n = out.new_zeros(out.shape[1:])
    dx, dW, db, dh0 = backward_op(grad_output, grad_h_n, out, W, h0, lengths, ctx.nonlinearity)
    return dx, dW, db if ctx.has_b else None, dh0 if h0 is not None else None, None, None


def _backward(ctx, grad_output, grad_h_n):
    if torch.is_grad_enabled():  # create_graph=True: the backward op has no derivative of its own
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
    return _gradients(ctx, grad_output, grad_h_n, torch.ops.nnrnn_fused.recurrence_backward)


class _FunctorchRecurrence(torch.autograd.Function):
    """The op with its autograd formula, for torch.func transforms. They always build the
    graph of the gradient, so double backward is refused only when that graph is
    differentiated (by _BackwardOnce)."""

    generate_vmap_rule = True  # vmap runs forward and backward through the ops' vmap rules

    @staticmethod
    def forward(x, W, b, h0, lengths, nonlinearity):
        return torch.ops.nnrnn_fused.recurrence(x, W, b, h0, lengths, nonlinearity)

    setup_context = staticmethod(_setup_context)

    @staticmethod
    def backward(ctx, grad_output, grad_h_n):
        return _gradients(ctx, grad_output, grad_h_n, _BackwardOnce.apply)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError("fused_nnrnn: forward-mode differentiation (torch.func.jvp, jacfwd) is not supported; "
                           "reverse mode (grad, vjp, jacrev) is, and the reference loop supports both: "
                           "nnrnn_fused.reference.nnrnn_recurrence or NNRNN(..., backend='reference')")


class _BackwardOnce(torch.autograd.Function):
    """The backward op: may be recorded in a graph, not differentiated."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return torch.ops.nnrnn_fused.recurrence_backward(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


# vmap: the vmapped dimension is folded into the batch B, so one call runs every element.

def _fold(t, dim, size, at):
    """t with its vmapped dimension `dim` (None: not vmapped, so expanded to `size`)
    merged into its batch dimension at position `at`."""
    if t is None:
        return None
    t = t.movedim(dim, at) if dim is not None else t.unsqueeze(at).expand(*t.shape[:at], size, *t.shape[at:])
    return t.flatten(at, at + 1)


def _refuse_vmapped_weights(*dims):
    if any(d is not None for d in dims):
        raise ValueError("fused_nnrnn: vmap over W or b (a recurrent matrix or bias per vmapped element) is not "
                         "supported; vmap over x, h0 and lengths (with W and b shared) is")


def _vmap_forward(info, in_dims, x, W, b, h0, lengths, nonlinearity):
    x_dim, W_dim, b_dim, h0_dim, lengths_dim, _ = in_dims
    _refuse_vmapped_weights(W_dim, b_dim)
    V = info.batch_size
    out, h_n = torch.ops.nnrnn_fused.recurrence(
        _fold(x, x_dim, V, 1), W, b, _fold(h0, h0_dim, V, 0), _fold(lengths, lengths_dim, V, 0), nonlinearity)
    return (out.unflatten(1, (V, -1)), h_n.unflatten(0, (V, -1))), (1, 0)


def _vmap_backward(info, in_dims, grad_output, grad_h_n, output, W, h0, lengths, nonlinearity):
    """Gradients per vmapped element. Those of x and h0 come from the folded backward op;
    it sums those of W and b over the whole folded batch, so they are summed per element
    here from its grad_x (= dL/dz_t): dW = sum_t h_{t-1}^T dz_t and
    db = sum_t dz_t (dh/db)/(dh/dz), the factor being sign(h_t) for modReLU, else 1
    (csrc/activation.h)."""
    go_dim, ghn_dim, out_dim, W_dim, h0_dim, lengths_dim, _ = in_dims
    _refuse_vmapped_weights(W_dim)
    V = info.batch_size
    output, h0 = _fold(output, out_dim, V, 1), _fold(h0, h0_dim, V, 0)
    dx, _, _, dh0 = torch.ops.nnrnn_fused.recurrence_backward(
        _fold(grad_output, go_dim, V, 1), _fold(grad_h_n, ghn_dim, V, 0), output, W, h0,
        _fold(lengths, lengths_dim, V, 0), nonlinearity)
    acc = torch.promote_types(dx.dtype, torch.float32)
    first = h0 if h0 is not None else output.new_zeros(output.shape[1:])
    h_prev = torch.cat([first.unsqueeze(0), output[:-1]]).to(acc).unflatten(1, (V, -1))
    dz = dx.to(acc).unflatten(1, (V, -1))
    dW = torch.einsum("tvbi,tvbj->vij", h_prev, dz).to(W.dtype)
    bias_factor = torch.sign(output).to(acc).unflatten(1, (V, -1)) if nonlinearity == "modrelu" else 1
    db = (dz * bias_factor).sum((0, 2)).to(W.dtype)
    return (dx.unflatten(1, (V, -1)), dW, db, dh0.unflatten(0, (V, -1))), (1, 0, 0, 0)


def _autocast_kernel(x, W, b, h0, lengths, nonlinearity):
    return under_autocast_policy(torch.ops.nnrnn_fused.recurrence, x, W, b, h0, lengths, nonlinearity)


_LIBRARY = None  # holds the autocast registrations (they last as long as it does)


def _register() -> None:
    global _LIBRARY

    @torch.library.register_fake("nnrnn_fused::recurrence")
    def _(x, W, b, h0, lengths, nonlinearity):
        T, B, N = check_inputs(x, W, b, h0, lengths, nonlinearity)
        return x.new_empty((T, B, N)), x.new_empty((B, N))

    @torch.library.register_fake("nnrnn_fused::recurrence_backward")
    def _(grad_output, grad_h_n, output, W, h0, lengths, nonlinearity):
        T, B, N = check_backward_inputs(grad_output, grad_h_n, output, W, h0, lengths, nonlinearity)
        return output.new_empty((T, B, N)), W.new_empty((N, N)), W.new_empty((N,)), output.new_empty((B, N))

    torch.library.register_autograd("nnrnn_fused::recurrence", _backward, setup_context=_setup_context)
    torch.library.register_vmap("nnrnn_fused::recurrence", _vmap_forward)
    torch.library.register_vmap("nnrnn_fused::recurrence_backward", _vmap_backward)
    _LIBRARY = torch.library.Library("nnrnn_fused", "IMPL")
    for device_type in AUTOCAST_DEVICES:
        _LIBRARY.impl("recurrence", _autocast_kernel, "Autocast" + torch._C._dispatch_key_for_device(device_type))


if _extension.LOADED:
    _register()
