"""The NNRNN layer: torch.nn.RNN's interface and results, packed sequences, the recipe."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import nnrnn_fused
from nnrnn_fused import NNRNN
from nnrnn_fused.models import SequenceModel

from helpers import count_W_builds


def rnn_twin(layer: NNRNN) -> torch.nn.RNN:
    """torch.nn.RNN computing what a recurrent='free' tanh/relu NNRNN computes: per layer and
    direction weight_ih = U, weight_hh = W^T, bias_ih = b, bias_hh = 0."""
    rnn = torch.nn.RNN(layer.input_size, layer.hidden_size, layer.num_layers, layer.nonlinearity, bias=layer.bias,
                       batch_first=layer.batch_first, bidirectional=layer.bidirectional,
                       dtype=layer.layers[0].U.weight.dtype)
    with torch.no_grad():
        for suffix, i, l in twin_pairs(layer):
            getattr(rnn, f"weight_ih_l{i}{suffix}").copy_(l.U.weight)
            getattr(rnn, f"weight_hh_l{i}{suffix}").copy_(l.recurrent.weight.T)
            if layer.bias:
                getattr(rnn, f"bias_ih_l{i}{suffix}").copy_(l.b)
                getattr(rnn, f"bias_hh_l{i}{suffix}").zero_()
    return rnn


def twin_pairs(layer):
    """(torch.nn.RNN's name suffix, layer index, NNRNN's RecurrentLayer) for every layer and direction."""
    for i in range(layer.num_layers):
        yield "", i, layer.layers[i]
        if layer.bidirectional:
            yield "_reverse", i, layer.layers_reverse[i]


def assert_twin_gradients(layer, rnn):
    for suffix, i, l in twin_pairs(layer):
        torch.testing.assert_close(l.U.weight.grad, getattr(rnn, f"weight_ih_l{i}{suffix}").grad)
        torch.testing.assert_close(l.recurrent.weight.grad, getattr(rnn, f"weight_hh_l{i}{suffix}").grad.T)
        if layer.bias:
            torch.testing.assert_close(l.b.grad, getattr(rnn, f"bias_ih_l{i}{suffix}").grad)


def f64(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch-first"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_matches_torch_rnn(batch_first, num_layers, bias, bidirectional):
    layer = NNRNN(5, 8, num_layers, "tanh", bias, batch_first, bidirectional=bidirectional, recurrent="free",
                  dtype=torch.float64)
    rnn = rnn_twin(layer)
    x = f64(4, 11, 5) if batch_first else f64(11, 4, 5)
    h0 = f64(num_layers * (2 if bidirectional else 1), 4, 8).requires_grad_()
    out, h_n = layer(x, h0)
    out_t, h_t = rnn(x, h0)
    torch.testing.assert_close(out, out_t)
    torch.testing.assert_close(h_n, h_t)
    g_h0, = torch.autograd.grad(out.sum() + h_n.square().sum(), h0, retain_graph=True)
    g_h0_t, = torch.autograd.grad(out_t.sum() + h_t.square().sum(), h0, retain_graph=True)
    torch.testing.assert_close(g_h0, g_h0_t)
    (out.sum() + h_n.square().sum()).backward()
    (out_t.sum() + h_t.square().sum()).backward()
    assert_twin_gradients(layer, rnn)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_packed_sequence_matches_torch_rnn(nonlinearity, bidirectional):
    layer = NNRNN(3, 6, 2, nonlinearity, bidirectional=bidirectional, recurrent="free", dtype=torch.float64)
    rnn = rnn_twin(layer)
    lengths = torch.tensor([5, 9, 1, 7])  # unsorted
    padded = f64(9, 4, 3)
    h0 = 0.5 * f64(2 * (2 if bidirectional else 1), 4, 6)
    packed = pack_padded_sequence(padded, lengths, enforce_sorted=False)
    out, h_n = layer(packed, h0)
    out_t, h_t = rnn(packed, h0)
    assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
    torch.testing.assert_close(out.data, out_t.data)
    torch.testing.assert_close(h_n, h_t)
    (out.data.square().sum() + h_n.sum()).backward()
    (out_t.data.square().sum() + h_t.sum()).backward()
    assert_twin_gradients(layer, rnn)
    # padded input with lengths gives the same, with zeros past each length
    out_p, h_p = layer(padded, h0, lengths=lengths)
    torch.testing.assert_close(out_p, pad_packed_sequence(out_t, total_length=9)[0])
    torch.testing.assert_close(h_p, h_t)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch-first"])
def test_unbatched_input_matches_torch_rnn(batch_first, bidirectional):
    layer = NNRNN(3, 6, 2, "relu", batch_first=batch_first, bidirectional=bidirectional, recurrent="free",
                  dtype=torch.float64)
    rnn = rnn_twin(layer)
    x, h0 = f64(7, 3), f64(2 * (2 if bidirectional else 1), 6)  # (T, input_size), whatever batch_first says
    for args in ((x,), (x, h0)):
        out, h_n = layer(*args)
        out_t, h_t = rnn(*args)
        assert out.shape == out_t.shape == (7, 6 * (2 if bidirectional else 1)) and h_n.shape == h_t.shape
        torch.testing.assert_close(out, out_t)
        torch.testing.assert_close(h_n, h_t)


def test_bidirectional_reverse_direction_reads_each_sequence_backwards():
    """The reverse direction alone, against the op on sequences reversed by hand."""
    layer = NNRNN(2, 4, bidirectional=True, nonlinearity="tanh", dtype=torch.float64)
    lengths = [4, 1, 3]
    x = f64(4, 3, 2)
    out, h_n = layer(x, lengths=lengths)
    rev = layer.layers_reverse[0]
    for b, L in enumerate(lengths):
        o, h = nnrnn_fused.reference.nnrnn_recurrence(rev.U(x[:L, b:b + 1].flip(0)), layer.recurrent_matrix(0, True),
                                                      rev.b, nonlinearity="tanh")
        torch.testing.assert_close(out[:L, b, 4:], o.flip(0)[:, 0])
        torch.testing.assert_close(h_n[1, b], h[0])
        assert torch.all(out[L:, b] == 0)


@pytest.mark.parametrize("recurrent,bidirectional", [("nnrnn", False), ("orthogonal", False), ("free", False),
                                                    ("nnrnn", True)])
@pytest.mark.parametrize("nonlinearity", ["modrelu", "tanh", "relu"])
def test_fused_and_reference_backends_agree(recurrent, bidirectional, nonlinearity):
    kw = dict(nonlinearity=nonlinearity, recurrent=recurrent, num_layers=2, bidirectional=bidirectional,
              dtype=torch.float64)
    fused = NNRNN(4, 10, **kw)
    ref = NNRNN(4, 10, **kw, backend="reference")
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(30, 3, 4, dtype=torch.float64)
    for model in (fused, ref):
        out, h_n = model(x, lengths=[30, 12, 5])
        (out.square().sum() + h_n.sum()).backward()
    torch.testing.assert_close(fused(x)[0], ref(x)[0])
    for (name, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{name}: {m}")


def test_parameter_names_and_recurrent_matrix():
    layer = NNRNN(3, 8)
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"layers.0.U.weight", "layers.0.recurrent.log_P", "layers.0.recurrent.thetas",
                     "layers.0.recurrent.gammas", "layers.0.recurrent.T", "layers.0.b"}
    assert layer.layers[0].U.bias is None
    rec = layer.layers[0].recurrent
    P = rec.orthogonal()
    W = P @ (nnrnn_fused.parametrization.block_rotations(rec.thetas, rec.gammas) + rec.T * rec.mask) @ P.T
    torch.testing.assert_close(layer.recurrent_matrix(), W)
    # the layer really uses it: one step from h0 with zero input
    h0 = torch.randn(1, 2, 8)
    _, h_n = layer(torch.zeros(1, 2, 3), h0)
    expected = nnrnn_fused.reference.activation(h0[0] @ W, layer.layers[0].b, "modrelu")
    torch.testing.assert_close(h_n[0], expected)


def test_parameter_names_without_bias_and_bidirectional():
    layer = NNRNN(3, 4, num_layers=2, bias=False, bidirectional=True, recurrent="free")
    assert {n for n, _ in layer.named_parameters()} == {
        f"{stack}.{i}.{p}" for stack in ("layers", "layers_reverse") for i in (0, 1) for p in ("U.weight", "recurrent.weight")}
    assert layer.layers_reverse[1].U.weight.shape == (4, 8)  # layer 1 reads both directions
    # without a bias modReLU is the identity: a linear RNN
    linear = NNRNN(3, 4, bias=False, dtype=torch.float64)
    x = f64(5, 2, 3)
    h, out = torch.zeros(2, 4, dtype=torch.float64), []
    for t in range(5):
        h = linear.layers[0].U(x[t]) + h @ linear.recurrent_matrix()
        out.append(h)
    torch.testing.assert_close(linear(x)[0], torch.stack(out))


def test_reset_parameters_draws_the_initial_state_again():
    layer = NNRNN(3, 8, num_layers=2, bidirectional=True, generator=torch.Generator().manual_seed(5))
    initial = {n: p.detach().clone() for n, p in layer.named_parameters()}
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(1.0)
    layer.reset_parameters(torch.Generator().manual_seed(5))
    for name, p in layer.named_parameters():
        if ".recurrent." in name:  # the constructor's draws from the same generator, in the same order
            assert torch.equal(p, initial[name]), name
        elif name.endswith(".b"):  # modReLU's U(-0.01, 0.01)
            assert p.abs().max() <= 0.01 and not torch.equal(p, initial[name]), name
        else:  # U: a fresh xavier-normal draw (std 0.5 or 0.4), not the shifted values
            assert p.mean().abs() < 0.3 and 0.2 < p.std() < 0.7, name


def test_reset_parameters_after_meta_initialisation():
    """The usual pattern for large models: build on the meta device, allocate, reset."""
    layer = NNRNN(3, 8, device="meta").to_empty(device="cpu")
    layer.reset_parameters(torch.Generator().manual_seed(0))
    fresh = NNRNN(3, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer.recurrent_matrix(), fresh.recurrent_matrix())


def test_inits_and_modrelu_bias_range():
    layer = NNRNN(3, 64, init="henaff")
    b = layer.layers[0].b
    assert b.abs().max() <= 0.01 and b.std() > 0
    rec = layer.layers[0].recurrent
    assert torch.all(rec.gammas == 1) and torch.all(rec.T == 0)
    assert rec.thetas.min() >= 0 and rec.thetas.max() <= 2 * torch.pi
    s = rec.log_P.detach()[torch.arange(0, 64, 2), torch.arange(1, 64, 2)]
    assert s.min() >= -torch.pi and s.max() <= 0


def test_dropout_between_layers_only_in_training():
    layer = NNRNN(4, 8, num_layers=2, dropout=0.5)
    x = torch.randn(6, 3, 4)
    layer.eval()
    torch.testing.assert_close(layer(x)[0], layer(x)[0])
    layer.train()
    assert not torch.equal(layer(x)[0], layer(x)[0])


def test_recipe_groups_and_penalty():
    model = torch.nn.ModuleList([NNRNN(3, 8, num_layers=2), torch.nn.Linear(8, 2)])
    main, orth = nnrnn_fused.make_optimizers(model, lr=1e-3, lr_orth=1e-4, t_decay=1e-6)
    log_Ps = {id(l.recurrent.log_P) for l in model[0].layers}
    Ts = {id(l.recurrent.T) for l in model[0].layers}
    assert {id(p) for p in orth.param_groups[0]["params"]} == log_Ps and orth.param_groups[0]["lr"] == 1e-4
    g_rest, g_T = main.param_groups
    assert {id(p) for p in g_T["params"]} == Ts and g_T["weight_decay"] == 1e-6 and g_rest["weight_decay"] == 0
    all_ids = {id(p) for p in model.parameters()}
    assert {id(p) for p in g_rest["params"]} == all_ids - log_Ps - Ts
    with torch.no_grad():
        model[0].layers[0].recurrent.gammas.fill_(1.5)
        model[0].layers[1].recurrent.gammas.fill_(0.0)
    # 4 gammas at 1.5 and 4 at 0: delta * (4 * 0.25 + 4 * 1)
    assert nnrnn_fused.delta_penalty(model, 0.1).item() == pytest.approx(0.5)
    assert isinstance(nnrnn_fused.make_optimizers(model, lr=1e-3, lr_orth=1e-4, optimizer="adam")[0],
                      torch.optim.Adam)


def test_training_step_reduces_loss():
    """A few steps of the recipe on a fixed batch lower the loss (the whole path trains)."""
    torch.manual_seed(0)
    model = NNRNN(2, 16)
    head = torch.nn.Linear(16, 1)
    params = torch.nn.ModuleList([model, head])
    main, orth = nnrnn_fused.make_optimizers(params, lr=1e-2, lr_orth=1e-3, t_decay=1e-6)
    x, y = torch.randn(20, 8, 2), torch.randn(8, 1)
    losses = []
    for _ in range(30):
        loss = (head(model(x)[1][0]) - y).square().mean() + nnrnn_fused.delta_penalty(params, 1e-4)
        main.zero_grad(), orth.zero_grad()
        loss.backward()
        main.step(), orth.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------- reuse_recurrent_matrices

@pytest.mark.parametrize("recurrent", ["nnrnn", "orthogonal", "free"])
def test_reuse_recurrent_matrices_steps_like_the_whole_sequence(monkeypatch, recurrent):
    """Step by step inside the block: the outputs of one call over the whole sequence, every W
    built once (2 layers x 2 directions would be 4 builds per call without the block)."""
    torch.manual_seed(0)
    layer = NNRNN(3, 6, num_layers=2, recurrent=recurrent)
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        whole, h_whole = layer(x)
        calls = count_W_builds(monkeypatch)
        with nnrnn_fused.reuse_recurrent_matrices(layer):
            assert len(calls) == 2
            h, outs = None, []
            for t in range(5):
                out, h = layer(x[t:t + 1], h)
                outs.append(out)
        assert len(calls) == 2
        torch.testing.assert_close(torch.cat(outs), whole)
        torch.testing.assert_close(h, h_whole)
        layer(x)  # after the block, W is built again
        assert len(calls) == 4


def test_reuse_recurrent_matrices_bidirectional_and_model():
    torch.manual_seed(0)
    model = SequenceModel("nnrnn", 3, 6, 4)
    bi = NNRNN(3, 6, bidirectional=True)
    x = torch.randn(7, 2, 3)
    with torch.no_grad():
        expected = model(x)[0], bi(x)[0]
        with nnrnn_fused.reuse_recurrent_matrices(model), nnrnn_fused.reuse_recurrent_matrices(bi):
            assert torch.equal(model(x)[0], expected[0]) and torch.equal(bi(x)[0], expected[1])
            assert torch.equal(bi.recurrent_matrix(0, reverse=True), bi.layers_reverse[0].recurrent())


def test_reuse_recurrent_matrices_refuses_stale_or_differentiable_use():
    torch.manual_seed(0)
    layer = NNRNN(3, 6)
    x = torch.randn(4, 2, 3)
    with nnrnn_fused.reuse_recurrent_matrices(layer):
        with pytest.raises(RuntimeError, match="for inference: W was built without gradients"):
            layer(x)
        with torch.no_grad():
            layer(x)
            layer.layers[0].recurrent.T.add_(0.1)
            with pytest.raises(RuntimeError, match="recurrent parameters changed inside"):
                layer(x)
        with pytest.raises(RuntimeError, match="already active"):
            with nnrnn_fused.reuse_recurrent_matrices(layer):
                pass
    # left: the new T is used, and gradients flow again
    layer(x)[0].sum().backward()
    assert layer.layers[0].recurrent.T.grad is not None
    # parameters that do not require grad may be reused under grad mode (x may still need gradients)
    layer.layers[0].recurrent.requires_grad_(False)
    x.requires_grad_()
    with nnrnn_fused.reuse_recurrent_matrices(layer):
        layer(x)[0].sum().backward()
    assert x.grad is not None


def test_reuse_recurrent_matrices_left_by_an_exception():
    layer = NNRNN(3, 6)
    with pytest.raises(KeyError):
        with nnrnn_fused.reuse_recurrent_matrices(layer):
            raise KeyError("inside")
    assert layer.layers[0]._reused is None
