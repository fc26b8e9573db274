"""CPU test of the CUDA kernels' logic.

The kernel bodies of csrc/cuda/kernels.h (v1) and kernels_v2.h (v2) and the host
driver of csrc/cuda/driver.h are compiled a second time against a host emulation of
the grid (csrc/cpu/host_grid.h: every GPU thread a host thread, real block, warp,
cluster and grid barriers, per-block shared memory poisoned with NaN, peers' shared
memory, mbarriers and step counters) and registered as
nnrnn_fused::emulated_recurrence[_backward] (v1, fallback) and
emulated_recurrence_v2[_backward]. Here they are compared with the reference loop
(nnrnn_fused.reference) and its autograd gradients, for several launch shapes:
v1 with uneven column slices, idle blocks, split dot products, several row tiles,
row groups; v2 (emulated with a register tile of 4 values of k by 2 columns and warps of 4 lanes)
with each exchange (block, cluster, grid), uneven column and row slices, warps whose
k-chunk comes from several producers, several teams and row tiles. What only a GPU
can show: docs/cuda.md.
"""
import re
from pathlib import Path

import pytest
import torch

import nnrnn_fused
from nnrnn_fused import _extension
from nnrnn_fused.reference import nnrnn_recurrence

pytestmark = pytest.mark.skipif(not _extension.LOADED, reason=f"extension not loaded: {_extension.LOAD_ERROR}")

NONLINEARITIES = ("modrelu", "tanh", "relu")
ROOT = Path(__file__).resolve().parent.parent

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
    # kernel v2: (exchange, team_blocks, teams, rows_per_tile); N = 7 is 2 chunks of k
    pytest.param(("block", 1, 3, 1), id="v2-block-row-per-team"),  # 3 single-block teams, 2 column warps
    pytest.param(("block", 1, 1, 1), id="v2-block-3tiles"),  # one team, a tile per row
    pytest.param(("cluster", 3, 1, 1), id="v2-cluster-uneven-cols"),  # columns 2,2,3: chunk 0 from 2 producers
    pytest.param(("cluster", 2, 2, 1), id="v2-cluster-teams"),  # rows 1,2 x columns 3,4
    pytest.param(("cluster", 7, 1, 3), id="v2-cluster-col-per-block"),  # a chunk from 4 producers
    pytest.param(("grid", 3, 1, 1), id="v2-grid-uneven-cols"),
    pytest.param(("grid", 2, 3, 1), id="v2-grid-teams"),  # 3 teams of 2 blocks
]


def emulated(x, W, b, h0, lengths, nl, launch):
    if isinstance(launch[0], str):  # kernel v2
        return torch.ops.nnrnn_fused.emulated_recurrence_v2(x, W, b, h0, lengths, nl, *launch)
    return torch.ops.nnrnn_fused.emulated_recurrence(x, W, b, h0, lengths, nl, *launch)


def emulated_backward(go, ghn, out, W, h0, lengths, nl, launch):
    if isinstance(launch[0], str):
        return torch.ops.nnrnn_fused.emulated_recurrence_v2_backward(go, ghn, out, W, h0, lengths, nl, *launch)
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
@pytest.mark.parametrize("launch", [
    pytest.param((2, 2, 16, 3, True), id="v1"),  # float32 state and accumulation, as for float16/bfloat16
    pytest.param(("block", 1, 2, 2), id="v2-block"),
    pytest.param(("cluster", 3, 2, 2), id="v2-cluster"),
    pytest.param(("grid", 3, 2, 1), id="v2-grid"),
])
@pytest.mark.parametrize("N", [9, 12])  # 12: whole 16-byte vectors per row (Grid copies them as such)
def test_matches_reference_float32(nl, launch, N):
    check_against_reference(6, 4, N, nl, True, True, launch, torch.float32, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("T,B,N,launch", [
    (1, 1, 1, (1, 1, 1, 1, True)),     # smallest case: a prologue and nothing else
    (3, 5, 2, (2, 2, 3, 2, True)),     # row groups of 2 and 3 rows, tiles of 2
    (4, 2, 13, (5, 1, 16, 2, True)),   # columns 2,3,2,3,3
    (6, 7, 5, (2, 3, 8, 2, True)),     # rows 2,2,3 x columns 2,3
    (2, 4, 3, (3, 1, 6, 4, False)),    # fallback, grid x threads > B x N
    (1, 1, 1, ("block", 1, 1, 1)),     # v2: one element, k padded to a chunk of 4
    (1, 2, 3, ("cluster", 3, 2, 1)),   # v2: one step, nothing exchanged
    (4, 2, 13, ("cluster", 5, 1, 2)),  # v2: columns 2,3,2,3,3; 4 chunks of k, the last padded
    (6, 7, 5, ("grid", 2, 3, 1)),      # v2: rows 2,2,3 x columns 2,3
    (5, 3, 8, ("grid", 3, 1, 1)),      # v2: rows of whole 16-byte vectors
    (5, 5, 12, ("grid", 3, 1, 2)),     # v2: tiles of 2,2,1 rows, whole vectors
    (3, 5, 9, ("cluster", 4, 2, 2)),   # v2: rows 2,3; 4 blocks of 2-3 columns
    (7, 9, 9, ("block", 1, 3, 2)),     # v2: teams of 3 rows in tiles of 2+1
    (5, 2, 40, ("cluster", 16, 1, 2)),  # v2: a cluster of 16, 10 chunks of k, 2-3 columns per block
])
def test_odd_shapes(T, B, N, launch):
    check_against_reference(T, B, N, "tanh", True, True, launch)


@pytest.mark.parametrize("launch", [(2, 1, 4, 2, True), (2, 1, 4, 2, False), ("cluster", 2, 1, 1)],
                         ids=["persistent", "fallback", "v2"])
def test_empty_sizes(launch):
    W = torch.randn(3, 3, dtype=torch.float64)
    h0 = torch.randn(2, 3, dtype=torch.float64)
    out, h_n = emulated(torch.zeros(0, 2, 3, dtype=torch.float64), W, None, h0, None, "tanh", launch)
    assert out.shape == (0, 2, 3) and torch.equal(h_n, h0)
    dx, dW, db, dh0 = emulated_backward(out, h0, out, W, h0, None, "tanh", launch)
    assert dx.shape == (0, 2, 3) and torch.equal(dh0, h0) and not dW.any() and not db.any()
    out, h_n = emulated(torch.zeros(4, 0, 3, dtype=torch.float64), W, None, None, None, "relu", launch)
    assert out.shape == (4, 0, 3) and h_n.shape == (0, 3)


@pytest.mark.parametrize("launch", [(3, 2, 32, 2, True), ("cluster", 3, 2, 1), ("grid", 3, 2, 1)],
                         ids=["v1", "v2-cluster", "v2-grid"])
def test_backward_is_deterministic(launch):
    x, W, b, h0, lengths, go, ghn = make_case(6, 3, 7, True, True, torch.float32, seed=3)
    out, _ = emulated(x, W, b, h0, lengths, "modrelu", launch)
    first = emulated_backward(go, ghn, out, W, h0, lengths, "modrelu", launch)
    for _ in range(2):
        again = emulated_backward(go, ghn, out, W, h0, lengths, "modrelu", launch)
        for a, b_ in zip(first, again):
            assert torch.equal(a, b_)


def test_persistent_and_fallback_agree():
    x, W, b, h0, lengths, go, ghn = make_case(5, 4, 6, True, True, torch.float32, seed=5)
    f = emulated(x, W, b, h0, lengths, "modrelu", (2, 1, 8, 1, False))
    for launch in [(3, 2, 8, 2, True), ("block", 1, 2, 1), ("cluster", 2, 2, 1), ("grid", 3, 1, 2)]:
        p = emulated(x, W, b, h0, lengths, "modrelu", launch)
        for a, b_ in zip(p, f):
            torch.testing.assert_close(a, b_, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("launch,kernel", [((3, 1, 8, 2, True), "the persistent kernel"),
                                           (("cluster", 3, 1, 1), "persistent kernel v2"),
                                           (("grid", 3, 1, 1), "persistent kernel v2")], ids=["v1", "v2-cluster", "v2-grid"])
def test_refused_cooperative_launch_takes_the_fallback(monkeypatch, capfd, launch, kernel):
    # A GPU refuses a cooperative launch whose blocks cannot all be resident (MPS, SMs held by
    # others), or a cluster launch it cannot place: the driver warns (TORCH_WARN: on stderr,
    # torch.ops calls do not turn it into a Python warning) and runs the fallback instead of
    # raising. Nothing ran: a result equal to the reference's comes from the fallback.
    monkeypatch.setenv("NNRNN_EMULATE_REFUSED_LAUNCH", "1")
    check_against_reference(5, 3, 7, "modrelu", True, True, launch)
    err = capfd.readouterr().err
    assert f"refused the cooperative launch of {kernel} (emulated refusal" in err or \
        f"refused the launch of {kernel} (emulated refusal" in err, err
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


def test_bad_v2_layouts_raise():
    x, W, b, h0, lengths, go, ghn = make_case(4, 3, 5, True, True)
    with pytest.raises(ValueError, match="exchange must be 'block', 'cluster' or 'grid'"):
        emulated(x, W, b, h0, lengths, "tanh", ("warp", 1, 1, 1))
    with pytest.raises(ValueError, match="one block per team"):
        emulated(x, W, b, h0, lengths, "tanh", ("block", 2, 1, 1))
    with pytest.raises(ValueError, match="must be >= 1"):
        emulated(x, W, b, h0, lengths, "tanh", ("grid", 2, 0, 1))
    with pytest.raises(RuntimeError, match="invalid kernel v2 layout"):
        emulated(x, W, b, h0, lengths, "tanh", ("cluster", 6, 1, 1))  # more blocks than columns
    with pytest.raises(RuntimeError, match="invalid kernel v2 layout"):
        emulated(x, W, b, h0, lengths, "tanh", ("grid", 2, 4, 1))  # more teams than rows
    with pytest.raises(RuntimeError, match="invalid kernel v2 layout"):
        emulated(x, W, b, h0, lengths, "tanh", ("block", 1, 1, 4))  # a tile of 4 x 5 elements, 8 threads


def test_cuda_path_reports_a_string():
    path = nnrnn_fused.cuda_path(128, 10, torch.float32)
    if not _extension.WITH_CUDA:
        assert path.startswith("unavailable: the extension was built without")
    elif not torch.cuda.is_available():
        assert path == "unavailable: no CUDA device is visible"
    else:
        assert path.startswith(("persistent v1: ", "persistent v2 ", "fallback: "))
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


# ------------------------------------------------------------------ the cost model's plan (csrc/cuda/plan.h)

def model(N, B, dtype=torch.float32, kernel="auto", **device):
    text, v = torch.ops.nnrnn_fused.model_plan(N, B, dtype, kernel, **device)
    keys = ["version", "exchange", "col_groups", "row_groups", "threads", "rows_per_tile"]
    plan = {k: int(x) for k, x in zip(keys, v)}
    plan["exchange"] = ["block", "cluster", "grid"][plan["exchange"]]
    plan["forward_us"], plan["backward_us"] = v[6], v[7]
    return text, plan


@pytest.mark.parametrize("N,B,dtype,exchange", [
    (128, 10, torch.float32, "block"),   # W (64 KB) in one block's registers: no exchange between blocks
    (256, 1, torch.float32, "cluster"),
    (512, 32, torch.float32, "cluster"),
    (1024, 128, torch.float32, "grid"),  # W (4 MB) fits no cluster
    (128, 10, torch.float64, "block"),
    (512, 32, torch.float64, "grid"),    # tiles of 3 rows: the exchange overlaps the other tiles
])
def test_model_takes_v2_where_it_predicts_it_faster(N, B, dtype, exchange):
    text, p = model(N, B, dtype)
    assert p["version"] == 2 and p["exchange"] == exchange, text
    assert text.startswith(f"persistent v2 {exchange}: ") and "us/step forward" in text
    _, v1 = model(N, B, dtype, "v1")
    assert v1["version"] == 1
    assert p["forward_us"] + p["backward_us"] < v1["forward_us"] + v1["backward_us"]


@pytest.mark.parametrize("N", [1, 5, 64, 300, 700, 1000, 1500])
@pytest.mark.parametrize("B", [1, 3, 64, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_model_plan_invariants(N, B, dtype):
    text, p = model(N, B, dtype)
    assert p["forward_us"] > 0 and p["backward_us"] > 0
    if p["version"] != 2:
        return
    C, G, threads, rt = p["col_groups"], p["row_groups"], p["threads"], p["rows_per_tile"]
    assert 1 <= C <= N and 1 <= G <= B and threads <= 1024 and threads % 32 == 0
    assert rt * -(-N // C) <= threads  # one element per thread and tile
    if p["exchange"] == "block":
        assert C == 1
    if p["exchange"] == "cluster":
        assert C in (2, 4, 8, 16)
    if p["exchange"] == "grid":
        assert C * G <= 132 * (2048 // threads)  # co-resident for the cooperative launch


def test_model_plan_takes_resident_clusters_from_the_device():
    # The CUDA side passes cudaOccupancyMaxActiveClusters per cluster size: 0 means that no cluster
    # of that size fits (no cluster plan), -1 that it is unknown (the model's estimate: SMs / size).
    _, estimated = model(512, 32, torch.float32)
    assert estimated["exchange"] == "cluster" and estimated["row_groups"] > 1
    text, none = model(512, 32, torch.float32, active_clusters=0)
    assert none["version"] in (1, 2) and none["exchange"] != "cluster", text
    assert none["forward_us"] + none["backward_us"] > estimated["forward_us"] + estimated["backward_us"]
    text, one = model(512, 32, torch.float32, active_clusters=1)  # clusters of 8: 16 teams in 16 waves
    assert one["exchange"] == "grid", text
    # 7 resident clusters: a cluster plan has at most 7 teams (one wave), and fewer resident clusters
    # never make a plan faster than with the estimate's 16
    text, seven = model(512, 32, torch.float32, active_clusters=7)
    assert seven["exchange"] != "cluster" or seven["row_groups"] <= 7, text
    assert seven["forward_us"] + seven["backward_us"] >= estimated["forward_us"] + estimated["backward_us"]
    _, small = model(128, 10, torch.float32, active_clusters=0)  # the block exchange needs no cluster
    assert small["version"] == 2 and small["exchange"] == "block"
    with pytest.raises(ValueError, match="active_clusters must be >= 0, or -1"):
        model(512, 32, torch.float32, active_clusters=-2)


def predicted_tables():
    """(file, N, B, dtype, kernel, forward, fwd+bwd) for each figure of the predicted tables in README.md
    (| N=.., B=.. | v2 fwd / fwd+bwd | target | v1 fwd / fwd+bwd |), docs/cuda.md
    (| N=.., B=..[, dtype] | plan | fwd | fwd + bwd | target | v1 fwd / fwd+bwd or empty |) and
    docs/tensor_cores.md (| [(]dtype, N = .., B = ..[)] | target | fwd / fwd+bwd | plan |; dtype
    "float32 as TF32" is float32 with TF32 allowed)."""
    rows = []
    for line in (ROOT / "docs/tensor_cores.md").read_text().splitlines():
        m = re.match(r"\| \(?(bfloat16|float16|float32 as TF32), N = (\d+), B = (\d+)\)? \|", line)
        if m:
            cells = [c.strip() for c in line.strip("|").split("|")]
            dtype = "float32 as TF32" if m[1].endswith("TF32") else m[1]
            rows.append(("docs/tensor_cores.md", int(m[2]), int(m[3]), dtype, "auto", *map(float, cells[2].split(" / "))))
    for name in ("README.md", "docs/cuda.md"):
        for line in (ROOT / name).read_text().splitlines():
            m = re.match(r"\| N=(\d+), B=(\d+)(?:, (float\d+))? \|", line)
            if not m:
                continue
            cells = [c.strip() for c in line.strip("|").split("|")]
            v2, v1 = (cells[1].split(" / "), cells[3]) if name == "README.md" else (cells[2:4], cells[5])
            case = (name, int(m[1]), int(m[2]), m[3] or "float32")
            rows.append((*case, "auto", *map(float, v2)))
            if v1:
                rows.append((*case, "v1", *map(float, v1.split(" / "))))
    return rows


def test_predicted_tables_are_the_models():
    # The predicted tables (README, docs/cuda.md, docs/tensor_cores.md) are copied from the model by hand: they must not drift.
    rows = predicted_tables()
    assert sum(r[0] == "README.md" for r in rows) == 8 and sum(r[0] == "docs/cuda.md" for r in rows) >= 14
    assert sum(r[0] == "docs/tensor_cores.md" for r in rows) == 5
    for name, N, B, dtype, kernel, forward, both in rows:
        tf32 = dtype == "float32 as TF32"
        _, p = model(N, B, torch.float32 if tf32 else getattr(torch, dtype), kernel, allow_tf32=tf32)
        case = f"{name}: N={N} B={B} {dtype} {kernel}"
        assert forward == pytest.approx(p["forward_us"], abs=0.006), case
        assert both == pytest.approx(p["forward_us"] + p["backward_us"], abs=0.011), case  # a sum of rounded


@pytest.mark.parametrize("spec,exchange,C,G", [
    ("block:1", "block", 1, None), ("block:1x4", "block", 1, 4), ("cluster:2", "cluster", 2, None),
    ("cluster:16x1", "cluster", 16, 1), ("grid:2", "grid", 2, None), ("grid:8x2", "grid", 8, 2)])
@pytest.mark.parametrize("N,B,dtype,kernel", [(64, 8, torch.float32, "v2"), (128, 16, torch.bfloat16, "tc")])
def test_team_layout_set_by_environment(monkeypatch, spec, exchange, C, G, N, B, dtype, kernel):
    # NNRNN_CUDA_TEAMS=<exchange>:<C>[x<G>]: the GPU check's exchange microbenchmark times kernel v2's and
    # the tensor-core kernel's exchanges one at a time; rows per tile (and KT) stay the model's.
    _, best = model(N, B, dtype, kernel)
    monkeypatch.setenv("NNRNN_CUDA_TEAMS", spec)
    text, p = model(N, B, dtype, kernel)
    assert p["version"] == (2 if kernel == "v2" else 3), text
    assert (p["exchange"], p["col_groups"]) == (exchange, C) and p["row_groups"] == (G or p["row_groups"]), text
    assert f"; layout set by NNRNN_CUDA_TEAMS={spec}; predicted" in text
    # one of the layouts the model chose among without the setting: never faster than its choice
    assert p["forward_us"] + p["backward_us"] >= best["forward_us"] + best["backward_us"] - 1e-9


def test_team_layout_set_by_environment_refusals(monkeypatch):
    monkeypatch.setenv("NNRNN_CUDA_TEAMS", "cluster:16")  # more blocks than columns: no such layout
    text, p = model(8, 4, torch.float32, "v2")
    assert p["version"] == 0 and "kernel v2: no layout fits NNRNN_CUDA_TEAMS=cluster:16" in text, text
    text, p = model(16, 4, torch.bfloat16, "tc")
    assert p["version"] == 0 and "tensor-core path: no layout fits NNRNN_CUDA_TEAMS=cluster:16" in text, text
    monkeypatch.setenv("NNRNN_CUDA_TEAMS", "grid:2x7")  # B = 10 has no 7 teams (rows 2 make 5, rows 1 make 10)
    assert model(64, 10, torch.float32, "v2")[1]["version"] == 0
    for bad, message in [("cluster", "must be <exchange>:<blocks per team>"), ("mesh:2", "must be <exchange>"),
                         ("cluster:4x0", "must be <exchange>"), ("grid:x2", "must be <exchange>"),
                         ("cluster:3", "clusters have 2, 4, 8 or 16 blocks"),
                         ("block:2", "the block exchange has one block per team"),
                         ("grid:1", "the grid exchange has 2 or more blocks per team")]:
        monkeypatch.setenv("NNRNN_CUDA_TEAMS", bad)
        with pytest.raises(ValueError, match=message):
            model(64, 8, torch.float32, "v2")


def test_model_plan_kernel_choice(monkeypatch):
    monkeypatch.setenv("NNRNN_CUDA_PLAN", "1x8")  # forces kernel v1's layout, hence v1
    text, p = model(32, 8, torch.float32)
    assert p["version"] == 1 and (p["col_groups"], p["row_groups"]) == (1, 8), text
    assert "; layout set by NNRNN_CUDA_PLAN=1x8; predicted" in text
    monkeypatch.delenv("NNRNN_CUDA_PLAN")
    text, p = model(512, 32, torch.float32, "v1")
    assert p["version"] == 1 and text.startswith("persistent v1: ")
    text, p = model(512, 32, torch.float16)  # float16/bfloat16: the tensor-core path (test_tc_emulation.py)
    assert p["version"] == 3, text
    text, p = model(512, 32, torch.float16, "v1")
    assert p["version"] == 1, text
    text, p = model(512, 32, torch.bfloat16, "v2")
    assert p["version"] == 0 and text.startswith("fallback: kernel v2 runs float32 and float64 only"), text
    text, p = model(4096, 8, torch.float32, "v2")  # 128 chunks of k: more than 512 threads per block
    assert p["version"] == 0 and "kernel v2: no team layout fits" in text, text
    text, p = model(3000, 4, torch.float32)
    assert p["version"] == 0 and "W does not fit on chip" in text, text
    with pytest.raises(ValueError, match="kernel must be 'auto', 'v1', 'v2' or 'tc'"):
        model(128, 10, torch.float32, "v3")
