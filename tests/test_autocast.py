"""torch.autocast on the CPU: the recurrence runs in float32 and returns the autocast dtype
(README, "Mixed precision"). The truth is the reference loop run outside autocast, in
float32, on the same casts. The CUDA half (float16/bfloat16 kernels) is in test_cuda.py."""
import pytest
import torch

from helpers import stable_W
from nnrnn_fused import NNRNN, fused_nnrnn
from nnrnn_fused.reference import nnrnn_recurrence

LOW = [torch.bfloat16, torch.float16]
# two roundings of the same float32 value to the low dtype differ by at most one unit in the last place
TOL = {torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2), torch.float16: dict(rtol=2e-3, atol=1e-3)}
ids = lambda d: str(d).replace("torch.", "")  # noqa: E731


@pytest.mark.parametrize("dtype", LOW, ids=ids)
@pytest.mark.parametrize("nonlinearity", ["modrelu", "tanh"])
def test_op_under_cpu_autocast(dtype, nonlinearity):
    T, B, N = 9, 3, 8
    x = torch.randn(T, B, N).to(dtype).requires_grad_()  # what an autocast Linear hands over
    W = stable_W(N, torch.float32).requires_grad_()
    b = (0.1 * torch.randn(N)).requires_grad_()
    h0 = torch.randn(B, N).requires_grad_()
    lengths = torch.tensor([9, 4, 0])
    go, ghn = torch.randn(T, B, N), torch.randn(B, N)
    with torch.autocast("cpu", dtype=dtype):
        out, h_n = fused_nnrnn(x, W, b, h0, nonlinearity=nonlinearity, lengths=lengths)
    assert out.dtype == h_n.dtype == dtype
    (out.float() * go).sum().add((h_n.float() * ghn).sum()).backward()
    assert x.grad.dtype == dtype and W.grad.dtype == b.grad.dtype == h0.grad.dtype == torch.float32

    leaves = [t.detach().float().requires_grad_() for t in (x, W, b, h0)]
    ref_out, ref_hn = nnrnn_recurrence(*leaves, nonlinearity=nonlinearity, lengths=lengths)
    torch.testing.assert_close(out, ref_out.to(dtype), **TOL[dtype])
    torch.testing.assert_close(h_n, ref_hn.to(dtype), **TOL[dtype])
    # the same graph: the outputs rounded to the low dtype, the gradients flowing back through that cast
    (ref_out.to(dtype).float() * go).sum().add((ref_hn.to(dtype).float() * ghn).sum()).backward()
    torch.testing.assert_close(x.grad, leaves[0].grad.to(dtype), **TOL[dtype])
    for got, ref in zip((W, b, h0), leaves[1:]):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", LOW, ids=ids)
def test_layer_under_cpu_autocast(dtype):
    """One layer written out: the input map in the low dtype (an autocast Linear), the
    recurrence in float32, the output rounded to the low dtype."""
    layer = NNRNN(5, 8, nonlinearity="tanh")
    x, h0 = torch.randn(7, 3, 5), torch.randn(1, 3, 8)
    with torch.autocast("cpu", dtype=dtype):
        out, h_n = layer(x, h0)
        assert layer.recurrent_matrix().dtype == torch.float32  # built outside autocast: P stays orthogonal
    assert out.dtype == h_n.dtype == dtype
    l0 = layer.layers[0]
    projected = torch.nn.functional.linear(x.to(dtype), l0.U.weight.to(dtype))
    ref_out, ref_hn = nnrnn_recurrence(projected.float(), layer.recurrent_matrix(), l0.b, h0[0], nonlinearity="tanh")
    torch.testing.assert_close(out, ref_out.to(dtype), **TOL[dtype])
    torch.testing.assert_close(h_n[0], ref_hn.to(dtype), **TOL[dtype])


@pytest.mark.parametrize("dtype", LOW, ids=ids)
def test_bidirectional_layer_trains_under_cpu_autocast_on_both_backends(dtype):
    layers = [NNRNN(5, 8, num_layers=2, bidirectional=True, backend=backend) for backend in ("fused", "reference")]
    layers[1].load_state_dict(layers[0].state_dict())
    x, lengths = torch.randn(7, 3, 5), [7, 2, 5]
    results = []
    for layer in layers:
        with torch.autocast("cpu", dtype=dtype):
            out, h_n = layer(x, lengths=lengths)
            loss = out.float().square().mean() + h_n.float().sum()
        loss.backward()
        assert out.dtype == h_n.dtype == dtype
        assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in layer.parameters())
        results.append((out, h_n))
    for got, ref in zip(*results):
        torch.testing.assert_close(got, ref, **TOL[dtype])
    for p, q in zip(*(layer.parameters() for layer in layers)):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-3, atol=2e-4)


def test_float64_is_not_cast():
    layer = NNRNN(3, 4, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, h_n = layer(x)
    assert out.dtype == h_n.dtype == torch.float64
    assert torch.equal(out, layer(x)[0])


def test_mixed_dtypes_outside_autocast_are_refused():
    x, W = torch.randn(4, 2, 3).bfloat16(), torch.randn(3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_nnrnn(x, W)
    with pytest.raises(ValueError, match="x has dtype"):  # no bfloat16 kernels on the CPU
        fused_nnrnn(x, W)
    with pytest.raises(ValueError, match="W has dtype"):
        fused_nnrnn(x.float(), W.double())


def test_compile_under_cpu_autocast():
    torch._dynamo.reset()
    layer = NNRNN(5, 8)
    x = torch.randn(6, 3, 5)

    def loss_fn(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, h_n = layer(x, lengths=torch.tensor([6, 2, 4]))
        assert out.dtype == torch.bfloat16
        return out.float().square().mean() + h_n.float().sum()

    eager = loss_fn(x)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)
