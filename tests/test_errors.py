"""Bad input gets a clear error naming the problem, from the C++ op (fused), the
Python checks (reference loop, torch.compile's fake implementation) and the layer."""
import numpy as np
import pytest
import torch

from nnrnn_fused import NNRNN, fused_nnrnn
from nnrnn_fused.reference import nnrnn_recurrence

T, B, N = 5, 3, 4


def good():
    return dict(x=torch.randn(T, B, N), W=torch.randn(N, N), b=torch.randn(N), h0=torch.randn(B, N))


CASES = [
    ("x rank", dict(x=torch.randn(T, N)), "x must have shape \\(T, B, N\\)"),
    ("W shape", dict(W=torch.randn(N, N + 1)), "W must have shape \\(N, N\\)"),
    ("b shape", dict(b=torch.randn(N + 1)), "b must have shape \\(N,\\)"),
    ("h0 shape", dict(h0=torch.randn(B + 1, N)), "h0 must have shape \\(B, N\\)"),
    ("W dtype", dict(W=torch.randn(N, N, dtype=torch.float64)), "W has dtype .*Double|W has dtype torch.float64"),
    ("h0 dtype", dict(h0=torch.randn(B, N, dtype=torch.float64)), "h0 has dtype"),
    ("x dtype", dict(x=torch.randn(T, B, N).half(), W=torch.randn(N, N).half(), b=None, h0=None), "x has dtype"),
    ("int x", dict(x=torch.ones(T, B, N, dtype=torch.int64), W=None, b=None, h0=None), "x has dtype"),
    ("W device", dict(W=torch.randn(N, N, device="meta")), "W is on meta"),
    ("lengths shape", dict(lengths=torch.tensor([1, 2])), "lengths must have shape \\(B,\\)"),
    ("lengths dtype", dict(lengths=torch.tensor([1.0, 2.0, 3.0])), "lengths must be int64 or int32"),
    ("lengths too big", dict(lengths=torch.tensor([1, 2, T + 1])), "lengths must lie in \\[0, T\\]"),
    ("lengths negative", dict(lengths=torch.tensor([1, -1, 2])), "lengths must lie in \\[0, T\\]"),
    ("lengths float list", dict(lengths=[1.9, 2.5, 3.99]), "lengths must hold ints, got float 1.9"),
    ("lengths None in list", dict(lengths=[1, None, 2]), "lengths must hold ints, got NoneType"),
    ("lengths nested list", dict(lengths=[[1, 2, 3]]), "lengths must hold ints, got list"),
    ("lengths dict", dict(lengths={0: 1, 1: 2, 2: 3}), "lengths must be a \\(B,\\) int64/int32 tensor or a list"),
    ("lengths str", dict(lengths="123"), "lengths must be a \\(B,\\) int64/int32 tensor or a list"),
    ("lengths float array", dict(lengths=np.array([1.0, 2.0, 3.0])), "lengths must be int64 or int32"),
    ("nonlinearity", dict(nonlinearity="sigmoid"), "nonlinearity must be one of"),
]


def call(impl, overrides):
    args = good()
    kwargs = {k: overrides.pop(k) for k in ("lengths", "nonlinearity") if k in overrides}
    args.update(overrides)
    if args["W"] is None:
        args["W"] = torch.ones(N, N, dtype=args["x"].dtype)
    return impl(args["x"], args["W"], args["b"], args["h0"], **kwargs)


@pytest.mark.parametrize("impl", [fused_nnrnn, nnrnn_recurrence], ids=["fused", "reference"])
@pytest.mark.parametrize("name,overrides,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(impl, name, overrides, message):
    with pytest.raises(ValueError, match=message):
        call(impl, dict(overrides))


BACKWARD_CASES = [
    ("grad_output shape", dict(grad_output=(T, B, N + 1)), "grad_output must have shape"),
    ("grad_h_n shape", dict(grad_h_n=(B + 1, N)), "grad_h_n must have shape"),
    ("grad_output dtype", dict(grad_output=torch.float64), "grad_output has dtype"),
    ("grad_h_n dtype", dict(grad_h_n=torch.float64), "grad_h_n has dtype"),
    ("output rank", dict(output=(T, B)), "x must have shape \\(T, B, N\\)"),
    ("W shape", dict(W=(N, N + 1)), "W must have shape"),
    ("h0 shape", dict(h0=(B + 1, N)), "h0 must have shape"),
    ("lengths shape", dict(lengths=torch.tensor([1, 2])), "lengths must have shape \\(B,\\)"),
    ("lengths dtype", dict(lengths=torch.tensor([1.0, 2.0, 3.0])), "lengths must be int64 or int32"),
    ("nonlinearity", dict(nonlinearity="gelu"), "nonlinearity must be one of"),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("name,change,message", BACKWARD_CASES, ids=[c[0] for c in BACKWARD_CASES])
def test_backward_op_checks(device, name, change, message):
    """The real (CPU) kernel and the fake (meta) kernel used by torch.compile refuse the same arguments."""
    shapes = dict(grad_output=(T, B, N), grad_h_n=(B, N), output=(T, B, N), W=(N, N), h0=(B, N))
    args = {}
    for arg, shape in shapes.items():
        value = change.get(arg, shape)
        dtype = value if isinstance(value, torch.dtype) else torch.float32
        args[arg] = torch.randn(shape if isinstance(value, torch.dtype) else value, dtype=dtype, device=device)
    lengths = change.get("lengths")
    with pytest.raises(ValueError, match=message):
        torch.ops.nnrnn_fused.recurrence_backward(args["grad_output"], args["grad_h_n"], args["output"], args["W"],
                                                  args["h0"], lengths, change.get("nonlinearity", "tanh"))


LAYER_CASES = [
    (dict(input_size=0, hidden_size=4), "input_size must be a positive int"),
    (dict(input_size=3, hidden_size=7), "even hidden_size"),
    (dict(input_size=3, hidden_size=4, nonlinearity="gelu"), "nonlinearity must be one of"),
    (dict(input_size=3, hidden_size=4, init="xavier"), "init must be one of"),
    (dict(input_size=3, hidden_size=4, recurrent="lstm"), "recurrent must be one of"),
    (dict(input_size=3, hidden_size=4, backend="cudnn"), "backend must be one of"),
    (dict(input_size=3, hidden_size=4, dropout=1.5), "dropout must be a number in \\[0, 1\\], got 1.5"),
    (dict(input_size=3, hidden_size=4, dropout="0.5"), "dropout must be a number in \\[0, 1\\], got '0.5'"),
    (dict(input_size=3, hidden_size=4, dropout=float("nan")), "dropout must be a number in"),
    (dict(input_size=True, hidden_size=4), "input_size must be a positive int"),
    (dict(input_size=3, hidden_size=4, num_layers=2.0), "num_layers must be a positive int"),
    (dict(input_size=3, hidden_size=4, batch_first="yes"), "batch_first must be a bool"),
    (dict(input_size=3, hidden_size=4, exact_spectrum=1), "exact_spectrum must be a bool"),
    (dict(input_size=3, hidden_size=4, generator=0), "generator must be a torch.Generator or None"),
    (dict(input_size=3, hidden_size=4, dtype="float32"), "dtype must be a floating-point torch.dtype"),
    (dict(input_size=3, hidden_size=4, dtype=torch.int64), "dtype must be a floating-point torch.dtype"),
    (dict(input_size=3, hidden_size=4, proj_size=2), "proj_size is not supported"),
    (dict(input_size=3, hidden_size=4, bias=1), "bias must be a bool"),
    (dict(input_size=3, hidden_size=4, bidirectional="yes"), "bidirectional must be a bool"),
]


@pytest.mark.parametrize("kwargs,message", LAYER_CASES)
def test_bad_layer_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NNRNN(**kwargs)


def test_bad_layer_inputs():
    layer = NNRNN(3, 4, num_layers=2)
    shape = "input must have shape \\(T, B, input_size\\), or \\(T, input_size\\) unbatched, with input_size=3"
    with pytest.raises(ValueError, match=shape):
        layer(torch.randn(5, 2, 4))
    for rank in (1, 4):
        with pytest.raises(ValueError, match=shape):
            layer(torch.randn(*[3] * rank))
    with pytest.raises(ValueError, match="input must have shape \\(B, T, input_size\\)"):
        NNRNN(3, 4, batch_first=True)(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="h0 must have shape \\(num_layers \\* num_directions, B, hidden_size\\)"):
        layer(torch.randn(5, 2, 3), torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="= \\[4, 2, 4\\]"):
        NNRNN(3, 4, num_layers=2, bidirectional=True)(torch.randn(5, 2, 3), torch.randn(2, 2, 4))
    # unbatched input takes an unbatched h0, as torch.nn.RNN does
    with pytest.raises(ValueError, match="h0 must have shape \\(num_layers \\* num_directions, hidden_size\\)"):
        layer(torch.randn(5, 3), torch.randn(2, 1, 4))
    with pytest.raises(ValueError, match="layer's parameters are"):
        layer(torch.randn(5, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="only under torch.autocast"):
        layer(torch.randn(5, 2, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="lengths must lie in"):
        layer(torch.randn(5, 2, 3), lengths=[6, 1])
    with pytest.raises(ValueError, match="lengths must lie in"):  # checked before the reverse direction uses them
        NNRNN(3, 4, bidirectional=True)(torch.randn(5, 2, 3), lengths=[6, 1])
    # odd hidden sizes are fine where there are no 2x2 blocks
    out, _ = NNRNN(3, 5, recurrent="free")(torch.randn(2, 1, 3))
    assert out.shape == (2, 1, 5)


def test_double_backward_is_refused_clearly():
    x = torch.randn(T, B, N, requires_grad=True)
    W = torch.randn(N, N, requires_grad=True)
    out, _ = fused_nnrnn(x, W, nonlinearity="tanh")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), W, create_graph=True)
    # plain backward still works after the refusal
    out, _ = fused_nnrnn(x, W, nonlinearity="tanh")
    out.sum().backward()
    assert W.grad is not None

