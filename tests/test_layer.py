"""The NNRNN layer: torch.nn.RNN's interface and results, packed sequences, the recipe."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import nnrnn_fused
from nnrnn_fused import NNRNN


def rnn_twin(layer: NNRNN) -> torch.nn.RNN:
    """torch.nn.RNN computing what a recurrent='free', tanh NNRNN computes: weight_ih = U,
    weight_hh = W^T, bias_ih = b, bias_hh = 0."""
    rnn = torch.nn.RNN(layer.input_size, layer.hidden_size, num_layers=layer.num_layers, nonlinearity="tanh",
                       batch_first=layer.batch_first, dtype=layer.layers[0].b.dtype)
    with torch.no_grad():
        for i, l in enumerate(layer.layers):
            getattr(rnn, f"weight_ih_l{i}").copy_(l.U.weight)
            getattr(rnn, f"weight_hh_l{i}").copy_(l.recurrent.weight.T)
            getattr(rnn, f"bias_ih_l{i}").copy_(l.b)
            getattr(rnn, f"bias_hh_l{i}").zero_()
    return rnn


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_matches_torch_rnn(batch_first, num_layers):
    layer = NNRNN(5, 8, nonlinearity="tanh", recurrent="free", num_layers=num_layers, batch_first=batch_first,
                  dtype=torch.float64)
    rnn = rnn_twin(layer)
    x = torch.randn(4, 11, 5, dtype=torch.float64) if batch_first else torch.randn(11, 4, 5, dtype=torch.float64)
    h0 = torch.randn(num_layers, 4, 8, dtype=torch.float64)
    out, h_n = layer(x, h0)
    out_t, h_t = rnn(x, h0)
    torch.testing.assert_close(out, out_t)
    torch.testing.assert_close(h_n, h_t)
    (out.sum() + h_n.sum()).backward()
    (out_t.sum() + h_t.sum()).backward()
    torch.testing.assert_close(layer.layers[-1].recurrent.weight.grad, getattr(rnn, f"weight_hh_l{num_layers - 1}").grad.T)
    torch.testing.assert_close(layer.layers[0].U.weight.grad, rnn.weight_ih_l0.grad)


def test_packed_sequence_matches_torch_rnn():
    layer = NNRNN(3, 6, nonlinearity="tanh", recurrent="free", num_layers=2, dtype=torch.float64)
    rnn = rnn_twin(layer)
    lengths = torch.tensor([5, 9, 1, 7])  # unsorted
    padded = torch.randn(9, 4, 3, dtype=torch.float64)
    packed = pack_padded_sequence(padded, lengths, enforce_sorted=False)
    out, h_n = layer(packed)
    out_t, h_t = rnn(packed)
    assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
    torch.testing.assert_close(out.data, out_t.data)
    torch.testing.assert_close(h_n, h_t)
    # padded input with lengths gives the same, with zeros past each length
    out_p, h_p = layer(padded, lengths=lengths)
    torch.testing.assert_close(out_p, pad_packed_sequence(out_t, total_length=9)[0])
    torch.testing.assert_close(h_p, h_t)


@pytest.mark.parametrize("recurrent", ["nnrnn", "orthogonal", "free"])
@pytest.mark.parametrize("nonlinearity", ["modrelu", "tanh", "relu"])
def test_fused_and_reference_backends_agree(recurrent, nonlinearity):
    fused = NNRNN(4, 10, nonlinearity=nonlinearity, recurrent=recurrent, num_layers=2, dtype=torch.float64)
    ref = NNRNN(4, 10, nonlinearity=nonlinearity, recurrent=recurrent, num_layers=2, dtype=torch.float64,
                backend="reference")
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
