"""The op as a registered custom op: opcheck, and torch.compile(fullgraph=True)."""
import pytest
import torch

import nnrnn_fused
from nnrnn_fused import NNRNN


def sample_args(dtype=torch.float64, with_lengths=False, nonlinearity="modrelu"):
    T, B, N = 6, 3, 4
    x = torch.randn(T, B, N, dtype=dtype, requires_grad=True)
    W = (0.5 * torch.randn(N, N, dtype=dtype)).requires_grad_()
    b = (0.1 * torch.randn(N, dtype=dtype)).requires_grad_()
    h0 = torch.randn(B, N, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([6, 2, 4]) if with_lengths else None
    return (x, W, b, h0, lengths, nonlinearity)


@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("nonlinearity", ["modrelu", "tanh"])
def test_opcheck_forward(with_lengths, nonlinearity):
    torch.library.opcheck(torch.ops.nnrnn_fused.recurrence.default,
                          sample_args(with_lengths=with_lengths, nonlinearity=nonlinearity))


def test_opcheck_without_optionals():
    x, W, *_ = sample_args(torch.float32)
    torch.library.opcheck(torch.ops.nnrnn_fused.recurrence.default, (x, W, None, None, None, "relu"))


def test_opcheck_backward():
    x, W, b, h0, lengths, nl = sample_args(with_lengths=True)
    out, h_n = torch.ops.nnrnn_fused.recurrence(x.detach(), W.detach(), b.detach(), h0.detach(), lengths, nl)
    torch.library.opcheck(torch.ops.nnrnn_fused.recurrence_backward.default,
                          (torch.randn_like(out), torch.randn_like(h_n), out, W.detach(), h0.detach(), lengths, nl))


@pytest.mark.parametrize("recurrent", ["nnrnn", "orthogonal", "free"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_layer_fullgraph_forward_and_backward(backend, recurrent):
    """Compiled gradients equal eager ones for every recurrent kind (torch 2.11 once gave
    log_P zero gradients here: docs/torch_versions.md)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = NNRNN(5, 8, num_layers=2, recurrent=recurrent)
    x = torch.randn(12, 3, 5)

    def loss_fn(x):
        out, h_n = layer(x, lengths=torch.tensor([12, 7, 3]))
        return out.square().mean() + h_n.sum()

    eager = loss_fn(x)
    eager.backward()
    eager_grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()

    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    loss = compiled(x)
    loss.backward()
    torch.testing.assert_close(loss, eager)
    # inductor generates its own kernels, which may sum float32 terms in another order
    tol = dict(rtol=1e-4, atol=1e-4) if backend == "inductor" else {}
    for name, p in layer.named_parameters():
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, eager_grads[name], **tol, msg=lambda m: f"{name}: {m}")


def test_compile_inductor_op():
    """The default backend (inductor) with the op inside a larger graph."""
    torch._dynamo.reset()
    x, W, b, h0, _, _ = sample_args(torch.float32)

    @torch.compile(fullgraph=True)
    def f(x, W, b, h0):
        out, h_n = nnrnn_fused.fused_nnrnn(x * 2, W.T, b, h0.tanh(), nonlinearity="tanh")
        return out.sum() + h_n.square().sum()

    loss = f(x, W, b, h0)
    grads = torch.autograd.grad(loss, [x, W, b, h0])
    ref = nnrnn_fused.reference.nnrnn_recurrence(x * 2, W.T, b, h0.tanh(), nonlinearity="tanh")
    ref_loss = ref[0].sum() + ref[1].square().sum()
    ref_grads = torch.autograd.grad(ref_loss, [x, W, b, h0])
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
