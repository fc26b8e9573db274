"""Accuracy of the tensor-core path over a long sequence (T = 784), on the CPU.

    python benchmarks/tc_accuracy.py [--out benchmarks/results/tc_accuracy.md]

Two sources, both against the float64 reference loop run on the same (rounded) inputs:
- the kernel itself, in the host emulation (nnrnn_fused::emulated_recurrence_tc, mma.sync
  emulated per lane), at a tiny width (N = 32, B = 8, a cluster of 2 blocks);
- the CPU model of the same numerics (nnrnn_recurrence_rounded: operands rounded,
  float32 state and sums), which the emulation tests match to one rounding, at a
  realistic width (N = 512, B = 16), where the emulation would take too long.
Per step: the largest error of the outputs, also in units of u, the unit roundoff of
the operand type (2^-8 bfloat16, 2^-11 float16 and TF32): an output's own rounding
to bfloat16 or float16 is up to u |h| (|h| < 1 for tanh). tanh; W = scale x a random
orthogonal matrix (0.95: contracting, as in tests/test_cuda.py; 1.0: norm-preserving,
the nnRNN's orthogonal part). The backward the same way: the loss sum(out * g) with
g ~ N(0, 1) in the type, per step the largest error of dL/dx_t relative to that
step's largest |dL/dx_t| (the backward runs from t = 784 down to t = 1).
"""
import argparse
import os
import sys
import time

import torch

from nnrnn_fused.reference import nnrnn_recurrence, nnrnn_recurrence_rounded

T = 784
STEPS = (1, 10, 100, 392, 784)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "tf32": torch.float32}


def make_case(B, N, dtype, scale, x_scale, seed=4):
    g = torch.Generator().manual_seed(seed)
    x = x_scale * torch.randn(T, B, N, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
    b = 0.1 * torch.randn(N, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, N, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, scale * q, b, h0)]


UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-11}  # float32: TF32


def run(source, name, B, N, scale, x_scale):
    """Per step: the outputs' largest error, and dL/dx_t's largest error relative to its largest value."""
    dtype = DTYPES[name]
    x, W, b, h0 = make_case(B, N, dtype, scale, x_scale)
    g = torch.randn(T, B, N, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    zero = torch.zeros(B, N, dtype=dtype)
    start = time.perf_counter()
    if source == "emulation":
        layout = ("cluster", 2, 1, 8, 2)
        out, _ = torch.ops.nnrnn_fused.emulated_recurrence_tc(x, W, b, h0, None, "tanh", *layout)
        backward = torch.ops.nnrnn_fused.emulated_recurrence_tc_backward
        dx = backward(g, zero, out, W, h0, None, "tanh", *layout)[0]
    else:
        operand = "tf32" if name == "tf32" else dtype
        xf = x.float().requires_grad_()
        out, _ = nnrnn_recurrence_rounded(xf, W.float(), b.float(), h0.float(), nonlinearity="tanh",
                                          operand_dtype=operand)
        (dx,) = torch.autograd.grad((out * g.float()).sum(), xf)
    seconds = time.perf_counter() - start
    x64 = x.double().requires_grad_()
    ref, _ = nnrnn_recurrence(x64, W.double(), b.double(), h0.double(), nonlinearity="tanh")
    (ref_dx,) = torch.autograd.grad((ref * g.double()).sum(), x64)
    ref = ref.detach()
    out_err = (out.double() - ref).abs().amax(dim=(1, 2))
    dx_err = (dx.double() - ref_dx).abs().amax(dim=(1, 2)) / ref_dx.abs().amax(dim=(1, 2))
    return out_err, dx_err, UNIT_ROUNDOFF[dtype], seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="write the markdown table here too")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    header = ["| source | type | N, B | W, x | " + " | ".join(f"t = {s}" for s in STEPS) + " | max over t |",
              "| --- | --- | --- | --- | " + " | ".join("---" for _ in STEPS) + " | --- |"]
    forward = [f"T = {T}, tanh, inputs in the type (x, W, b, h0 rounded once), float64 reference on the",
               "same inputs. Forward: each cell is max |out - ref| over the batch and units at that step,",
               "and that error in units of u, the operand type's unit roundoff (2^-8 bfloat16, 2^-11",
               "float16 and TF32).", ""] + header
    backward = ["", "Backward (loss sum(out * g), g ~ N(0, 1)): each cell is max |dx - ref| / max |ref|",
                "at that step (dx = dL/dx_t), in u; the backward runs from t = 784 down to t = 1. The time",
                "column: forward and backward of the source.", ""]
    backward += [header[0] + " time |", header[1] + " --- |"]
    for source, B, N in (("emulation", 8, 32), ("model", 16, 512)):
        for name in DTYPES:
            for scale, x_scale in ((0.95, 1.0), (1.0, 1.0), (1.0, 0.0)):
                out_err, dx_err, u, seconds = run(source, name, B, N, scale, x_scale)
                case = f"| {source} | {name} | {N}, {B} | {scale} orth, {'N(0, 1)' if x_scale else '0'} | "
                cells = [f"{out_err[s - 1]:.1e} ({out_err[s - 1] / u:.1f} u)" for s in STEPS]
                worst = f" | {out_err.max():.1e} ({out_err.max() / u:.1f} u) |"
                forward.append(case + " | ".join(cells) + worst)
                cells = [f"{dx_err[s - 1] / u:.1f} u" for s in STEPS]
                backward.append(case + " | ".join(cells) + f" | {dx_err.max() / u:.1f} u | {seconds:.1f} s |")
                print(forward[-1], backward[-1], sep="\n", flush=True)
    text = "\n".join(forward + backward) + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(f"Command: python benchmarks/tc_accuracy.py --out {args.out} (torch {torch.__version__}, "
                    "CPU, one thread)\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
