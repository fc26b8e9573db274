"""fused_nnrnn against the reference loop, torch.nn.RNN and float64 gradcheck."""
import math
import os
import subprocess
import sys

import pytest
import torch

from nnrnn_fused import fused_nnrnn
from nnrnn_fused.reference import nnrnn_recurrence

from helpers import random_inputs, stable_W, tolerances

NONLINEARITIES = ["modrelu", "tanh", "relu"]
SHAPES = [(1, 1, 4), (7, 3, 6), (13, 1, 33), (300, 5, 16)]  # (T, B, N): T=1, odd, >= 300; B=1, odd


def run_both(fn_inputs, nonlinearity, lengths):
    """Output, h_n and every gradient of a random loss on both outputs, for both implementations."""
    results = []
    go = gh = None
    for impl in (fused_nnrnn, nnrnn_recurrence):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in fn_inputs]
        out, h_n = impl(*leaves, nonlinearity=nonlinearity, lengths=lengths)
        if go is None:
            go, gh = torch.randn_like(out), torch.randn_like(h_n)
        loss = (out * go).sum() + (h_n * gh).sum()
        needs = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(loss, needs)
        results.append((out, h_n, grads))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-B{}-N{}".format(*s))
def test_matches_reference(dtype, nonlinearity, with_h0, with_lengths, shape):
    x, W, b, h0, lengths = random_inputs(*shape, dtype, with_h0, with_lengths)
    (out, h_n, grads), (out_r, h_n_r, grads_r) = run_both([x, W, b, h0], nonlinearity, lengths)
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(out, out_r, rtol=rtol, atol=atol)
    torch.testing.assert_close(h_n, h_n_r, rtol=rtol, atol=atol)
    for name, g, g_r in zip(["x", "W", "b", "h0"], grads, grads_r):
        # Gradients sum over up to T*B terms: scale the tolerance with the magnitude.
        torch.testing.assert_close(g, g_r, rtol=rtol * 10, atol=atol * 10 * max(1.0, g_r.abs().max().item()),
                                   msg=lambda m: f"grad {name}: {m}")


def test_non_contiguous_inputs():
    T, B, N = 9, 4, 8
    x_bt = torch.randn(B, T, N, dtype=torch.float64)
    x = x_bt.transpose(0, 1)  # (T, B, N) view, not contiguous
    W = stable_W(N, torch.float64).contiguous().t()  # transposed view
    b = torch.randn(2 * N, dtype=torch.float64)[::2]  # strided
    h0 = torch.randn(N, B, dtype=torch.float64).t()
    assert not (x.is_contiguous() or W.is_contiguous() or b.is_contiguous() or h0.is_contiguous())
    for nl in NONLINEARITIES:
        (out, h_n, grads), (out_r, h_n_r, grads_r) = run_both([x, W, b, h0], nl, None)
        torch.testing.assert_close(out, out_r)
        torch.testing.assert_close(h_n, h_n_r)
        for g, g_r in zip(grads, grads_r):
            torch.testing.assert_close(g, g_r)


def test_lengths_semantics():
    """A sequence's state stops at its length; output is zero after it; h_n is the
    state after its last valid step (as packed torch RNNs give)."""
    T, B, N = 6, 3, 4
    x, W, b, h0, _ = random_inputs(T, B, N, torch.float64, True, False)
    lengths = torch.tensor([6, 2, 0])
    out, h_n = fused_nnrnn(x, W, b, h0, lengths=lengths)
    full, _ = fused_nnrnn(x, W, b, h0)
    torch.testing.assert_close(out[:2, 1], full[:2, 1])
    assert torch.all(out[2:, 1] == 0) and torch.all(out[:, 2] == 0)
    torch.testing.assert_close(h_n[0], full[-1, 0])
    torch.testing.assert_close(h_n[1], full[1, 1])
    torch.testing.assert_close(h_n[2], h0[2])
    # lengths may be a list or int32
    out_list, _ = fused_nnrnn(x, W, b, h0, lengths=[6, 2, 0])
    out_i32, _ = fused_nnrnn(x, W, b, h0, lengths=lengths.int())
    assert torch.equal(out_list, out) and torch.equal(out_i32, out)


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
@pytest.mark.parametrize("with_lengths", [False, True])
def test_gradcheck_float64(nonlinearity, with_lengths):
    """float64 gradcheck against finite differences. For modReLU and ReLU the
    inputs stay away from the kinks: z is shifted away from 0 and from -b."""
    T, B, N = 4, 3, 5
    x = torch.randn(T, B, N, dtype=torch.float64)
    x = x + 0.5 * torch.sign(x)  # |x| >= 0.5, and W is small, so |z| is far from 0
    W = (0.1 * torch.randn(N, N, dtype=torch.float64)).requires_grad_()
    b = (0.1 * torch.rand(N, dtype=torch.float64)).requires_grad_()  # |z| + b > 0 with a margin
    h0 = (0.3 * torch.randn(B, N, dtype=torch.float64)).requires_grad_()
    x.requires_grad_()
    lengths = torch.tensor([4, 1, 3]) if with_lengths else None

    def f(x, W, b, h0):
        return fused_nnrnn(x, W, b, h0, nonlinearity=nonlinearity, lengths=lengths)

    assert torch.autograd.gradcheck(f, (x, W, b, h0), eps=1e-6, atol=1e-7)


def test_tanh_matches_torch_rnn():
    """nonlinearity='tanh' is torch.nn.RNN with W = weight_hh^T and b = b_ih + b_hh."""
    T, B, I, N = 25, 4, 7, 12
    rnn = torch.nn.RNN(I, N, nonlinearity="tanh").double()
    inp = torch.randn(T, B, I, dtype=torch.float64)
    h0 = torch.randn(1, B, N, dtype=torch.float64)
    out_t, h_t = rnn(inp, h0)
    (out_t.sum() + h_t.square().sum()).backward()

    w_ih = rnn.weight_ih_l0.detach().clone().requires_grad_()
    w_hh = rnn.weight_hh_l0.detach().clone().requires_grad_()
    bias = (rnn.bias_ih_l0 + rnn.bias_hh_l0).detach().clone().requires_grad_()
    out, h_n = fused_nnrnn(inp @ w_ih.t(), w_hh.t(), bias, h0[0], nonlinearity="tanh")
    (out.sum() + h_n.square().sum()).backward()

    torch.testing.assert_close(out, out_t)
    torch.testing.assert_close(h_n, h_t[0])
    torch.testing.assert_close(w_hh.grad, rnn.weight_hh_l0.grad)
    torch.testing.assert_close(w_ih.grad, rnn.weight_ih_l0.grad)
    torch.testing.assert_close(bias.grad, rnn.bias_ih_l0.grad)


def test_relu_matches_torch_rnn():
    T, B, I, N = 20, 3, 5, 8
    rnn = torch.nn.RNN(I, N, nonlinearity="relu").double()
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(stable_W(N, torch.float64, 0.9))
    inp = torch.randn(T, B, I, dtype=torch.float64)
    out_t, h_t = rnn(inp)
    out, h_n = fused_nnrnn(inp @ rnn.weight_ih_l0.t(), rnn.weight_hh_l0.t(), rnn.bias_ih_l0 + rnn.bias_hh_l0,
                           nonlinearity="relu")
    torch.testing.assert_close(out, out_t)
    torch.testing.assert_close(h_n, h_t[0])


@pytest.mark.parametrize("shape", [(0, 3, 4), (5, 0, 4), (0, 0, 4)])
def test_empty_sizes(shape):
    T, B, N = shape
    x = torch.randn(T, B, N, requires_grad=True)
    W = torch.randn(N, N, requires_grad=True)
    b = torch.randn(N, requires_grad=True)
    h0 = torch.randn(B, N, requires_grad=True)
    out, h_n = fused_nnrnn(x, W, b, h0)
    out_r, h_n_r = nnrnn_recurrence(x, W, b, h0)
    assert out.shape == (T, B, N) and h_n.shape == (B, N)
    torch.testing.assert_close(h_n, h_n_r)
    (out.sum() + h_n.sum()).backward()
    assert torch.all(W.grad == 0) and torch.all(b.grad == 0)
    torch.testing.assert_close(h0.grad, torch.ones_like(h0) if T == 0 else h0.grad)


@pytest.mark.parametrize("T", [1, 2, 5])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_zero_hidden_size(T, with_lengths):
    """N = 0, forward and backward (the backward once refused T >= 2 with a reshape error)."""
    leaves = [torch.randn(T, 2, 0), torch.randn(0, 0), torch.randn(0), torch.randn(2, 0)]
    leaves = [t.requires_grad_() for t in leaves]
    out, h_n = fused_nnrnn(*leaves, lengths=[T, 1] if with_lengths else None)
    assert out.shape == (T, 2, 0) and h_n.shape == (2, 0)
    grads = torch.autograd.grad((out.sum() + h_n.sum()), leaves)
    assert [tuple(g.shape) for g in grads] == [(T, 2, 0), (0, 0), (0,), (2, 0)]


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_nan_propagates(nonlinearity):
    T, B, N = 4, 2, 3
    x = torch.randn(T, B, N)
    x[1, 0, 0] = float("nan")
    W = stable_W(N, torch.float32)
    out, h_n = fused_nnrnn(x, W, 0.1 * torch.ones(N), nonlinearity=nonlinearity)
    out_r, _ = nnrnn_recurrence(x, W, 0.1 * torch.ones(N), nonlinearity=nonlinearity)
    assert torch.isnan(out[1, 0, 0]) and torch.isnan(h_n[0]).all()  # spreads through W to every unit
    assert torch.equal(torch.isnan(out), torch.isnan(out_r))
    assert not torch.isnan(out[:, 1]).any()  # the other sequence is untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_bias_gives_what_the_reference_gives(dtype, nonlinearity, special):
    """NaN and +-inf in b: the same output as the reference loop (modReLU once turned a NaN or +inf
    bias into 0 where z = 0 and hid NaN from the trainer's finite-loss check)."""
    T, B, N = 4, 3, 5
    x = torch.randn(T, B, N, dtype=dtype)
    x[0, 0] = 0  # z = 0 exactly at the first step of sequence 0: sign(0) relu(0 + inf) = 0 * inf = NaN
    W = stable_W(N, dtype)
    b = 0.1 * torch.randn(N, dtype=dtype)
    b[2] = special
    out, h_n = fused_nnrnn(x, W, b, nonlinearity=nonlinearity)
    out_r, h_n_r = nnrnn_recurrence(x, W, b, nonlinearity=nonlinearity)
    torch.testing.assert_close(out, out_r, equal_nan=True)
    torch.testing.assert_close(h_n, h_n_r, equal_nan=True)
    if special != -math.inf and nonlinearity != "tanh":  # tanh(inf) = 1 and relu/modReLU(-inf) = 0 are finite
        assert not torch.isfinite(out[0, :, 2]).any()
    if math.isnan(special):
        assert torch.isnan(h_n).all()  # spreads through W to every unit


@pytest.mark.parametrize("kernel", ["packed", "blas"])
def test_tanh_saturates_to_exactly_one(kernel, monkeypatch):
    """float32 tanh is exactly +-1 beyond |z| = 9.01, so its derivative 1 - h^2 is 0 there: the CPU's
    vectorized tanh once stopped at tanh(9) = 1 - 2^-24, and the gradient through an infinite W was inf
    where the reference's is 0 * inf = NaN (found by test_op_properties)."""
    monkeypatch.setenv("NNRNN_CPU_KERNEL", kernel)
    z = torch.tensor([9.0, 9.02, 9.5, 10.0, 20.0, math.inf])
    x = torch.cat([z, -z]).reshape(1, 1, -1).requires_grad_()
    W = torch.zeros(12, 12, requires_grad=True)
    out, _ = fused_nnrnn(x, W, nonlinearity="tanh")
    expected = torch.tanh(x.detach())
    assert torch.equal(out, expected), (out, expected)  # 9.0: 1 - 2^-24; beyond 9.01: +-1 exactly
    dx, = torch.autograd.grad(out.sum(), x)
    assert torch.equal(dx[0, 0, 1:6], torch.zeros(5)) and torch.equal(dx[0, 0, 7:], torch.zeros(5))


def test_blas_products_are_split_into_row_chunks():
    """Fortran BLAS takes 32-bit sizes, so products of 2^31 rows or more are split. The split is
    checked with the limit lowered to 3 rows (NNRNN_BLAS_MAX_ROWS, read once per process, hence a
    subprocess): the results equal the reference's, and MKL's own log of its calls (where torch's
    BLAS is MKL) shows the per-step products of B = 8 rows as 3 + 3 + 2 rows."""
    script = """
import torch
from nnrnn_fused import fused_nnrnn
from nnrnn_fused.reference import nnrnn_recurrence
torch.manual_seed(0)
T, B, N = 3, 8, 5
for dtype in (torch.float32, torch.float64):
    for lengths in (None, [3, 1, 2, 3, 0, 3, 2, 1]):
        x, W, b, h0 = (torch.randn(s, dtype=dtype, requires_grad=True) for s in ((T, B, N), (N, N), (N,), (B, N)))
        results = []
        for impl in (fused_nnrnn, nnrnn_recurrence):
            out, h_n = impl(x, W, b, h0, nonlinearity="tanh", lengths=lengths)
            results.append((out, h_n) + torch.autograd.grad(out.sum() + h_n.square().sum(), (x, W, b, h0)))
        for a, r in zip(*results):
            torch.testing.assert_close(a, r)
x, W, h0 = torch.randn(T, B, N), torch.randn(N, N), torch.randn(B, N)
print("LOGGED FORWARD", flush=True)
with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):
    fused_nnrnn(x, W, None, h0, nonlinearity="tanh")
print("END", flush=True)
"""
    env = dict(os.environ, NNRNN_BLAS_MAX_ROWS="3", NNRNN_CPU_KERNEL="blas")  # small shapes go packed
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logged = proc.stdout.split("LOGGED FORWARD")[1].split("END")[0]
    calls = [line for line in logged.splitlines() if "SGEMM(" in line]
    if not calls:
        pytest.skip("torch's BLAS is not MKL (no call log); the results were checked")
    # SGEMM(transb, transa, m = N, n = rows, k = N, ...): one product per step, split 3 + 3 + 2
    rows = [int(line.split("SGEMM(")[1].split(",")[3]) for line in calls]
    assert rows == [3, 3, 2] * 3, calls

    T, B, N = 50, 7, 32
    x, W, b, h0, lengths = random_inputs(T, B, N, torch.float32, True, True)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, W, b, h0)]
        out, h_n = fused_nnrnn(*leaves, lengths=lengths)
        (out.square().sum() + h_n.sum()).backward()
        grads.append([t.grad for t in leaves])
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)


def test_grad_of_h_n_only_and_output_only():
    """Gradients flow from either output alone (autograd passes None for the other)."""
    x, W, b, h0, _ = random_inputs(8, 3, 6, torch.float64, True, False)
    for pick in (0, 1):
        leaves = [t.clone().requires_grad_() for t in (x, W, b, h0)]
        ref_leaves = [t.clone().requires_grad_() for t in (x, W, b, h0)]
        fused_nnrnn(*leaves)[pick].sum().backward()
        nnrnn_recurrence(*ref_leaves)[pick].sum().backward()
        for a, r in zip(leaves, ref_leaves):
            torch.testing.assert_close(a.grad, r.grad)
