"""nnrnn_fused.optim.RMSprop against torch.optim.RMSprop: the same updates (to an ulp or so a step: torch's
sqrt of a float tensor is not always correctly rounded), the same state, and torch's own step wherever
the fused one does not apply."""
import copy
import itertools

import pytest
import torch

from nnrnn_fused import make_optimizers
from nnrnn_fused.models import SequenceModel
from nnrnn_fused.optim import RMSprop

OPTIONS = [dict(momentum=m, centered=c, maximize=x, alpha=a)
           for m, c, x, a in itertools.product((0.0, 0.9), (False, True), (False, True), (0.99, 0.3))]
# relative to each tensor's largest value: rounding grows over 25 steps, most where the centered
# variance v - g_avg^2 nearly cancels (alpha 0.3 in float32)
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-13}


def assert_close_scaled(actual, expected, dtype, msg=None):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * expected.abs().max().item(), msg=msg)


def train(cls, dtype, steps=25, **options):
    """Two groups (the second with weight decay), one parameter without a gradient half the time;
    returns the parameters and the optimizer."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=gen, dtype=dtype).requires_grad_() for shape in [(33, 17), (5,), (40,)]]
    opt = cls([{"params": params[:2]}, {"params": params[2:], "weight_decay": 1e-2}], lr=1e-2, **options)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = None if i == 1 and step % 2 else torch.randn(p.shape, generator=gen, dtype=dtype)
        opt.step()
    return params, opt


def assert_same_training(a, b, dtype):
    (pa, oa), (pb, ob) = a, b
    for x, y in zip(pa, pb):
        assert_close_scaled(x, y, dtype)
        sa, sb = oa.state[x], ob.state[y]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert_close_scaled(sa[key], sb[key], dtype, msg=key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_the_fused_step_matches_torch(dtype, options, monkeypatch):
    expected = train(torch.optim.RMSprop, dtype, **options)

    def refuse(*args, **kwargs):
        raise AssertionError("torch's step ran where the fused one applies")

    monkeypatch.setattr(torch.optim.RMSprop, "step", refuse)
    assert_same_training(train(RMSprop, dtype, **options), expected, dtype)


def test_the_recipe_uses_it():
    model = SequenceModel("nnrnn", 3, 8, 2)
    assert all(type(opt) is RMSprop for opt in make_optimizers(model, lr=1e-3, lr_orth=1e-4))


def random_grads(params, case):
    for p in params:
        p.grad = torch.randn(p.shape[::-1], dtype=p.dtype).mT if case == "non-contiguous grad" else torch.randn_like(p)


@pytest.mark.parametrize("case", ["tensor lr", "non-contiguous grad", "float16"])
def test_torch_steps_where_the_fused_step_does_not_apply(case, monkeypatch):
    dtype = torch.float16 if case == "float16" else torch.float32
    calls = []
    torch_step = torch.optim.RMSprop.step

    def counted(self, *args):
        calls.append(type(self))
        return torch_step(self, *args)

    monkeypatch.setattr(torch.optim.RMSprop, "step", counted)
    runs = []
    for cls in (torch.optim.RMSprop, RMSprop):
        torch.manual_seed(0)
        params = [torch.randn(6, 4, dtype=dtype).requires_grad_(), torch.randn(3, 5, dtype=dtype).requires_grad_()]
        opt = cls(params, lr=torch.tensor(1e-2) if case == "tensor lr" else 1e-2)
        for _ in range(3):
            random_grads(params, case)
            opt.step()
        runs.append(params)
    assert calls == [torch.optim.RMSprop] * 3 + [RMSprop] * 3  # each of ours handed to torch's step
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("first", [torch.optim.RMSprop, RMSprop], ids=["from torch", "to torch"])
def test_state_dicts_move_between_the_two(first):
    second = RMSprop if first is torch.optim.RMSprop else torch.optim.RMSprop
    params, opt = train(first, torch.float64, steps=5, momentum=0.5, centered=True)
    mirror = [p.detach().clone().requires_grad_() for p in params]
    moved = second([{"params": mirror[:2]}, {"params": mirror[2:], "weight_decay": 1e-2}], lr=1e-2)
    moved.load_state_dict(copy.deepcopy(opt.state_dict()))  # state tensors are not copied on loading
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        for p, q in zip(params, mirror):
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            q.grad = p.grad.clone()
        opt.step()
        moved.step()
    assert_same_training((params, opt), (mirror, moved), torch.float64)


def test_closure():
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    opt = RMSprop([w], lr=0.1)
    loss = opt.step(lambda: (w.square().sum().backward(), w.square().sum().detach())[1])
    assert loss.item() == 5.0
    # the first step moves each weight by lr / (sqrt(1 - alpha) + eps / |g|) against its gradient
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, -2.0]) - 0.1 / 0.1 * torch.tensor([1.0, -1.0]))


def op_args(n=5, centered=False, momentum=0.0):
    t = [torch.randn(n) for _ in range(2)] + [torch.rand(n)]
    lists = ([t[0]], [t[1]], [t[2]], [torch.zeros(n)] if centered else [], [torch.zeros(n)] if momentum else [],
             [torch.zeros(())])
    return lists + (1e-2, 0.99, 1e-8, 0.0, momentum, centered, False)


@pytest.mark.parametrize("centered, momentum", [(False, 0.0), (True, 0.9)])
def test_opcheck(centered, momentum):
    torch.library.opcheck(torch.ops.nnrnn_fused.rmsprop_step_.default, op_args(centered=centered, momentum=momentum))


@pytest.mark.parametrize("change, message", [
    (lambda a: a.__setitem__(1, []), "must be as many"),
    (lambda a: a.__setitem__(1, [torch.randn(5, dtype=torch.float64)]),
     r"grads\[0\] must be a contiguous CPU tensor of Float"),
    (lambda a: a.__setitem__(2, [torch.rand(4)]), r"square_avgs\[0\] .* with 5 elements"),
    (lambda a: a.__setitem__(3, [torch.zeros(5)]), "grad_avgs must hold one tensor per parameter when centered"),
    (lambda a: a.__setitem__(0, [torch.randn(5, dtype=torch.float16)]), r"params\[0\] must be a contiguous float32"),
    (lambda a: a.__setitem__(5, [torch.zeros(2)]), r"steps\[0\] must be a floating-point CPU scalar"),
])
def test_bad_arguments_are_named(change, message):
    args = list(op_args())
    change(args)
    with pytest.raises(ValueError, match=message):
        torch.ops.nnrnn_fused.rmsprop_step_(*args)
