"""The CUDA kernels on a GPU, against the float64 reference loop.

Skipped without a GPU or without the CUDA kernels; benchmarks/gpu_check.sh runs
them on a lent GPU. Every path is covered: persistent kernel v2 and v1 and the
tensor-core path (taken where they fit with NNRNN_CUDA_KERNEL=v2 / v1 / tc;
float16/bfloat16 have no v2, float32 takes tensor cores only with TF32 allowed and
float64 never: those take the fallback then) and the fallback (forced by
NNRNN_CUDA_FORCE_FALLBACK).
"""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import nnrnn_fused
from nnrnn_fused import NNRNN, _extension, fused_nnrnn
from nnrnn_fused.reference import nnrnn_recurrence

from helpers import relative_gradient_error

if not _extension.WITH_CUDA:
    pytestmark = pytest.mark.skip(reason="the CUDA kernels are not built (no CUDA toolkit or CPU-only torch)")
elif not torch.cuda.is_available():
    pytestmark = pytest.mark.skip(reason="no GPU: the CUDA kernels' logic is tested on the CPU by test_cuda_emulation.py")

NONLINEARITIES = ("modrelu", "tanh", "relu")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Largest error allowed, relative to the largest reference value (at least 1):
# float16/bfloat16 inputs and outputs with float32 state, rounded once per value.
FORWARD_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


@pytest.fixture(autouse=True)
def _watchdog(monkeypatch):
    # The grid barrier's deadlock watchdog (docs/cuda.md): a deadlock becomes an error within 10 s,
    # not a hang that eats the GPU window. benchmarks/gpu_check.sh sets its own value.
    if not os.environ.get("NNRNN_CUDA_WATCHDOG_MS"):
        monkeypatch.setenv("NNRNN_CUDA_WATCHDOG_MS", "10000")


@pytest.fixture(params=["v2", "v1", "tc", "fallback"])
def path(request, monkeypatch):
    if request.param == "fallback":
        monkeypatch.setenv("NNRNN_CUDA_FORCE_FALLBACK", "1")
    else:
        monkeypatch.delenv("NNRNN_CUDA_FORCE_FALLBACK", raising=False)
        monkeypatch.setenv("NNRNN_CUDA_KERNEL", request.param)
    return request.param


def assert_scaled_close(got, want, tol, name=""):
    got, want = got.double(), want.double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:g} x {scale:.3g}"


def make_case(T, B, N, dtype, with_h0, with_lengths, lengths_device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, N, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
    W = 0.95 * q  # stable over long sequences
    b = 0.1 * torch.randn(N, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, N, generator=g, dtype=torch.float64) if with_h0 else None
    lengths = torch.randint(0, T + 1, (B,), generator=g) if with_lengths else None
    if lengths is not None and B >= 2:
        lengths[0], lengths[1] = T, 0
    cast = lambda t: None if t is None else t.to("cuda", dtype)  # noqa: E731
    return cast(x), cast(W), cast(b), cast(h0), (None if lengths is None else lengths.to(lengths_device))


def check(T, B, N, dtype, nl, with_h0, with_lengths, lengths_device="cpu"):
    x, W, b, h0, lengths = make_case(T, B, N, dtype, with_h0, with_lengths, lengths_device)
    leaves = [t.requires_grad_() for t in (x, W, b) + ((h0,) if h0 is not None else ())]
    out, h_n = fused_nnrnn(x, W, b, h0, nonlinearity=nl, lengths=lengths)
    assert out.dtype == dtype and h_n.dtype == dtype
    go, ghn = torch.randn_like(out, dtype=torch.float64), torch.randn_like(h_n, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * go).sum() + (h_n.double() * ghn).sum(), leaves)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_h0 = ref_leaves[3] if h0 is not None else None
    ref_out, ref_hn = nnrnn_recurrence(*ref_leaves[:3], ref_h0, nonlinearity=nl, lengths=lengths)
    ref_grads = torch.autograd.grad((ref_out * go).sum() + (ref_hn * ghn).sum(), ref_leaves)

    assert_scaled_close(out, ref_out, FORWARD_TOL[dtype], "output")
    assert_scaled_close(h_n, ref_hn, FORWARD_TOL[dtype], "h_n")
    for name, got, want in zip(["grad_x", "grad_W", "grad_b", "grad_h0"], grads, ref_grads):
        assert_scaled_close(got, want, GRAD_TOL[dtype], name)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("nl", NONLINEARITIES)
@pytest.mark.parametrize("with_h0", [False, True], ids=["zero-h0", "h0"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_matches_reference(path, dtype, nl, with_h0, with_lengths):
    # N = 300 on an H100 (132 SMs): blocks own 2 or 3 columns
    check(17, 5, 300, dtype, nl, with_h0, with_lengths)


@pytest.mark.parametrize("T,B,N", [(1, 1, 1), (3, 7, 33), (5, 70, 129), (9, 3, 1024), (4, 130, 260)])
def test_odd_and_large_shapes(path, T, B, N):
    check(T, B, N, torch.float32, "modrelu", True, True)


def test_lengths_on_device_match_lengths_on_cpu(path):
    x, W, b, h0, lengths = make_case(11, 6, 64, torch.float32, True, True)
    cpu = fused_nnrnn(x, W, b, h0, nonlinearity="tanh", lengths=lengths)
    dev = fused_nnrnn(x, W, b, h0, nonlinearity="tanh", lengths=lengths.cuda())
    for a, c in zip(cpu, dev):
        assert torch.equal(a, c)


def test_cuda_path_reports_every_path(monkeypatch):
    monkeypatch.delenv("NNRNN_CUDA_FORCE_FALLBACK", raising=False)
    monkeypatch.delenv("NNRNN_CUDA_KERNEL", raising=False)
    v2 = nnrnn_fused.cuda_path(1024, 128, torch.float32)  # the minimum
    assert v2.startswith("persistent v2 ") and "us/step forward" in v2, v2
    half = nnrnn_fused.cuda_path(512, 100, torch.bfloat16)
    assert half.startswith("persistent tensor cores "), half  # docs/tensor_cores.md
    monkeypatch.setenv("NNRNN_CUDA_KERNEL", "v1")
    v1 = nnrnn_fused.cuda_path(1024, 128, torch.float32)
    assert v1.startswith("persistent v1: "), v1
    monkeypatch.setenv("NNRNN_CUDA_KERNEL", "v3")
    with pytest.raises(ValueError, match="NNRNN_CUDA_KERNEL must be 'auto', 'v1', 'v2' or 'tc'"):
        nnrnn_fused.cuda_path(1024, 128, torch.float32)
    monkeypatch.delenv("NNRNN_CUDA_KERNEL")
    big = nnrnn_fused.cuda_path(1 << 15, 8, torch.float32)
    assert big.startswith("fallback: ") and "W does not fit on chip" in big, big
    assert nnrnn_fused.cuda_path(3, 0, torch.float32).startswith("empty")
    monkeypatch.setenv("NNRNN_CUDA_FORCE_FALLBACK", "1")
    assert nnrnn_fused.cuda_path(128, 10, torch.float32).startswith("fallback: forced by NNRNN_CUDA_FORCE_FALLBACK")


@pytest.mark.parametrize("N,B,exchange", [(128, 10, "block"), (256, 1, "cluster"), (512, 32, "cluster"),
                                          (1024, 128, "grid")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_v2_on_the_compass_shapes(monkeypatch, N, B, exchange, dtype):
    # The exchange the model picks on an H100 (model_plan); the device's own figures may pick another.
    monkeypatch.delenv("NNRNN_CUDA_FORCE_FALLBACK", raising=False)
    monkeypatch.setenv("NNRNN_CUDA_KERNEL", "v2")
    path = nnrnn_fused.cuda_path(N, B, dtype)
    assert path.startswith("persistent v2 "), path
    print(f"N={N} B={B} {dtype}: {path} (the H100 model: {exchange})")
    check(7, B, N, dtype, "modrelu", True, True)


def test_cuda_path_names_the_kernel_version_and_plan(monkeypatch):
    monkeypatch.delenv("NNRNN_CUDA_FORCE_FALLBACK", raising=False)
    monkeypatch.delenv("NNRNN_CUDA_PLAN", raising=False)
    monkeypatch.setenv("NNRNN_CUDA_KERNEL", "v1")
    props = torch.cuda.get_device_properties(0)
    cols, rows, tile, shared = torch.ops.nnrnn_fused.emulated_plan(
        512, 32, torch.float32, props.multi_processor_count, props.shared_memory_per_block_optin, 512)
    assert nnrnn_fused.cuda_path(512, 32, torch.float32).startswith(
        f"persistent v1: {cols} x {rows} blocks (column x row groups) of 512 threads, {tile} rows per tile, "
        f"{shared} bytes of shared memory per block; predicted ")


def test_plan_override_sets_the_grid(monkeypatch):
    monkeypatch.delenv("NNRNN_CUDA_FORCE_FALLBACK", raising=False)
    monkeypatch.setenv("NNRNN_CUDA_PLAN", "3x4")
    path = nnrnn_fused.cuda_path(40, 10, torch.float32)
    assert path.startswith("persistent v1: 3 x 4 blocks") and "; layout set by NNRNN_CUDA_PLAN=3x4; predicted" in path, path
    check(6, 10, 40, torch.float32, "tanh", True, True)
    monkeypatch.setenv("NNRNN_CUDA_PLAN", "3 by 4")
    with pytest.raises(ValueError, match="NNRNN_CUDA_PLAN must be"):
        nnrnn_fused.cuda_path(40, 10, torch.float32)


# Every exchange of kernel v2 and the tensor-core kernel, forced (NNRNN_CUDA_TEAMS, as the GPU check's
# exchange microbenchmark forces them), against the reference: two teams, several tiles where they fit.
@pytest.mark.parametrize("teams", ["block:1x2", "cluster:2x2", "cluster:16x2", "grid:2x2", "grid:16x2"])
@pytest.mark.parametrize("kernel,dtype", [("v2", torch.float32), ("v2", torch.float64), ("tc", torch.bfloat16),
                                          ("tc", torch.float16)], ids=["v2-float32", "v2-float64", "tc-bfloat16",
                                                                       "tc-float16"])
def test_every_exchange_forced(monkeypatch, teams, kernel, dtype):
    monkeypatch.delenv("NNRNN_CUDA_FORCE_FALLBACK", raising=False)
    monkeypatch.setenv("NNRNN_CUDA_KERNEL", kernel)
    monkeypatch.setenv("NNRNN_CUDA_TEAMS", teams)
    N, B = 96, 40
    path = nnrnn_fused.cuda_path(N, B, dtype)
    exchange, team_blocks = teams.split(":")[0], teams.split(":")[1].split("x")[0]
    assert path.startswith(f"persistent {'v2' if kernel == 'v2' else 'tensor cores'}") and f" {exchange}: 2 teams x " \
        f"{team_blocks} blocks" in path and f"layout set by NNRNN_CUDA_TEAMS={teams}" in path, path
    check(9, B, N, dtype, "modrelu", True, True)


# The tensor-core path (docs/tensor_cores.md) on the target shapes, and the
# exchange the model picks for them on an H100 (the device's figures may pick another).
@pytest.mark.parametrize("N,B,dtype", [(768, 16, torch.float16), (1024, 128, torch.bfloat16),
                                       (512, 32, torch.bfloat16), (128, 10, torch.bfloat16)])
def test_tensor_cores_on_the_target_shapes(monkeypatch, N, B, dtype):
    monkeypatch.delenv("NNRNN_CUDA_FORCE_FALLBACK", raising=False)
    monkeypatch.delenv("NNRNN_CUDA_KERNEL", raising=False)
    path = nnrnn_fused.cuda_path(N, B, dtype)
    assert path.startswith("persistent tensor cores "), path
    print(f"N={N} B={B} {dtype}: {path}")
    check(7, B, N, dtype, "modrelu", True, True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_tensor_cores_over_784_steps(monkeypatch, dtype):
    # As tests/test_tc_emulation.py checks in the emulation: within 3 u of the float64
    # loop at every step (u: 2^-8 bfloat16, 2^-11 float16), N = 512, B = 32, tanh.
    monkeypatch.delenv("NNRNN_CUDA_FORCE_FALLBACK", raising=False)
    monkeypatch.setenv("NNRNN_CUDA_KERNEL", "tc")
    T, B, N = 784, 32, 512
    x, W, b, h0, _ = make_case(T, B, N, dtype, True, False)
    assert nnrnn_fused.cuda_path(N, B, dtype).startswith("persistent tensor cores ")
    out, _ = fused_nnrnn(x, W, b, h0, nonlinearity="tanh")
    ref, _ = nnrnn_recurrence(x.double(), W.double(), b.double(), h0.double(), nonlinearity="tanh")
    err = (out.double() - ref).abs().amax(dim=(1, 2))
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    print(f"{dtype}: max error {err.max().item() / u:.2f} u; at steps 1, 10, 100, 784: "
          f"{[round(err[t].item() / u, 2) for t in (0, 9, 99, 783)]} u")
    assert err.max().item() <= 3 * u


def test_tensor_cores_for_float32_only_with_tf32(monkeypatch):
    monkeypatch.delenv("NNRNN_CUDA_FORCE_FALLBACK", raising=False)
    monkeypatch.setenv("NNRNN_CUDA_KERNEL", "tc")
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert "allow_tf32" in nnrnn_fused.cuda_path(512, 32, torch.float32)
        torch.backends.cuda.matmul.allow_tf32 = True
        assert nnrnn_fused.cuda_path(512, 32, torch.float32).startswith("persistent tensor cores ")
        x, W, b, h0, lengths = make_case(9, 32, 512, torch.float32, True, True)
        out, h_n = fused_nnrnn(x, W, b, h0, nonlinearity="tanh", lengths=lengths)
        ref, ref_hn = nnrnn_recurrence(x.double(), W.double(), b.double(), h0.double(), nonlinearity="tanh",
                                       lengths=lengths)
        tol = 4 * 2.0**-11  # TF32's unit roundoff u = 2^-11; the CPU model measured up to 2.5 u at N = 512
        assert_scaled_close(out, ref, tol, "output (TF32)")
        assert_scaled_close(h_n, ref_hn, tol, "h_n (TF32)")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_fallback_when_w_does_not_fit(monkeypatch):
    monkeypatch.delenv("NNRNN_CUDA_FORCE_FALLBACK", raising=False)
    N = 3000  # a block's 23 columns of W take 276 KB; H100/H200 blocks get at most 227 KB
    assert nnrnn_fused.cuda_path(N, 2, torch.float32).startswith("fallback")
    check(3, 2, N, torch.float32, "tanh", True, False)


@pytest.mark.parametrize("nl", NONLINEARITIES)
def test_gradcheck_float64(path, nl):
    x, W, b, h0, lengths = make_case(4, 3, 6, torch.float64, True, True)
    x = x + 0.1 * torch.sign(x)  # keep modReLU/ReLU kinks away from the finite differences
    inputs = tuple(t.requires_grad_() for t in (x, W, b, h0))
    assert torch.autograd.gradcheck(lambda *a: fused_nnrnn(*a, nonlinearity=nl, lengths=lengths), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backward_is_bitwise_deterministic(path, dtype):
    x, W, b, h0, lengths = make_case(25, 33, 200, dtype, True, True)
    out, h_n = fused_nnrnn(x, W, b, h0, nonlinearity="modrelu", lengths=lengths)
    go, ghn = torch.randn_like(out), torch.randn_like(h_n)
    first = torch.ops.nnrnn_fused.recurrence_backward(go, ghn, out, W, h0, lengths, "modrelu")
    for _ in range(3):
        again = torch.ops.nnrnn_fused.recurrence_backward(go, ghn, out, W, h0, lengths, "modrelu")
        for a, c in zip(first, again):
            assert torch.equal(a, c)


def test_cuda_graph_capture(path):
    T, B, N, nl = 12, 4, 96, "modrelu"
    x, W, b, h0, lengths = make_case(T, B, N, torch.float32, True, True, lengths_device="cuda")
    go, ghn = torch.randn(T, B, N, device="cuda"), torch.randn(B, N, device="cuda")

    def run():
        out, h_n = torch.ops.nnrnn_fused.recurrence(x, W, b, h0, lengths, nl)
        return (out, h_n) + tuple(torch.ops.nnrnn_fused.recurrence_backward(go, ghn, out, W, h0, lengths, nl))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    # new data into the captured inputs, then replay
    x.copy_(torch.randn_like(x))
    lengths.copy_(torch.tensor([T, 0, 5, 9], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, run()):  # cuBLAS may pick another algorithm inside a capture
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cpu_lengths_refused_during_capture():
    x, W, b, h0, lengths = make_case(5, 2, 16, torch.float32, True, True)
    fused_nnrnn(x, W, b, h0, lengths=lengths)  # warm-up: plan, allocator
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(side):
        graph.capture_begin()
        try:
            with pytest.raises(ValueError, match="while capturing a CUDA graph"):
                torch.ops.nnrnn_fused.recurrence(x, W, b, h0, lengths, "tanh")
        finally:
            graph.capture_end()


def test_empty_sizes(path):
    W = torch.randn(4, 4, device="cuda")
    h0 = torch.randn(3, 4, device="cuda")
    out, h_n = fused_nnrnn(torch.zeros(0, 3, 4, device="cuda"), W, None, h0)
    assert out.shape == (0, 3, 4) and torch.equal(h_n, h0)
    out, h_n = fused_nnrnn(torch.zeros(5, 0, 4, device="cuda"), W)
    assert out.shape == (5, 0, 4) and h_n.shape == (0, 4)


def test_noncontiguous_inputs(path):
    x, W, b, h0, _ = make_case(6, 4, 40, torch.float32, True, False)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    ref = fused_nnrnn(x, W.t().contiguous().t(), b, h0, nonlinearity="relu")
    got = fused_nnrnn(xt, W, b, h0, nonlinearity="relu")
    for a, c in zip(ref, got):
        assert torch.equal(a, c)


@pytest.mark.parametrize("n", [128, 512])
def test_float32_gradient_of_P_is_accurate_on_cuda(n):
    """The eigendecomposition route for P (cuSOLVER here) as accurate as on the CPU."""
    assert relative_gradient_error(n, torch.float32, device="cuda") < 5e-6


LOW = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: str(d).replace("torch.", ""))
def test_op_under_autocast_runs_the_low_precision_kernels(path, dtype):
    """Under autocast the op casts x, W, b and h0 to the autocast dtype and runs the
    float16/bfloat16 kernels (tested against float64 above): bitwise what explicit casts
    give, forward and gradients, which reach the float32 W, b and h0 through the casts."""
    x, W, b, h0, lengths = make_case(13, 4, 96, torch.float32, True, True)
    leaves = [x.to(dtype).requires_grad_()] + [t.requires_grad_() for t in (W, b, h0)]  # x as an autocast Linear gives it
    with torch.autocast("cuda", dtype=dtype):
        out, h_n = fused_nnrnn(*leaves, nonlinearity="modrelu", lengths=lengths)
    assert out.dtype == h_n.dtype == dtype
    go, ghn = torch.randn_like(out), torch.randn_like(h_n)
    grads = torch.autograd.grad((out * go).sum() + (h_n * ghn).sum(), leaves)
    assert [g.dtype for g in grads] == [dtype, torch.float32, torch.float32, torch.float32]

    explicit = [t.detach().requires_grad_() for t in leaves]
    out_e, h_n_e = fused_nnrnn(explicit[0], *(t.to(dtype) for t in explicit[1:]), nonlinearity="modrelu",
                               lengths=lengths)
    grads_e = torch.autograd.grad((out_e * go).sum() + (h_n_e * ghn).sum(), explicit)
    assert torch.equal(out, out_e) and torch.equal(h_n, h_n_e)
    for got, want in zip(grads, grads_e):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: str(d).replace("torch.", ""))
def test_layer_trains_under_autocast(dtype):
    torch.manual_seed(0)
    kw = dict(num_layers=2, bidirectional=True, nonlinearity="tanh", device="cuda")
    layer = NNRNN(16, 64, **kw)
    x, lengths = torch.randn(20, 5, 16, device="cuda"), torch.tensor([20, 3, 11, 0, 7])
    with torch.autocast("cuda", dtype=dtype):
        out, h_n = layer(x, lengths=lengths)
        loss = out.float().square().mean() + h_n.float().sum()
    loss.backward()
    assert out.dtype == h_n.dtype == dtype
    for name, p in layer.named_parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
    ref = NNRNN(16, 64, **kw, backend="reference", dtype=torch.float64)
    ref.load_state_dict(layer.state_dict())
    ref_out, ref_hn = ref(x.double(), lengths=lengths)
    # the same casts emulated on the CPU in float64 (5 seeds) were at most 2.3e-3 (float16) and
    # 1.8e-2 (bfloat16) off the float64 layer
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    assert_scaled_close(out, ref_out, tol, "output")
    assert_scaled_close(h_n, ref_hn, tol, "h_n")


def test_vmap_folds_into_the_batch(path):
    x, W, b, _, _ = make_case(9, 12, 64, torch.float32, False, False)
    xs = x.unflatten(1, (3, 4))  # (T, 3, 4, N): vmap over dim 1
    out, h_n = torch.func.vmap(lambda x: fused_nnrnn(x, W, b, nonlinearity="tanh"), in_dims=1)(xs)
    want, want_h = fused_nnrnn(x, W, b, nonlinearity="tanh")
    torch.testing.assert_close(out, want.unflatten(1, (3, 4)).movedim(1, 0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_n, want_h.unflatten(0, (3, 4)), rtol=1e-5, atol=1e-6)


WATCHDOG_SCRIPT = textwrap.dedent("""
    import torch
    import nnrnn_fused
    assert nnrnn_fused.cuda_path(512, 32, torch.float32).startswith("persistent")
    x = torch.randn(2000, 32, 512, device="cuda")
    W = 0.03 * torch.randn(512, 512, device="cuda")
    nnrnn_fused.fused_nnrnn(x, W)
    torch.cuda.synchronize()
    print("no trap")
""")


def test_watchdog_traps_a_long_barrier_wait():
    # A bound of 1 ns: the first block to wait at a grid barrier (of 2000, ~100 blocks) traps,
    # as a deadlocked one would after the real bound. The CUDA context is lost: a subprocess.
    env = dict(os.environ, NNRNN_CUDA_WATCHDOG_MS="0.000001")
    env.pop("NNRNN_CUDA_FORCE_FALLBACK", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", WATCHDOG_SCRIPT], capture_output=True, text=True, timeout=120,
                          cwd=root, env=env)
    assert proc.returncode != 0 and "no trap" not in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "launch failure" in proc.stderr or "illegal instruction" in proc.stderr, proc.stderr[-2000:]


def test_watchdog_setting_is_checked(monkeypatch):
    monkeypatch.delenv("NNRNN_CUDA_FORCE_FALLBACK", raising=False)
    x, W, b, h0, _ = make_case(4, 2, 16, torch.float32, True, False)
    monkeypatch.setenv("NNRNN_CUDA_WATCHDOG_MS", "soon")
    with pytest.raises(ValueError, match="NNRNN_CUDA_WATCHDOG_MS must be a number of milliseconds"):
        fused_nnrnn(x, W, b, h0)
    monkeypatch.setenv("NNRNN_CUDA_WATCHDOG_MS", "0")  # off
    fused_nnrnn(x, W, b, h0)


def compute_sanitizer():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = os.path.join(home, "bin", "compute-sanitizer")
    return candidate if os.path.exists(candidate) else None


@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer(tool):
    sanitizer = compute_sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found (CUDA_HOME/bin or PATH)")
    # every kernel of the small case (both paths, h0, lengths, backward) is checked, torch's too;
    # benchmarks/gpu_check.sh runs the same case with only ours instrumented, to fit its window
    cmd = [sanitizer, "--tool", tool, "--error-exitcode", "99", sys.executable, "-m", "benchmarks.gpu_phases",
           "sanitizer-case"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
    report = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, report
    assert "sanitizer case done" in proc.stdout, report
    assert "ERROR SUMMARY: 0 errors" in report or "0 hazards" in report, report
