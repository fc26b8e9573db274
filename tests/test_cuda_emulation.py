"""CPU test of the CUDA kernels' logic.

The kernel bodies of csrc/cuda/kernels.h and the host driver of csrc/cuda/driver.h
are compiled a second time against a host emulation of the grid (csrc/cpu/host_grid.h:
every GPU thread a host thread, real block and grid barriers, per-block shared
memory poisoned with NaN) and registered as nnrnn_fused::emulated_recurrence[_backward].
Here they are compared with the reference loop (nnrnn_fused.reference) and its
autograd gradients, for several launch shapes, including blocks that own uneven
column slices, blocks that own none, dot products split over threads, and
several row tiles per step, row groups (blocks owning a part of the batch). What only a GPU can show: docs/cuda.md.
"""
import pytest
import torch

import nnrnn_fused
from nnrnn_fused import _extension
from nnrnn_fused.reference import nnrnn_recurrence

pytestmark = pytest.mark.skipif(not _extension.LOADED, reason=f"extension not loaded: {_extension.LOAD_ERROR}")

NONLINEARITIES = ("modrelu", "tanh", "relu")

# (col_groups, row_groups, threads, rows_per_tile, persistent) for N = 7, B = 3:
LAUNCHES = [
    pytest.param((3, 1, 8, 2, True), id="persistent-uneven-cols-2tiles"),  # columns 2,2,3; tiles of 2+1 rows
    pytest.param((2, 1, 32, 3, True), id="persistent-ksplit"),  # 12 outputs per tile, 2 threads per dot product
    pytest.param((1, 1, 5, 1, True), id="persistent-one-block"),  # one block owns everything; 3 tiles
    pytest.param((9, 1, 4, 3, True), id="persistent-idle-cols"),  # more column groups than columns
    pytest.param((2, 2, 8, 1, True), id="persistent-row-groups"),  # rows 1,2 x columns 3,4
    pytest.param((1, 3, 16, 1, True), id="persistent-row-per-block"),  # all of W in each block, one row each
    pytest.param((3, 4, 4, 2, True), id="persistent-idle-rows"),  # more row groups than rows
    pytest.param((2, 1, 7, 1, False), id="fallback"),  # GEMM per step + pointwise kernel
]


def emulated(x, W, b, h0, lengths, nl, launch):
    return torch.ops.nnrnn_fused.emulated_recurrence(x, W, b, h0, lengths, nl, *launch)


def emulated_backward(go, ghn, out, W, h0, lengths, nl, launch):
    return torch.ops.nnrnn_fused.emulated_recurrence_backward(go, ghn, out, W, h0, lengths, nl, *launch)


def make_case(T, B, N, with_h0, with_lengths, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, N, generator=g, dtype=dtype)
    W = torch.randn(N, N, generator=g, dtype=dtype) / N**0.5
    b = 0.3 * torch.randn(N, generator=g, dtype=dtype)
    h0 = torch.randn(B, N, generator=g, dtype=dtype) if with_h0 else None
    # one sequence of full length, one empty, the others in between
    lengths = torch.tensor([T, 0] + [(T * (i + 1)) // (B - 1) for i in range(B - 2)], dtype=torch.int64)[:B]
    go = torch.randn(T, B, N, generator=g, dtype=dtype)
    ghn = torch.randn(B, N, generator=g, dtype=dtype)
    return x, W, b, h0, (lengths if with_lengths else None), go, ghn


def reference_grads(x, W, b, h0, lengths, nl, go, ghn):
    leaves = [t.clone().requires_grad_() for t in (x, W, b)] + ([h0.clone().requires_grad_()] if h0 is not None else [])
    out, h_n = nnrnn_recurrence(*leaves[:3], leaves[3] if h0 is not None else None, nonlinearity=nl, lengths=lengths)
    grads = torch.autograd.grad((out * go).sum() + (h_n * ghn).sum(), leaves)
    return out.detach(), h_n.detach(), grads


def check_against_reference(T, B, N, nl, with_h0, with_lengths, launch, dtype=torch.float64, atol=1e-10, rtol=1e-9):
    x, W, b, h0, lengths, go, ghn = make_case(T, B, N, with_h0, with_lengths, dtype)
    ref_out, ref_hn, ref_grads = reference_grads(x, W, b, h0, lengths, nl, go, ghn)
    out, h_n = emulated(x, W, b, h0, lengths, nl, launch)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(h_n, ref_hn, atol=atol, rtol=rtol)
    dx, dW, db, dh0 = emulated_backward(go, ghn, out, W, h0, lengths, nl, launch)
    names = ["grad_x", "grad_W", "grad_b"] + (["grad_h0"] if with_h0 else [])
    for name, got, want in zip(names, (dx, dW, db, dh0), ref_grads):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    if not with_h0:  # dL/dh0 of a zero initial state is still defined: compare with the reference's
        h0z = torch.zeros(B, N, dtype=dtype, requires_grad=True)
        o, hn = nnrnn_recurrence(x, W, b, h0z, nonlinearity=nl, lengths=lengths)
        (want,) = torch.autograd.grad((o * go).sum() + (hn * ghn).sum(), [h0z])
        torch.testing.assert_close(dh0, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("nl", NONLINEARITIES)
@pytest.mark.parametrize("with_h0", [False, True], ids=["zero-h0", "h0"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_matches_reference_float64(launch, nl, with_h0, with_lengths):
    check_against_reference(5, 3, 7, nl, with_h0, with_lengths, launch)


@pytest.mark.parametrize("nl", NONLINEARITIES)
def test_matches_reference_float32(nl):
    # float32 state and accumulation, as for float16/bfloat16 on the GPU
    check_against_reference(6, 4, 9, nl, True, True, (2, 2, 16, 3, True), torch.float32, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("T,B,N,launch", [
    (1, 1, 1, (1, 1, 1, 1, True)),     # smallest case: a prologue and nothing else
    (3, 5, 2, (2, 2, 3, 2, True)),     # row groups of 2 and 3 rows, tiles of 2
    (4, 2, 13, (5, 1, 16, 2, True)),   # columns 2,3,2,3,3
    (6, 7, 5, (2, 3, 8, 2, True)),     # rows 2,2,3 x columns 2,3
    (2, 4, 3, (3, 1, 6, 4, False)),    # fallback, grid x threads > B x N
])
def test_odd_shapes(T, B, N, launch):
    check_against_reference(T, B, N, "tanh", True, True, launch)


@pytest.mark.parametrize("persistent", [True, False])
def test_empty_sizes(persistent):
    launch = (2, 1, 4, 2, persistent)
    W = torch.randn(3, 3, dtype=torch.float64)
    h0 = torch.randn(2, 3, dtype=torch.float64)
    out, h_n = emulated(torch.zeros(0, 2, 3, dtype=torch.float64), W, None, h0, None, "tanh", launch)
    assert out.shape == (0, 2, 3) and torch.equal(h_n, h0)
    dx, dW, db, dh0 = emulated_backward(out, h0, out, W, h0, None, "tanh", launch)
    assert dx.shape == (0, 2, 3) and torch.equal(dh0, h0) and not dW.any() and not db.any()
    out, h_n = emulated(torch.zeros(4, 0, 3, dtype=torch.float64), W, None, None, None, "relu", launch)
    assert out.shape == (4, 0, 3) and h_n.shape == (0, 3)


def test_backward_is_deterministic():
    x, W, b, h0, lengths, go, ghn = make_case(6, 3, 7, True, True, torch.float32, seed=3)
    launch = (3, 2, 32, 2, True)
    out, _ = emulated(x, W, b, h0, lengths, "modrelu", launch)
    first = emulated_backward(go, ghn, out, W, h0, lengths, "modrelu", launch)
    for _ in range(2):
        again = emulated_backward(go, ghn, out, W, h0, lengths, "modrelu", launch)
        for a, b_ in zip(first, again):
            assert torch.equal(a, b_)


def test_persistent_and_fallback_agree():
    x, W, b, h0, lengths, go, ghn = make_case(5, 4, 6, True, True, torch.float32, seed=5)
    p = emulated(x, W, b, h0, lengths, "modrelu", (3, 2, 8, 2, True))
    f = emulated(x, W, b, h0, lengths, "modrelu", (2, 1, 8, 1, False))
    for a, b_ in zip(p, f):
        torch.testing.assert_close(a, b_, atol=1e-6, rtol=1e-5)


def test_refused_cooperative_launch_takes_the_fallback(monkeypatch, capfd):
    # A GPU refuses a cooperative launch whose blocks cannot all be resident (MPS, SMs held by
    # others): the driver warns (TORCH_WARN: on stderr, torch.ops calls do not turn it into a Python
    # warning) and runs the fallback instead of raising. Nothing ran: a result equal to the
    # reference's comes from the fallback.
    monkeypatch.setenv("NNRNN_EMULATE_REFUSED_LAUNCH", "1")
    check_against_reference(5, 3, 7, "modrelu", True, True, (3, 1, 8, 2, True))
    err = capfd.readouterr().err
    assert "refused the cooperative launch of the persistent kernel (emulated refusal" in err, err
    assert "take the fallback path" in err


def test_bad_arguments_raise_value_errors():
    x, W, b, h0, lengths, go, ghn = make_case(4, 3, 5, True, True)
    with pytest.raises(ValueError, match="nonlinearity"):
        emulated(x, W, b, h0, lengths, "sigmoid", (2, 1, 4, 2, True))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T\]"):
        emulated(x, W, b, h0, torch.tensor([1, 5, 2]), "tanh", (2, 1, 4, 2, True))
    with pytest.raises(ValueError, match="must be >= 1"):
        emulated(x, W, b, h0, None, "tanh", (2, 0, 4, 2, True))
    with pytest.raises(ValueError, match="W must have shape"):
        emulated(x, W[:4], b, h0, None, "tanh", (2, 1, 4, 2, True))


def test_cuda_path_reports_a_string():
    path = nnrnn_fused.cuda_path(128, 10, torch.float32)
    if not _extension.WITH_CUDA:
        assert path.startswith("unavailable: the extension was built without")
    elif not torch.cuda.is_available():
        assert path == "unavailable: no CUDA device is visible"
    else:
        assert path.startswith(("persistent", "fallback: "))
    with pytest.raises(ValueError, match="unsupported dtype"):
        nnrnn_fused.cuda_path(128, 10, torch.int32)
    with pytest.raises(ValueError, match="must be a CUDA device"):
        nnrnn_fused.cuda_path(128, 10, torch.float32, "cpu")


# ------------------------------------------------------------------ the choice of layout

H100 = dict(sms=132, smem_bytes=232448, threads=512)  # per-block shared memory limit (opt-in) of an H100


def plan(N, B, dtype=torch.float32, sms=132, smem_bytes=232448, threads=512):
    return list(torch.ops.nnrnn_fused.emulated_plan(N, B, dtype, sms, smem_bytes, threads))


@pytest.mark.parametrize("N,B,dtype,expected", [
    (128, 10, torch.float32, [1, 10, 1]),     # copy task: all of W in each block, a row per block
    (512, 100, torch.float32, [5, 26, 4]),    # psMNIST
    (1024, 128, torch.float32, [22, 6, 8]),   # PTB: the N = 1024 in float32 fits
    (768, 16, torch.float16, [11, 12, 2]),    # float16 carries float32 W and state
    (1024, 128, torch.float64, [54, 2, 8]),
])
def test_plan_on_an_h100(N, B, dtype, expected):
    p = plan(N, B, dtype, **H100)
    assert p[:3] == expected
    assert p[3] <= H100["smem_bytes"]


def test_plan_set_by_environment(monkeypatch):
    # NNRNN_CUDA_PLAN=<col_groups>x<row_groups>: the grid barrier's microbenchmark (gpu_check.sh)
    monkeypatch.setenv("NNRNN_CUDA_PLAN", "1x8")
    assert plan(32, 8, **H100)[:3] == [1, 8, 1]
    monkeypatch.setenv("NNRNN_CUDA_PLAN", "8x2")  # 64 columns of W: 43 rows of 577 fit beside them, of 50
    assert plan(512, 100, **H100)[:3] == [8, 2, 43]
    monkeypatch.setenv("NNRNN_CUDA_PLAN", "1x1")
    with pytest.raises(ValueError, match=r"NNRNN_CUDA_PLAN=1x1: a block's slice of W \(3000 x 3000\)"):
        plan(3000, 4, **H100)
    for bad in ("eight", "1x", "0x4", "2x3x4"):
        monkeypatch.setenv("NNRNN_CUDA_PLAN", bad)
        with pytest.raises(ValueError, match="NNRNN_CUDA_PLAN must be <col_groups>x<row_groups>"):
            plan(32, 8, **H100)


def test_plan_falls_back_when_w_does_not_fit():
    assert plan(3000, 4, torch.float32, **H100) == []  # a block's 23 columns of W: 276 KB
    assert plan(2000, 4, torch.float64, **H100) == []
    assert plan(2048, 4, torch.float32, **H100) != []


@pytest.mark.parametrize("N", [1, 5, 64, 300, 1000, 2500])
@pytest.mark.parametrize("B", [1, 3, 64, 1000])
def test_plan_invariants(N, B):
    p = plan(N, B, torch.float32, **H100)
    if not p:
        return
    col_groups, row_groups, rows, shared = p
    assert 1 <= col_groups <= N and 1 <= row_groups <= B
    assert col_groups * row_groups <= H100["sms"]  # one block per SM: co-residency is possible
    assert 1 <= rows <= 64 and shared <= H100["smem_bytes"]


@pytest.mark.parametrize("sms,smem_bytes", [(6, 1200), (4, 2500), (3, 1300), (8, 100000)])
def test_planned_layouts_compute_the_reference(sms, smem_bytes):
    # small simulated devices: the planned shapes (several column and row groups) run correctly
    T, B, N = 4, 5, 12
    p = plan(N, B, torch.float64, sms=sms, smem_bytes=smem_bytes, threads=16)
    assert p, "expected W to fit"
    col_groups, row_groups, rows, _ = p
    check_against_reference(T, B, N, "tanh", True, True, (col_groups, row_groups, 16, rows, True))
