"""nnrnn_recurrence_rounded: the CPU model of the CUDA tensor-core path's numerics
(bfloat16 operands, float32 state and sums), used to train with those numerics
(backend="reference-bf16"). Compared with the reference loop and with a float64
loop that rounds the same operands explicitly."""
import pytest
import torch

from nnrnn_fused import NNRNN
from nnrnn_fused.reference import activation, nnrnn_recurrence, nnrnn_recurrence_rounded


def make_case(T=4, B=3, N=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, N, generator=g)
    W = torch.randn(N, N, generator=g) / N**0.5
    b = 0.1 * torch.randn(N, generator=g)
    h0 = torch.randn(B, N, generator=g)
    lengths = torch.tensor([T, 0, T - 1][:B])
    return x, W, b, h0, lengths


def bf16(t):
    return t.bfloat16().double()


@pytest.mark.parametrize("nl", ["modrelu", "tanh", "relu"])
def test_float32_operands_are_the_reference(nl):
    x, W, b, h0, lengths = make_case()
    leaves = [t.clone().requires_grad_() for t in (x, W, b, h0)]
    out, h_n = nnrnn_recurrence(*leaves, nonlinearity=nl, lengths=lengths)
    grads = torch.autograd.grad(out.sum() + h_n.sum(), leaves)
    leaves_r = [t.clone().requires_grad_() for t in (x, W, b, h0)]
    out_r, h_n_r = nnrnn_recurrence_rounded(*leaves_r, nonlinearity=nl, lengths=lengths, operand_dtype=torch.float32)
    grads_r = torch.autograd.grad(out_r.sum() + h_n_r.sum(), leaves_r)
    assert torch.equal(out, out_r) and torch.equal(h_n, h_n_r)
    for g, g_r in zip(grads, grads_r):
        assert torch.equal(g, g_r)


@pytest.mark.parametrize("nl", ["modrelu", "tanh", "relu"])
def test_forward_is_the_rounded_operand_loop(nl):
    # the truth: float64 sums of the bfloat16 operands, the state kept unrounded
    x, W, b, h0, lengths = make_case()
    out, h_n = nnrnn_recurrence_rounded(x, W, b, h0, nonlinearity=nl, lengths=lengths)
    xr, Wr, br, h = bf16(x), bf16(W), bf16(b), bf16(h0)
    outs = []
    for t in range(x.shape[0]):
        h_new = activation(xr[t] + bf16(h) @ Wr, br, nl)
        valid = (t < lengths).unsqueeze(1)
        outs.append(torch.where(valid, h_new, torch.zeros_like(h_new)))
        h = torch.where(valid, h_new, h)
    torch.testing.assert_close(out.double(), bf16(torch.stack(outs)), atol=1e-6, rtol=0)
    torch.testing.assert_close(h_n.double(), bf16(h), atol=1e-6, rtol=0)
    assert torch.equal(out, out.bfloat16().float())


def test_gradients_are_bfloat16_values_near_the_float64_gradients():
    x, W, b, h0, lengths = make_case(T=6, N=16)
    leaves = [t.clone().requires_grad_() for t in (x, W, b, h0)]
    out, h_n = nnrnn_recurrence_rounded(*leaves, nonlinearity="tanh", lengths=lengths)
    grads = torch.autograd.grad(out.sum() + h_n.sum(), leaves)
    leaves64 = [t.double().requires_grad_() for t in (x, W, b, h0)]
    out64, h_n64 = nnrnn_recurrence(*leaves64, nonlinearity="tanh", lengths=lengths)
    grads64 = torch.autograd.grad(out64.sum() + h_n64.sum(), leaves64)
    for name, g, g64 in zip(("x", "W", "b", "h0"), grads, grads64):
        assert torch.equal(g, g.bfloat16().float()), f"grad {name} is not a bfloat16 value"
        err = (g.double() - g64).abs().max() / g64.abs().max()
        assert err < 3e-2, f"grad {name}: relative error {err:.3g}"


def test_layer_backend():
    torch.manual_seed(0)
    layer = NNRNN(3, 8, backend="reference-bf16")
    out, h_n = layer(torch.randn(5, 2, 3))
    assert torch.equal(out, out.bfloat16().float()) and out.shape == (5, 2, 8)
    out.sum().backward()
    assert layer.layers[0].recurrent.log_P.grad is not None
