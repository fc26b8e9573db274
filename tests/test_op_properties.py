"""Property-based test of the op's argument space (hypothesis) against the reference loop.

Random shapes (0 and 1 included), dtypes, layouts (contiguous, transposed, strided, expanded),
lengths (tensors of both integer types, lists), h0, NaN or +-inf in b (or x, W, h0), every
nonlinearity, and one bad argument now and then. Every call either matches the reference
(output, h_n and the gradients of every input; gradients only where the output holds no NaN)
or raises a ValueError naming the bad argument, as the reference does.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nnrnn_fused import fused_nnrnn
from nnrnn_fused._checks import NONLINEARITIES
from nnrnn_fused.reference import nnrnn_recurrence

from helpers import tolerances

LAYOUTS = ("contiguous", "transposed", "strided", "expanded")
# A bad argument: (name that the error must contain, applies when (T, B, N) allow it).
FAULTS = {
    "x rank": ("x", lambda T, B, N: True),
    "x dtype": ("x", lambda T, B, N: True),
    "W shape": ("W", lambda T, B, N: True),
    "W dtype": ("W", lambda T, B, N: True),
    "b shape": ("b", lambda T, B, N: True),
    "h0 shape": ("h0", lambda T, B, N: True),
    "h0 dtype": ("h0", lambda T, B, N: True),
    "lengths shape": ("lengths", lambda T, B, N: True),
    "lengths float list": ("lengths", lambda T, B, N: B > 0),
    "lengths float tensor": ("lengths", lambda T, B, N: True),
    "lengths too long": ("lengths", lambda T, B, N: B > 0),
    "lengths negative": ("lengths", lambda T, B, N: B > 0),
    "nonlinearity": ("nonlinearity", lambda T, B, N: True),
}


def in_layout(leaf, layout):
    """A differentiable view of `leaf`'s values in the given memory layout."""
    if layout == "transposed" and leaf.dim() >= 2:
        return leaf.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "strided" and leaf.dim() >= 1:
        return torch.repeat_interleave(leaf, 2, dim=-1)[..., ::2]
    return leaf


@st.composite
def cases(draw):
    T, B, N = draw(st.integers(0, 4)), draw(st.integers(0, 3)), draw(st.integers(0, 5))
    case = dict(T=T, B=B, N=N, dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                nonlinearity=draw(st.sampled_from(NONLINEARITIES)), seed=draw(st.integers(0, 2**31 - 1)),
                layouts={k: draw(st.sampled_from(LAYOUTS)) for k in ("x", "W", "b", "h0")},
                with_b=draw(st.booleans()), with_h0=draw(st.booleans()),
                lengths=draw(st.sampled_from([None, "int64", "int32", "list"])),
                length_values=draw(st.lists(st.integers(0, T), min_size=B, max_size=B)),
                zero_x=draw(st.booleans()))  # zeros in x reach z = 0 exactly (modReLU: 0 * inf)
    # NaN or +-inf in one input (mostly b); the index is taken modulo the input's size. W only with
    # an h0: without one the first step has no product with W (README: the zero state).
    targets = [t for t, present in (("b", case["with_b"]), ("x", True), ("W", case["with_h0"]),
                                    ("h0", case["with_h0"])) if present]
    special = None
    if N > 0 and draw(st.booleans()):
        special = (draw(st.sampled_from(targets[:1] * 3 + targets)), draw(st.integers(0, 1000)),
                   draw(st.sampled_from([math.nan, math.inf, -math.inf])))
    case["special"] = special
    faults = [f for f, (_, applies) in FAULTS.items() if applies(T, B, N)]
    case["fault"] = draw(st.sampled_from(faults)) if draw(st.integers(0, 3)) == 0 else None
    return case


def make_leaves(case):
    """The inputs as leaf tensors (expanded layouts: the leaf is the un-expanded base)."""
    T, B, N, dtype = case["T"], case["B"], case["N"], case["dtype"]
    g = torch.Generator().manual_seed(case["seed"])
    shapes = dict(x=(T, B, N), W=(N, N), b=(N,), h0=(B, N))
    scales = dict(x=1.0, W=0.6 / math.sqrt(max(N, 1)), b=0.3, h0=0.5)
    leaves = {}
    for name, shape in shapes.items():
        if name == "b" and not case["with_b"] or name == "h0" and not case["with_h0"]:
            continue
        base = shape if case["layouts"][name] != "expanded" else (1,) + shape[1:]
        leaves[name] = scales[name] * torch.randn(base, generator=g, dtype=torch.float64)
        if name == "x" and case["zero_x"]:
            leaves[name][..., : (N + 1) // 2] = 0
    if case["special"] is not None:
        target, index, value = case["special"]
        flat = leaves[target].view(-1)
        if flat.numel():
            flat[index % flat.numel()] = value
    return {k: v.to(dtype).requires_grad_() for k, v in leaves.items()}


def arguments(case, leaves):
    """The call's arguments built from the leaves, with the case's layout and fault."""
    T, B, N, dtype = case["T"], case["B"], case["N"], case["dtype"]
    shapes = dict(x=(T, B, N), W=(N, N), b=(N,), h0=(B, N))
    args = {k: in_layout(v.expand(shapes[k]) if case["layouts"][k] == "expanded" else v, case["layouts"][k])
            for k, v in leaves.items()}
    args.setdefault("b", None)
    args.setdefault("h0", None)
    values = case["length_values"]
    lengths = {None: None, "list": list(values), "int64": torch.tensor(values, dtype=torch.int64),
               "int32": torch.tensor(values, dtype=torch.int32)}[case["lengths"]]
    nonlinearity = case["nonlinearity"]
    other = torch.float64 if dtype == torch.float32 else torch.float32
    fault = case["fault"]
    if fault == "x rank":
        args["x"] = args["x"].flatten(0, 1)
    elif fault == "x dtype":
        args["x"] = args["x"].half()
    elif fault == "W shape":
        args["W"] = torch.zeros(N, N + 1, dtype=dtype)
    elif fault == "W dtype":
        args["W"] = args["W"].to(other)
    elif fault == "b shape":
        args["b"] = torch.zeros(N + 1, dtype=dtype)
    elif fault == "h0 shape":
        args["h0"] = torch.zeros(B + 1, N, dtype=dtype)
    elif fault == "h0 dtype":
        args["h0"] = torch.zeros(B, N, dtype=other)
    elif fault == "lengths shape":
        lengths = torch.zeros(B + 1, dtype=torch.int64)
    elif fault == "lengths float list":
        lengths = [v + 0.5 for v in values]
    elif fault == "lengths float tensor":
        lengths = torch.tensor(values, dtype=torch.float32)
    elif fault == "lengths too long":
        lengths = [T + 1] + values[1:]
    elif fault == "lengths negative":
        lengths = [-1] + values[1:]
    elif fault == "nonlinearity":
        nonlinearity = "sigmoid"
    return args, dict(nonlinearity=nonlinearity, lengths=lengths)


def run(impl, case):
    """(output, h_n, gradients of the leaves) or the ValueError/RuntimeError raised."""
    leaves = make_leaves(case)
    args, kwargs = arguments(case, leaves)
    try:
        out, h_n = impl(args["x"], args["W"], args["b"], args["h0"], **kwargs)
    except (ValueError, RuntimeError) as e:
        return e
    g = torch.Generator().manual_seed(case["seed"] + 1)
    grads = (torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype),
             torch.randn(h_n.shape, generator=g, dtype=torch.float64).to(h_n.dtype))
    used = [t for t in (out, h_n) if t.requires_grad]
    names = list(leaves)
    if used:
        got = torch.autograd.grad(used, [leaves[k] for k in names],
                                  [grads[i] for i, t in enumerate((out, h_n)) if t.requires_grad],
                                  allow_unused=True)
    else:
        got = [None] * len(names)
    # an input that does not reach the outputs (e.g. T = 0) has a zero gradient
    return out, h_n, {k: torch.zeros_like(leaves[k]) if d is None else d for k, d in zip(names, got)}


@settings(max_examples=1000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_fused_op_matches_reference_or_names_the_bad_argument(case):
    fused, ref = run(fused_nnrnn, case), run(nnrnn_recurrence, case)
    if case["fault"] is not None:
        name = FAULTS[case["fault"]][0]
        for result in (fused, ref):
            assert isinstance(result, ValueError), (case, result)
            assert name in str(result), (case, result)
        return
    assert not isinstance(fused, Exception), (case, fused)
    assert not isinstance(ref, Exception), (case, ref)
    rtol, atol = tolerances(case["dtype"])
    for what, a, r in (("output", fused[0], ref[0]), ("h_n", fused[1], ref[1])):
        torch.testing.assert_close(a, r, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}\n{case}")
    if torch.isnan(ref[0]).any() or torch.isnan(ref[1]).any():
        # Gradients through a NaN output are left unspecified: the loss is NaN anyway, and the
        # backward, which sees only h_t, cannot recover the sign of z_t that the reference's
        # gradient at such a unit uses (README, fused_nnrnn). They must exist, with the right shapes.
        assert all(d.shape == ref[2][name].shape for name, d in fused[2].items())
        return
    for name, d in fused[2].items():
        r = ref[2][name]
        if case["lengths"] is not None:
            # The reference also runs the steps past a sequence's length and masks them with
            # torch.where, whose backward multiplies a NaN there by 0; the fused op skips them.
            keep = ~torch.isnan(r)
            d, r = d[keep], r[keep]
        torch.testing.assert_close(d, r, rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"grad of {name}: {m}\n{case}")
