"""What the benchmarks time: one case is an implementation at a size, dtype, device
and mode ("fwd" or "fwdbwd"), built into a closure that runs it once."""
from __future__ import annotations

import itertools
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

import nnrnn_fused
from nnrnn_fused.reference import nnrnn_recurrence

# fused: the op as shipped (on the CPU, the path that cpu_path names); fused_blas: the op
# forced onto its previous CPU path, one BLAS GEMM per step (NNRNN_CPU_KERNEL=blas);
# fused_packed: forced onto the packed CPU kernels (NNRNN_CPU_KERNEL=packed).
IMPLS = ("fused", "fused_blas", "reference", "torch_rnn", "torch_lstm", "nnrnn_layer")
# nnrnn_layer_reused: the layer inside nnrnn_fused.reuse_recurrent_matrices (W built once; forward only).
CPU_ONLY_IMPLS = {"fused_blas": "blas", "fused_packed": "packed"}
MODES = ("fwd", "fwdbwd")

# Grids: (N values, B values, T values), and the implementations when not IMPLS. "gpu" is the
# GPU-verification grid (issue 6), "gpucheck" the small one that benchmarks/gpu_check.sh runs with
# the time it has left; "crossover" measures where the packed CPU path beats the BLAS path (the
# table in csrc/cpu/packed_cpu.cpp); "step" times inference one step per call, W rebuilt per call
# or reused.
GRIDS = {
    "quick": dict(N=(64, 128), B=(10,), T=(50,)),
    "targets": dict(N=(128, 512), B=(10, 100), T=(220,)),
    "full": dict(N=(128, 256, 512, 1024), B=(1, 10, 32, 128), T=(220, 784)),
    "gpu": dict(N=(256, 512, 1024), B=(1, 32, 128), T=(784,)),
    "gpucheck": dict(N=(512,), B=(32,), T=(200,)),  # what fits the end of benchmarks/gpu_check.sh
    "crossover": dict(N=(32, 64, 128, 256, 512, 1024), B=(1, 10, 32, 100, 256), T=(100,),
                      impls=("fused_packed", "fused_blas")),
    "step": dict(N=(128, 512), B=(1,), T=(1,), modes=("fwd",),
                 impls=("nnrnn_layer", "nnrnn_layer_reused", "torch_rnn")),
}


@dataclass(frozen=True)
class Case:
    impl: str
    mode: str
    N: int
    B: int
    T: int
    dtype: str
    device: str

    @property
    def id(self) -> str:
        return f"{self.device}-{self.dtype}-{self.mode}-N{self.N}-B{self.B}-T{self.T}-{self.impl}"

    @property
    def group(self) -> str:
        """Implementations of one group are compared side by side."""
        return f"{self.device} {self.dtype} {self.mode} N={self.N} B={self.B} T={self.T}"


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def dtypes(device):
    return ["float32"] + (["float16", "bfloat16"] if device == "cuda" else [])


def cases(grid: str, impls=None, modes=MODES, T=None):
    """Every case of a grid; T, when given, replaces the grid's sequence lengths."""
    sizes = GRIDS[grid]
    impls = impls or sizes.get("impls", IMPLS)
    modes = sizes.get("modes", modes)
    for device in devices():
        for dtype in dtypes(device):
            for N, B, T_, mode, impl in itertools.product(sizes["N"], sizes["B"], T or sizes["T"], modes, impls):
                if device == "cpu" or impl not in CPU_ONLY_IMPLS:
                    yield Case(impl, mode, N, B, T_, dtype, device)


def memory_cases(grid: str):
    """Forward+backward of the four recurrences; at T=784 (issue 5) except in the quick grid; none
    in the grids that time one question (crossover, step)."""
    if grid in ("crossover", "step"):
        return iter(())
    return cases(grid, impls=("fused", "reference", "torch_rnn", "torch_lstm"), modes=("fwdbwd",),
                 T=None if grid == "quick" else (784,))


@contextmanager
def cpu_kernel(kernel):
    """The op's CPU path forced to `kernel` ("packed" or "blas") inside the block."""
    before = os.environ.get("NNRNN_CPU_KERNEL")
    os.environ["NNRNN_CPU_KERNEL"] = kernel
    try:
        yield
    finally:
        if before is None:
            del os.environ["NNRNN_CPU_KERNEL"]
        else:
            os.environ["NNRNN_CPU_KERNEL"] = before


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def build(case: Case):
    """A closure running the case once (synchronized on CUDA); its attribute `leaves` lists
    the tensors that require grad."""
    dev, dt = torch.device(case.device), getattr(torch, case.dtype)
    N, B, T = case.N, case.B, case.T
    grad = case.mode == "fwdbwd"
    if case.device == "cuda":
        torch.backends.cudnn.allow_tf32 = False  # cuDNN in true float32
        torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator().manual_seed(0)
    leaves = []  # what requires grad: their .grad is reset before every forward+backward

    def tensor(*shape, scale=1.0):
        leaves.append((scale * torch.randn(*shape, generator=gen)).to(dev, dt).requires_grad_(grad))
        return leaves[-1]

    if case.impl in ("fused", "fused_blas", "fused_packed", "reference"):
        q, _ = torch.linalg.qr(torch.randn(N, N, generator=gen))
        # row-major, as NNRNN's W = P (Lambda + T) P^T is: QR's Q is column-major, and a leaf
        # in that layout has its gradient copied into it at every call (AccumulateGrad)
        W = (0.95 * q).contiguous().to(dev, dt).requires_grad_(grad)
        leaves.append(W)
        x, b = tensor(T, B, N), tensor(N, scale=0.01)
        fn = nnrnn_recurrence if case.impl == "reference" else nnrnn_fused.fused_nnrnn

        def forward():
            return fn(x, W, b, nonlinearity="modrelu")[0]
    elif case.impl in ("torch_rnn", "torch_lstm"):
        cls = torch.nn.RNN if case.impl == "torch_rnn" else torch.nn.LSTM
        kwargs = dict(nonlinearity="tanh") if case.impl == "torch_rnn" else {}
        module = cls(N, N, **kwargs).to(dev, dt).requires_grad_(grad)
        leaves.extend(module.parameters())
        x = tensor(T, B, N)

        def forward():
            return module(x)[0]
    elif case.impl in ("nnrnn_layer", "nnrnn_layer_reused"):
        module = nnrnn_fused.NNRNN(N, N, device=dev, dtype=dt).requires_grad_(grad)
        leaves.extend(module.parameters())
        x = tensor(T, B, N)
        held = None
        if case.impl == "nnrnn_layer_reused":
            if grad:
                raise ValueError("nnrnn_layer_reused is for inference: forward only")
            held = nnrnn_fused.reuse_recurrent_matrices(module)
            held.__enter__()  # never left: the module lives as long as this case's closure

        def forward(_held=held):  # holds the context: collected, it would leave the block
            return module(x)[0]  # includes building W = P (Lambda + T*M) P^T, unless reused
    else:
        raise ValueError(f"unknown implementation {case.impl!r}")

    if grad:
        out_grad = torch.randn(T, B, N, generator=gen).to(dev, dt)

        def run_once():
            for leaf in leaves:  # as optimizer.zero_grad() leaves them in a training step: no
                leaf.grad = None  # gradient accumulated into the last call's (x's is T*B*N)
            forward().backward(out_grad)
            synchronize(case.device)
    else:

        def run_once():
            with torch.no_grad():
                forward()
            synchronize(case.device)

    if case.impl not in CPU_ONLY_IMPLS:
        run = run_once
    else:

        def run():  # setting the variable costs about a microsecond a call
            with cpu_kernel(CPU_ONLY_IMPLS[case.impl]):
                run_once()

    run.leaves = leaves  # for the tests
    return run
