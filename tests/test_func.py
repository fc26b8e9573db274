"""torch.func: vmap (the vmapped dimension folded into the batch), grad, and per-sample
gradients, of the op and of the layer, against the reference loop (float64)."""
import pytest
import torch
from torch.func import functional_call, grad, jacrev, jvp, vmap

from helpers import stable_W
from nnrnn_fused import NNRNN, fused_nnrnn
from nnrnn_fused.reference import nnrnn_recurrence

T, B, N, V = 6, 3, 5, 4


def f64(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("nonlinearity", ["modrelu", "tanh", "relu"])
def test_vmap_over_x_h0_and_lengths(nonlinearity):
    W, b = stable_W(N, torch.float64), 0.1 * f64(N)
    xs, h0s = f64(T, V, B, N), f64(B, V, N)  # the vmapped dimension at various places
    lengths = torch.randint(0, T + 1, (V, B))
    out, h_n = vmap(lambda x, h0, L: fused_nnrnn(x, W, b, h0, nonlinearity=nonlinearity, lengths=L),
                    in_dims=(1, 1, 0))(xs, h0s, lengths)
    for v in range(V):
        ref_out, ref_hn = nnrnn_recurrence(xs[:, v], W, b, h0s[:, v], nonlinearity=nonlinearity, lengths=lengths[v])
        torch.testing.assert_close(out[v], ref_out)
        torch.testing.assert_close(h_n[v], ref_hn)
    # one argument vmapped, the others shared
    out, _ = vmap(lambda h0: fused_nnrnn(xs[:, 0], W, b, h0, nonlinearity=nonlinearity))(h0s.movedim(1, 0))
    for v in range(V):
        torch.testing.assert_close(out[v], nnrnn_recurrence(xs[:, 0], W, b, h0s[:, v], nonlinearity=nonlinearity)[0])


def test_vmap_over_W_is_refused_clearly():
    x, W = f64(T, B, N), f64(N, N)
    with pytest.raises(ValueError, match="vmap over W or b .* is not supported"):
        vmap(lambda W: fused_nnrnn(x, W))(f64(V, N, N))
    with pytest.raises(ValueError, match="vmap over W or b .* is not supported"):
        vmap(lambda b: fused_nnrnn(x, W, b))(f64(V, N))


@pytest.mark.parametrize("nonlinearity", ["modrelu", "tanh"])
def test_grad_matches_autograd_of_the_reference(nonlinearity):
    x, W, b, h0 = f64(T, B, N), stable_W(N, torch.float64), 0.1 * f64(N), f64(B, N)
    lengths = torch.tensor([6, 0, 3])

    def loss(impl, x, W, b, h0):
        out, h_n = impl(x, W, b, h0, nonlinearity=nonlinearity, lengths=lengths)
        return out.square().sum() + h_n.sum()

    grads = grad(lambda *a: loss(fused_nnrnn, *a), argnums=(0, 1, 2, 3))(x, W, b, h0)
    leaves = [t.clone().requires_grad_() for t in (x, W, b, h0)]
    ref = torch.autograd.grad(loss(nnrnn_recurrence, *leaves), leaves)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("nonlinearity", ["modrelu", "tanh", "relu"])
def test_per_sample_gradients_of_the_op(nonlinearity):
    """vmap(grad): the backward's vmap rule sums W's and b's gradients per element."""
    W, b = stable_W(N, torch.float64), 0.1 * f64(N)
    xs, h0s, lengths = f64(V, T, 2, N), f64(V, 2, N), torch.tensor([[6, 2], [0, 6], [3, 3], [1, 5]])

    def loss(impl, W, b, x, h0, L):
        out, h_n = impl(x, W, b, h0, nonlinearity=nonlinearity, lengths=L)
        return out.square().sum() + (h_n * h0).sum()

    per_sample = vmap(grad(lambda *a: loss(fused_nnrnn, *a), argnums=(0, 1, 3)), in_dims=(None, None, 0, 0, 0))(
        W, b, xs, h0s, lengths)
    for v in range(V):
        leaves = [t.clone().requires_grad_() for t in (W, b, h0s[v])]
        ref = torch.autograd.grad(loss(nnrnn_recurrence, leaves[0], leaves[1], xs[v], leaves[2], lengths[v]), leaves)
        for g, r in zip(per_sample, ref):
            torch.testing.assert_close(g[v], r)


def test_per_sample_gradients_of_the_layer():
    """The usual per-sample-gradient recipe over a whole nnRNN layer (W built from log_P),
    each sample an unbatched (T, input_size) sequence."""
    layer = NNRNN(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    ref = NNRNN(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64, backend="reference")
    ref.load_state_dict(layer.state_dict())
    params = {n: p.detach() for n, p in layer.named_parameters()}
    xs = f64(V, T, 3)

    def loss(params, x):
        out, h_n = functional_call(layer, params, (x,))
        return out.square().sum() + h_n.sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for v in range(V):
        ref.zero_grad()
        out, h_n = ref(xs[v])
        (out.square().sum() + h_n.sum()).backward()
        for name, p in ref.named_parameters():
            torch.testing.assert_close(per_sample[name][v], p.grad, msg=lambda m: f"{name}: {m}")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torch's jvp machinery
def test_jacrev_and_forward_mode():
    x, W = f64(3, 2, 3), stable_W(3, torch.float64)
    jac = jacrev(lambda W: fused_nnrnn(x, W, nonlinearity="tanh")[0])(W)  # vmap over the backward's gradients
    torch.testing.assert_close(jac, jacrev(lambda W: nnrnn_recurrence(x, W, nonlinearity="tanh")[0])(W))
    with pytest.raises(RuntimeError, match="forward-mode differentiation .* is not supported"):
        jvp(lambda W: fused_nnrnn(x, W)[1], (W,), (torch.ones_like(W),))


def test_double_grad_is_refused_clearly():
    x, W = f64(T, B, N), stable_W(N, torch.float64)

    def first(W):
        return fused_nnrnn(x, W, nonlinearity="tanh")[0].square().sum()

    with pytest.raises(RuntimeError, match="double backward .* not supported"):
        grad(lambda W: grad(first)(W).sum())(W)
