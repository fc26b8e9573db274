"""CPU test of the tensor-core path (csrc/cuda/tc_kernels.h, mma.h).

The kernel body is compiled a second time against the host emulation of the grid
(csrc/cpu/host_grid.h), with mma.sync emulated per lane from NVIDIA's fragment
layouts (csrc/cuda/mma.h), and registered as nnrnn_fused::emulated_recurrence_tc
[_backward]. It runs float16 and bfloat16 CPU tensors (and float32 as TF32), so the
same instantiations as on the GPU but with 1 or 2 instructions along k per warp
(the GPU's 8 and 16 run the same code), so that small N has several k-chunks.

Compared with (a) nnrnn_recurrence_rounded, the model of the same numerics
(operands rounded, float32 state and sums), where only the order of the float32
sums differs: agreement to about one rounding of the output type; and (b) the
float64 reference loop, at tolerances scaled to the operand type, over T = 784.
"""
import pytest
import torch

from nnrnn_fused import _extension
from nnrnn_fused.reference import nnrnn_recurrence, nnrnn_recurrence_rounded

pytestmark = pytest.mark.skipif(not _extension.LOADED, reason=f"extension not loaded: {_extension.LOAD_ERROR}")

OPERANDS = {torch.bfloat16: torch.bfloat16, torch.float16: torch.float16, torch.float32: "tf32"}
# Half of a unit in the last place at 1 (the unit roundoff): one rounding of the output type, of the operand type.
HALF_ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
OPERAND_HALF_ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-11}

# (exchange, team_blocks, teams, rows_per_tile, kt) for N = 37, B = 11 (kt 1: k-chunks
# of 16; N = 37 is 3 chunks, the last one padded; columns in even slices)
LAYOUTS = [
    pytest.param(("block", 1, 1, 8, 1), id="block-one-team-2tiles"),  # rows 8 + 3: two row tiles
    pytest.param(("block", 1, 2, 16, 2), id="block-2teams-kt2"),  # rows 5 + 6, one tile each; 2 k-chunks
    pytest.param(("cluster", 3, 1, 16, 1), id="cluster-uneven-cols"),  # columns 12, 12, 13: a chunk from 2 producers
    pytest.param(("cluster", 2, 2, 8, 2), id="cluster-teams"),  # 2 teams x 2 blocks
    pytest.param(("cluster", 8, 1, 8, 2), id="cluster-8"),  # columns 4 or 6 per block: a chunk from 7 producers
    pytest.param(("cluster", 3, 3, 8, 2), id="cluster-teams-of-few-rows"),  # rows 3, 4, 4: one padded n-tile
    pytest.param(("grid", 3, 3, 8, 2), id="grid-teams-of-few-rows"),
    pytest.param(("grid", 3, 1, 8, 1), id="grid-uneven-cols"),
    pytest.param(("grid", 2, 2, 8, 2), id="grid-teams"),  # 2 teams of 2 blocks
]


def emulated(x, W, b, h0, lengths, nl, layout):
    return torch.ops.nnrnn_fused.emulated_recurrence_tc(x, W, b, h0, lengths, nl, *layout)


def emulated_backward(go, ghn, out, W, h0, lengths, nl, layout):
    return torch.ops.nnrnn_fused.emulated_recurrence_tc_backward(go, ghn, out, W, h0, lengths, nl, *layout)


def make_case(T, B, N, dtype, with_h0=True, with_lengths=True, scale=0.95, seed=0):
    """Inputs in `dtype` (their values are what both sides see); W a scaled orthogonal matrix."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, N, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
    b = 0.1 * torch.randn(N, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, N, generator=g, dtype=torch.float64) if with_h0 else None
    lengths = None
    if with_lengths:
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        lengths[0], lengths[1] = T, 0
    go = torch.randn(T, B, N, generator=g, dtype=torch.float64)
    ghn = torch.randn(B, N, generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(scale * q), cast(b), cast(h0), lengths, cast(go), cast(ghn)


def scaled_error(got, want):
    """max |got - want| / max(1, max |want|)."""
    got, want = got.double(), want.double()
    return (got - want).abs().max().item() / max(1.0, want.abs().max().item())


def model_grads(x, W, b, h0, lengths, nl, go, ghn, operand):
    """Forward and gradients of the rounded-operand model (float32 inputs holding the values)."""
    leaves = [t.float().requires_grad_() for t in (x, W, b) + ((h0,) if h0 is not None else ())]
    out, h_n = nnrnn_recurrence_rounded(*leaves[:3], leaves[3] if h0 is not None else None, nonlinearity=nl,
                                        lengths=lengths, operand_dtype=operand)
    grads = torch.autograd.grad((out * go.float()).sum() + (h_n * ghn.float()).sum(), leaves)
    return out, h_n, grads


def reference64_grads(x, W, b, h0, lengths, nl, go, ghn):
    leaves = [t.double().requires_grad_() for t in (x, W, b) + ((h0,) if h0 is not None else ())]
    out, h_n = nnrnn_recurrence(*leaves[:3], leaves[3] if h0 is not None else None, nonlinearity=nl, lengths=lengths)
    grads = torch.autograd.grad((out * go.double()).sum() + (h_n * ghn.double()).sum(), leaves)
    return out, h_n, grads


def emulated_matches_the_rounded_model(case, nl, layout, dtype):
    """The emulated kernels' forward and gradients, checked against the model of the same
    numerics: the float32 sums differ in order only, so a rounding may flip: about one
    rounding of the output apart, plus one of an operand (|W| <= 1); gradients a few of
    those apart (dW and db: sums over the batch and time)."""
    x, W, b, h0, lengths, go, ghn = case
    out, h_n = emulated(x, W, b, h0, lengths, nl, layout)
    assert out.dtype == dtype and h_n.dtype == dtype
    grads = emulated_backward(go, ghn, out, W, h0, lengths, nl, layout)
    m_out, m_hn, m_grads = model_grads(x, W, b, h0, lengths, nl, go, ghn, OPERANDS[dtype])
    tight = 2 * HALF_ULP[dtype] + OPERAND_HALF_ULP[dtype]
    assert scaled_error(out, m_out) <= tight
    assert scaled_error(h_n, m_hn) <= tight
    for name, got, want in zip(("grad_x", "grad_W", "grad_b", "grad_h0"), grads, m_grads):
        assert scaled_error(got, want) <= 8 * tight, name
    return out, h_n, grads


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "f16", "tf32"])
@pytest.mark.parametrize("nl", ["modrelu", "tanh", "relu"])
def test_matches_the_rounded_model_and_the_float64_reference(layout, dtype, nl):
    T, B, N = 5, 11, 37
    x, W, b, h0, lengths, go, ghn = case = make_case(T, B, N, dtype)
    # (a) the model of the same numerics
    out, h_n, (dx, dW, db, dh0) = emulated_matches_the_rounded_model(case, nl, layout, dtype)

    # (b) the float64 reference, at the operand type's scale
    r_out, r_hn, r_grads = reference64_grads(x, W, b, h0, lengths, nl, go, ghn)
    loose = 0.05 if dtype == torch.bfloat16 else 0.01
    assert scaled_error(out, r_out) <= loose
    assert scaled_error(h_n, r_hn) <= loose
    for name, got, want in zip(("grad_x", "grad_W", "grad_b", "grad_h0"), (dx, dW, db, dh0), r_grads):
        assert scaled_error(got, want) <= 4 * loose, name


@pytest.mark.parametrize("with_h0,with_lengths", [(False, False), (True, False), (False, True)])
def test_without_h0_or_lengths(with_h0, with_lengths):
    x, W, b, h0, lengths, go, ghn = make_case(4, 9, 20, torch.bfloat16, with_h0, with_lengths, seed=2)
    layout = ("cluster", 2, 1, 16, 1)
    out, h_n = emulated(x, W, b, h0, lengths, "tanh", layout)
    m_out, m_hn, _ = model_grads(x, W, b, h0, lengths, "tanh", go, ghn, torch.bfloat16)
    assert scaled_error(out, m_out) <= 3 * HALF_ULP[torch.bfloat16]
    dx, dW, db, dh0 = emulated_backward(go, ghn, out, W, h0, lengths, "tanh", layout)
    h0_or_zeros = h0 if h0 is not None else torch.zeros(9, 20, dtype=torch.bfloat16)
    _, _, r_grads = reference64_grads(x, W, b, h0_or_zeros, lengths, "tanh", go, ghn)
    for name, got, want in zip(("grad_x", "grad_W", "grad_b", "grad_h0"), (dx, dW, db, dh0), r_grads):
        assert scaled_error(got, want) <= 0.2, name  # dL/dh0 of a zero initial state is still defined


@pytest.mark.parametrize("exchange", ["block", "cluster", "grid"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "tf32"])
def test_three_tiles_a_step(exchange, dtype):
    # No block barrier between a tile's finish and the next tile's product, nor (Cluster)
    # after a step's last finish: two buffers of partial sums, the third tile of a step
    # back in the first one's; Grid, each tile published by the block's last warp.
    T, B, N = 6, 19, 37  # one team of 19 rows: tiles of 8, 8 and 3 rows
    layout = (exchange, 1 if exchange == "block" else 3, 1, 8, 1)
    emulated_matches_the_rounded_model(make_case(T, B, N, dtype, seed=5), "modrelu", layout, dtype)


def test_backward_is_deterministic():
    x, W, b, h0, lengths, go, ghn = make_case(5, 11, 37, torch.bfloat16, seed=3)
    layout = ("cluster", 3, 2, 8, 1)
    out, _ = emulated(x, W, b, h0, lengths, "modrelu", layout)
    first = emulated_backward(go, ghn, out, W, h0, lengths, "modrelu", layout)
    for _ in range(2):
        for a, b_ in zip(first, emulated_backward(go, ghn, out, W, h0, lengths, "modrelu", layout)):
            assert torch.equal(a, b_)


# Error growth over a long sequence (docs/tensor_cores.md, "Accuracy over T = 784"):
# T = 784, a tiny width (N = 32 over a cluster of 2, B = 8), tanh; W = 0.95 x
# orthogonal with x ~ N(0, 1), and W orthogonal with x = 0 (the state alone carries
# the sequence: nothing contracts errors but the nonlinearity). The bounds, checked
# at every step (u: the operand type's unit roundoff): forward 3 u - the output's own
# rounding is up to u |h| <= u, the operand roundings of earlier steps add what W and
# tanh carry over; backward (loss sum(out * g)) 4 u of each step's largest |dL/dx_t| -
# the same roundings of the carried gradient, plus the rounded outputs in tanh'.
# benchmarks/tc_accuracy.py measures at most 1.7 u forward and 2.9 u backward here, and
# no growth with the number of steps (benchmarks/results/tc_accuracy.md).
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("scale,x_scale", [(0.95, 1.0), (1.0, 0.0)], ids=["contracting", "state-only"])
def test_error_over_784_steps_forward_3u_backward_4u(dtype, scale, x_scale):
    T, B, N = 784, 8, 32
    x, W, b, h0, _, g, _ = make_case(T, B, N, dtype, with_lengths=False, scale=scale, seed=4)
    x = (x.double() * x_scale).to(dtype)
    layout = ("cluster", 2, 1, 8, 2)
    out, h_n = emulated(x, W, b, h0, None, "tanh", layout)
    dx = emulated_backward(g, torch.zeros_like(h_n), out, W, h0, None, "tanh", layout)[0]
    x64 = x.double().requires_grad_()
    ref, ref_hn = nnrnn_recurrence(x64, W.double(), b.double(), h0.double(), nonlinearity="tanh")
    (ref_dx,) = torch.autograd.grad((ref * g.double()).sum(), x64)
    u = HALF_ULP[dtype]  # the unit roundoff: half a unit in the last place at 1
    err = (out.double() - ref.detach()).abs().amax(dim=(1, 2))  # per step; |h| < 1 (tanh)
    assert err.max().item() <= 3 * u, f"max error {err.max().item() / u:.2f} u at step {err.argmax().item() + 1}"
    assert (h_n.double() - ref_hn.detach()).abs().max().item() <= 3 * u
    rel = (dx.double() - ref_dx).abs().amax(dim=(1, 2)) / ref_dx.abs().amax(dim=(1, 2))
    assert rel.max().item() <= 4 * u, f"dL/dx: {rel.max().item() / u:.2f} u at step {rel.argmax().item() + 1}"


def test_refused_launch_takes_the_fallback(monkeypatch, capfd):
    # A GPU can refuse a cluster or cooperative launch (kernel v2's test of the same):
    # the driver warns and runs the fallback, which computes without rounding the
    # operands: closer to the float64 reference than the tensor-core path can be.
    monkeypatch.setenv("NNRNN_EMULATE_REFUSED_LAUNCH", "1")
    x, W, b, h0, lengths, go, ghn = make_case(5, 11, 37, torch.bfloat16)
    out, h_n = emulated(x, W, b, h0, lengths, "tanh", ("cluster", 3, 1, 16, 1))
    err = capfd.readouterr().err
    assert "refused the launch of the tensor-core kernel (emulated refusal" in err, err
    r_out, _, _ = reference64_grads(x, W, b, h0, lengths, "tanh", go, ghn)
    assert scaled_error(out, r_out) <= 2 * HALF_ULP[torch.bfloat16]  # the output's rounding only


def test_bad_layouts_raise():
    x, W, b, h0, lengths, go, ghn = make_case(3, 4, 10, torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 8"):
        emulated(x, W, b, h0, lengths, "tanh", ("block", 1, 1, 4, 1))
    with pytest.raises(ValueError, match="kt must be 1 or 2"):
        emulated(x, W, b, h0, lengths, "tanh", ("block", 1, 1, 8, 4))
    with pytest.raises(ValueError, match="one block per team"):
        emulated(x, W, b, h0, lengths, "tanh", ("block", 2, 1, 8, 1))
    with pytest.raises(ValueError, match="exchange must be"):
        emulated(x, W, b, h0, lengths, "tanh", ("mesh", 2, 1, 8, 1))
    with pytest.raises(ValueError, match="no float64"):
        emulated(x.double(), W.double(), b.double(), h0.double(), lengths, "tanh", ("block", 1, 1, 8, 1))
    with pytest.raises(RuntimeError, match="invalid tensor-core layout"):
        emulated(x, W, b, h0, lengths, "tanh", ("cluster", 6, 1, 8, 1))  # 6 blocks for 10 columns in pairs


# ------------------------------------------------------------------ the plan and its cost model

def model_plan(N, B, dtype, kernel="auto", allow_tf32=False, **device):
    text, v = torch.ops.nnrnn_fused.model_plan(N, B, dtype, kernel, allow_tf32=allow_tf32, **device)
    return text, dict(version=int(v[0]), exchange=int(v[1]), team_blocks=int(v[2]), teams=int(v[3]),
                      threads=int(v[4]), rows_per_tile=int(v[5]), forward_us=v[6], backward_us=v[7], kt=int(v[8]))


# The targets (H100, per step): the model's predictions for them are in docs/tensor_cores.md.
@pytest.mark.parametrize("N,B,dtype", [(768, 16, torch.float16), (1024, 128, torch.bfloat16),
                                       (512, 32, torch.bfloat16), (128, 10, torch.bfloat16)])
def test_model_takes_tensor_cores_for_half_types(N, B, dtype):
    text, p = model_plan(N, B, dtype)
    assert p["version"] == 3, text
    assert text.startswith("persistent tensor cores")
    _, v1 = model_plan(N, B, dtype, "v1")
    assert p["forward_us"] + p["backward_us"] < v1["forward_us"] + v1["backward_us"]


def test_float32_takes_tensor_cores_only_with_tf32_allowed():
    text, p = model_plan(1024, 128, torch.float32)
    assert p["version"] != 3, text
    text, p = model_plan(1024, 128, torch.float32, allow_tf32=True)
    assert p["version"] == 3, text
    text, p = model_plan(1024, 128, torch.float32, "tc")
    assert p["version"] == 0 and "allow_tf32" in text
    text, p = model_plan(512, 32, torch.float64, "tc")
    assert p["version"] == 0 and "tensor-core path runs float16, bfloat16" in text


@pytest.fixture
def restore_float32_matmul_precision():
    saved = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(saved)  # sets the legacy switch and the new one alike


def test_float32_follows_torchs_tf32_switch(restore_float32_matmul_precision):
    # Without allow_tf32, model_plan reads the flag the CUDA side reads when it plans
    # (tf32_allowed_by_torch in tc_plan.h): PyTorch's switch for TF32 in float32 matmuls.
    def takes_tensor_cores():
        text, v = torch.ops.nnrnn_fused.model_plan(1024, 128, torch.float32)
        return int(v[0]) == 3

    torch.backends.cuda.matmul.allow_tf32 = False
    assert not takes_tensor_cores()
    torch.backends.cuda.matmul.allow_tf32 = True
    assert takes_tensor_cores()
    torch.backends.cuda.matmul.allow_tf32 = False
    assert not takes_tensor_cores()
    torch.set_float32_matmul_precision("high")  # PyTorch's other way to allow TF32
    assert takes_tensor_cores()
    torch.set_float32_matmul_precision("highest")
    assert not takes_tensor_cores()


@pytest.mark.parametrize("N", [2, 17, 128, 500, 1024, 2048, 4096])
@pytest.mark.parametrize("B", [1, 9, 128, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tc_plan_invariants(N, B, dtype):
    text, p = model_plan(N, B, dtype, "tc")
    if p["version"] == 0:
        assert "does not fit" in text, text
        return
    assert p["kt"] in (8, 16) and 32 <= p["threads"] <= 512 and p["threads"] % 32 == 0
    assert 2 * p["team_blocks"] <= N + 1 and p["teams"] <= B
    assert p["rows_per_tile"] % 8 == 0 and p["rows_per_tile"] >= 8
    if p["exchange"] == 1:
        assert p["team_blocks"] <= 16
    if p["exchange"] == 0:
        assert p["team_blocks"] == 1
    assert 0 < p["forward_us"] < p["forward_us"] + p["backward_us"]


def test_tc_plan_refuses_w_too_large_for_the_registers_of_a_grid():
    text, p = model_plan(12000, 8, torch.bfloat16, "tc")
    assert p["version"] == 0 and "does not fit" in text
