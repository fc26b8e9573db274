"""fused_nnrnn against the reference loop, torch.nn.RNN and float64 gradcheck."""
import pytest
import torch

from nnrnn_fused import fused_nnrnn
from nnrnn_fused.reference import nnrnn_recurrence

from helpers import stable_W, tolerances

NONLINEARITIES = ["modrelu", "tanh", "relu"]
SHAPES = [(1, 1, 4), (7, 3, 6), (13, 1, 33), (300, 5, 16)]  # (T, B, N): T=1, odd, >= 300; B=1, odd


def make_inputs(T, B, N, dtype, with_h0, with_lengths):
    x = torch.randn(T, B, N, dtype=dtype)
    W = stable_W(N, dtype)
    b = 0.1 * torch.randn(N, dtype=dtype)
    h0 = torch.randn(B, N, dtype=dtype) if with_h0 else None
    lengths = torch.randint(0, T + 1, (B,)) if with_lengths else None
    if with_lengths:
        lengths[0] = T  # one full-length sequence
    return x, W, b, h0, lengths


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
    x, W, b, h0, lengths = make_inputs(*shape, dtype, with_h0, with_lengths)
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
    x, W, b, h0, _ = make_inputs(T, B, N, torch.float64, True, False)
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


def test_zero_hidden_size():
    out, h_n = fused_nnrnn(torch.randn(3, 2, 0), torch.randn(0, 0))
    assert out.shape == (3, 2, 0) and h_n.shape == (2, 0)


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


def test_backward_is_deterministic():
    T, B, N = 50, 7, 32
    x, W, b, h0, lengths = make_inputs(T, B, N, torch.float32, True, True)
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
    x, W, b, h0, _ = make_inputs(8, 3, 6, torch.float64, True, False)
    for pick in (0, 1):
        leaves = [t.clone().requires_grad_() for t in (x, W, b, h0)]
        ref_leaves = [t.clone().requires_grad_() for t in (x, W, b, h0)]
        fused_nnrnn(*leaves)[pick].sum().backward()
        nnrnn_recurrence(*ref_leaves)[pick].sum().backward()
        for a, r in zip(leaves, ref_leaves):
            torch.testing.assert_close(a.grad, r.grad)
