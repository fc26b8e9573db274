"""What the benchmarks time: one case is an implementation at a size, dtype, device
and mode ("fwd" or "fwdbwd"), built into a closure that runs it once."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

import nnrnn_fused
from nnrnn_fused.reference import nnrnn_recurrence

IMPLS = ("fused", "reference", "torch_rnn", "torch_lstm", "nnrnn_layer")
MODES = ("fwd", "fwdbwd")

# Grids: (N values, B values, T values). "gpu" is the GPU-verification grid (issue 6), "gpucheck"
# the small one that benchmarks/gpu_check.sh runs with the time it has left.
GRIDS = {
    "quick": dict(N=(64, 128), B=(10,), T=(50,)),
    "targets": dict(N=(128, 512), B=(10, 100), T=(220,)),
    "full": dict(N=(128, 256, 512, 1024), B=(1, 10, 32, 128), T=(220, 784)),
    "gpu": dict(N=(256, 512, 1024), B=(1, 32, 128), T=(784,)),
    "gpucheck": dict(N=(512,), B=(32,), T=(200,)),  # what fits the end of benchmarks/gpu_check.sh
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


def cases(grid: str, impls=IMPLS, modes=MODES, T=None):
    """Every case of a grid; T, when given, replaces the grid's sequence lengths."""
    sizes = GRIDS[grid]
    for device in devices():
        for dtype in dtypes(device):
            for N, B, T_, mode, impl in itertools.product(sizes["N"], sizes["B"], T or sizes["T"], modes, impls):
                yield Case(impl, mode, N, B, T_, dtype, device)


def memory_cases(grid: str):
    """Forward+backward of the four recurrences; at T=784 (issue 5) except in the quick grid."""
    return cases(grid, impls=IMPLS[:4], modes=("fwdbwd",), T=None if grid == "quick" else (784,))


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def build(case: Case):
    """A closure running the case once (synchronized on CUDA), and the module or
    tensors it uses (kept alive by the caller)."""
    dev, dt = torch.device(case.device), getattr(torch, case.dtype)
    N, B, T = case.N, case.B, case.T
    grad = case.mode == "fwdbwd"
    if case.device == "cuda":
        torch.backends.cudnn.allow_tf32 = False  # cuDNN in true float32
        torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator().manual_seed(0)

    def tensor(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(dev, dt).requires_grad_(grad)

    if case.impl in ("fused", "reference"):
        q, _ = torch.linalg.qr(torch.randn(N, N, generator=gen))
        W = (0.95 * q).to(dev, dt).requires_grad_(grad)
        x, b = tensor(T, B, N), tensor(N, scale=0.01)
        fn = nnrnn_fused.fused_nnrnn if case.impl == "fused" else nnrnn_recurrence

        def forward():
            return fn(x, W, b, nonlinearity="modrelu")[0]
    elif case.impl in ("torch_rnn", "torch_lstm"):
        cls = torch.nn.RNN if case.impl == "torch_rnn" else torch.nn.LSTM
        kwargs = dict(nonlinearity="tanh") if case.impl == "torch_rnn" else {}
        module = cls(N, N, **kwargs).to(dev, dt).requires_grad_(grad)
        x = tensor(T, B, N)

        def forward():
            return module(x)[0]
    elif case.impl == "nnrnn_layer":
        module = nnrnn_fused.NNRNN(N, N, device=dev, dtype=dt).requires_grad_(grad)
        x = tensor(T, B, N)

        def forward():
            return module(x)[0]  # includes building W = P (Lambda + T*M) P^T
    else:
        raise ValueError(f"unknown implementation {case.impl!r}")

    if grad:
        out_grad = torch.randn(T, B, N, generator=gen).to(dev, dt)

        def run():
            forward().backward(out_grad)
            synchronize(case.device)
    else:

        def run():
            with torch.no_grad():
                forward()
            synchronize(case.device)

    return run
