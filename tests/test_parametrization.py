"""The Schur-form recurrent matrix W = P (Lambda + T*M) P^T and its siblings."""
import math

import pytest
import torch

import nnrnn_fused
from nnrnn_fused.parametrization import (DenseRecurrence, OrthogonalRecurrence, SchurRecurrence, init_log_P,
                                         schur_mask, skew)

from helpers import relative_gradient_error


def explicit_block_rotations(thetas, gammas):
    """Lambda built entry by entry (the independent truth for the vectorised build)."""
    n = 2 * len(thetas)
    L = torch.zeros(n, n, dtype=thetas.dtype)
    for i, (th, g) in enumerate(zip(thetas.tolist(), gammas.tolist())):
        L[2 * i, 2 * i], L[2 * i, 2 * i + 1] = g * math.cos(th), -g * math.sin(th)
        L[2 * i + 1, 2 * i], L[2 * i + 1, 2 * i + 1] = g * math.sin(th), g * math.cos(th)
    return L


@pytest.mark.parametrize("init", ["cayley", "henaff", "random"])
@pytest.mark.parametrize("n", [2, 8, 64])
def test_P_is_orthogonal(init, n):
    rec = SchurRecurrence(n, init=init, dtype=torch.float64)
    with torch.no_grad():
        rec.log_P.add_(0.3 * torch.randn(n, n, dtype=torch.float64))  # away from the init's structure too
    P = rec.orthogonal()
    torch.testing.assert_close(P @ P.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-10)
    assert abs(torch.linalg.det(P).item() - 1) < 1e-10


@pytest.mark.parametrize("init", ["cayley", "henaff"])
def test_initial_W_is_block_rotation(init):
    """With T = 0 and P a block rotation, W = P Lambda P^T = Lambda (2x2 rotations commute)."""
    rec = SchurRecurrence(16, init=init, dtype=torch.float64)
    expected = explicit_block_rotations(rec.thetas.detach(), torch.ones(8, dtype=torch.float64))
    torch.testing.assert_close(rec(), expected, rtol=0, atol=1e-12)


def test_random_init_is_a_rotation():
    log_P = init_log_P(10, "random", torch.Generator().manual_seed(3))
    assert torch.all(torch.tril(log_P) == 0)
    P = torch.linalg.matrix_exp(log_P - log_P.T)
    torch.testing.assert_close(P @ P.T, torch.eye(10, dtype=torch.float64), rtol=0, atol=1e-10)
    assert (P - torch.eye(10, dtype=torch.float64)).abs().max() > 0.1  # not a trivial rotation


def test_random_init_is_haar_on_SO_n():
    # SPEC section 2's "random orthogonal": Haar on the rotations. Cheap statistics of
    # Haar Q in SO(n), n >= 3: det +1, E[tr Q] = 0, E[tr(Q)^2] = 1, P(Q_ii > 0) = 1/2. The
    # authors' sign fix, diag(q) instead of diag(r), makes every Q_ii >= 0, so E[tr Q] is
    # about sqrt(2n/pi) there: these checks tell the two apart.
    n, draws = 6, 400
    g = torch.Generator().manual_seed(0)
    Q = torch.stack([torch.linalg.matrix_exp(skew(init_log_P(n, "random", g))) for _ in range(draws)])
    torch.testing.assert_close(torch.linalg.det(Q), torch.ones(draws, dtype=torch.float64), rtol=0, atol=1e-10)
    diagonal = torch.diagonal(Q, dim1=1, dim2=2)
    trace = diagonal.sum(1)
    assert abs(trace.mean()) < 0.15  # standard error 1/sqrt(400) = 0.05
    assert abs(trace.square().mean() - 1) < 0.3
    assert 0.4 < (diagonal > 0).double().mean() < 0.6


def test_vectorised_lambda_matches_explicit():
    rec = SchurRecurrence(12, dtype=torch.float64)
    with torch.no_grad():
        rec.gammas.uniform_(0.5, 1.5)
        rec.log_P.zero_()
    torch.testing.assert_close(rec(), explicit_block_rotations(rec.thetas.detach(), rec.gammas.detach()))


def test_exact_spectrum():
    """With exact_spectrum=True and any T, the eigenvalues of W are gamma_i e^{+-i theta_i};
    with the default mask, non-zero in-block entries of T move them."""
    n = 10
    gen = torch.Generator().manual_seed(1)
    for exact in (True, False):
        rec = SchurRecurrence(n, init="random", exact_spectrum=exact, dtype=torch.float64, generator=gen)
        with torch.no_grad():
            rec.T.copy_(torch.randn(n, n, dtype=torch.float64, generator=gen))
            rec.gammas.uniform_(0.5, 1.5, generator=gen)
        eig = torch.linalg.eigvals(rec().detach())
        g, th = rec.gammas.detach(), rec.thetas.detach()
        expected = torch.cat([g * torch.exp(1j * th), g * torch.exp(-1j * th)])
        # match each expected eigenvalue to its nearest computed one
        dist = (expected[:, None] - eig[None, :]).abs().min(dim=1).values.max().item()
        if exact:
            assert dist < 1e-8
        else:
            assert dist > 1e-3


def test_mask():
    m = schur_mask(6, exact_spectrum=False)
    assert torch.equal(m, torch.ones(6, 6).triu(1))
    m = schur_mask(6, exact_spectrum=True)
    assert m[0, 1] == 0 and m[2, 3] == 0 and m[4, 5] == 0 and m[1, 2] == 1 and m.sum() == 15 - 3


def test_gradcheck_W_construction():
    rec = SchurRecurrence(6, init="random", dtype=torch.float64)

    def build(log_P, thetas, gammas, T):
        P = torch.linalg.matrix_exp(torch.triu(log_P, 1) - torch.triu(log_P, 1).T)
        return P @ (nnrnn_fused.parametrization.block_rotations(thetas, gammas) + T * rec.mask) @ P.T

    params = [rec.log_P.detach().clone().requires_grad_(), rec.thetas.detach().clone().requires_grad_(),
              rec.gammas.detach().clone().requires_grad_(), torch.randn(6, 6, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(build, params)
    # and the module computes that same function
    with torch.no_grad():
        rec.T.copy_(params[3])
    torch.testing.assert_close(rec(), build(*params))


def test_only_upper_triangles_are_used():
    rec = SchurRecurrence(8, dtype=torch.float64)
    with torch.no_grad():
        rec.T.normal_()
    W = rec()
    W.sum().backward()
    assert torch.all(torch.tril(rec.log_P.grad) == 0)
    assert torch.all(torch.tril(rec.T.grad) == 0)
    assert torch.any(torch.triu(rec.T.grad, 1) != 0)


def test_free_parameter_counts_match_paper():
    """SPEC section 5: log_P and T count N(N-1)/2 each, plus N/2 thetas and N/2 gammas,
    plus U (no bias), the modReLU bias and the read-out."""
    def count(n_in, n, n_out, embedding=None):
        model = torch.nn.ModuleList([nnrnn_fused.NNRNN(n_in, n), torch.nn.Linear(n, n_out)])
        if embedding:
            model.append(torch.nn.Embedding(*embedding))
        return nnrnn_fused.count_free_parameters(model)

    assert count(10, 128, 9) == 18953  # copy task: one-hot input 10, 9 classes
    assert count(1, 512, 10) == 268298  # psMNIST
    assert count(200, 1024, 50, embedding=(50, 200)) == 1315650  # PTB characters, 50 symbols


def test_orthogonal_and_dense():
    o = OrthogonalRecurrence(7, init="henaff", dtype=torch.float64)  # odd sizes work for these
    W = o()
    torch.testing.assert_close(W @ W.T, torch.eye(7, dtype=torch.float64), rtol=0, atol=1e-12)
    d = DenseRecurrence(7, init="random", dtype=torch.float64)
    torch.testing.assert_close(d() @ d().T, torch.eye(7, dtype=torch.float64), rtol=0, atol=1e-12)
    assert nnrnn_fused.count_free_parameters(o) == 21 and nnrnn_fused.count_free_parameters(d) == 49


def test_odd_hidden_size_rejected():
    with pytest.raises(ValueError, match="even hidden_size"):
        SchurRecurrence(7)


@pytest.mark.parametrize("n,scale", [(6, 0.1), (6, 3.0), (64, 1.0), (9, 0.5), (1, 1.0), (3, 1.0), (7, 1e-3),
                                     (8, 5.0)])
def test_skew_exponential_matches_matrix_exp(n, scale):
    """The eigendecomposition route against torch.linalg.matrix_exp and its autograd."""
    from nnrnn_fused.parametrization import orthogonal_from, skew

    L = (scale * torch.randn(n, n, dtype=torch.float64)).requires_grad_()
    G = torch.randn(n, n, dtype=torch.float64)
    P = orthogonal_from(L)
    P_ref = torch.linalg.matrix_exp(skew(L))
    g, = torch.autograd.grad((P * G).sum(), L)
    g_ref, = torch.autograd.grad((P_ref * G).sum(), L)
    torch.testing.assert_close(P, P_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-11)


def test_skew_exponential_gradcheck_and_degenerate_spectra():
    from nnrnn_fused.parametrization import orthogonal_from, skew

    L = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(orthogonal_from, (L,))
    # repeated eigenvalues: A = 0 (exp'(0) is the identity map) and equal 2x2 blocks (the init's shape)
    for log_P in (torch.zeros(6, 6, dtype=torch.float64), init_log_P(6, "henaff")):
        if log_P.abs().sum() > 0:
            log_P[torch.arange(0, 6, 2), torch.arange(1, 6, 2)] = 0.7
        log_P.requires_grad_()
        G = torch.randn(6, 6, dtype=torch.float64)
        g, = torch.autograd.grad((orthogonal_from(log_P) * G).sum(), log_P)
        g_ref, = torch.autograd.grad((torch.linalg.matrix_exp(skew(log_P)) * G).sum(), log_P)
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [128, 512])
def test_float32_gradient_of_P_is_accurate(n):
    """float32 log_P gradients within 5e-6 of float64 (measured: 1.1e-6 at N=128, 1.7e-6 at 512;
    autograd through float32 torch.linalg.matrix_exp: 1.7e-5 and 3.2e-5 on the same inputs)."""
    assert relative_gradient_error(n, torch.float32) < 5e-6


def divided_differences_of_the_cpu_op(theta):
    """F_c and F_s as the C++ op (csrc/cpu/skew_exp_cpu.cpp) applies them: with M of ones and K = 0 its
    output is 2 F_c spread over the eigenvalues (each angle twice for even n), and the other way round."""
    n = 2 * theta.shape[-1]
    ones, zeros = torch.ones(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    return tuple(torch.ops.nnrnn_fused.skew_exp_inner(theta, M, K)[::2, ::2] / 2
                 for M, K in ((ones, zeros), (zeros, ones)))


@pytest.mark.parametrize("route", ["torch", "cpu op"])
def test_divided_differences_against_40_digit_arithmetic(route):
    """F_c and F_s of the backward against the plain quotients (derivatives where the angles
    coincide) in 40-digit arithmetic, over the regimes: zero, tiny, both sides of the series'
    threshold (0.05) and of the C++ op's switch to direct sines (0.25), nearly equal and far
    apart angles; for the PyTorch operations and for the C++ op that replaces them on the CPU."""
    mp = pytest.importorskip("mpmath")
    from nnrnn_fused.parametrization import _divided_differences

    mp.mp.dps = 40
    angles = [0.0, 1e-12, 1e-9, 1e-4, 1e-3, 0.0499, 0.05, 0.0501, 0.3, 0.3 + 1e-9, 0.3 + 1e-5, 0.49, 0.51, 1.0, 2.0,
              math.pi, 10.0, 25.0, 100.0]
    theta = torch.tensor(angles, dtype=torch.float64)
    F_c, F_s = _divided_differences(theta) if route == "torch" else divided_differences_of_the_cpu_op(theta)

    def sinc(x):
        return mp.sin(x) / x if x else mp.mpf(1)

    def divided(f, derivative, a, b):
        a, b = mp.mpf(a), mp.mpf(b)
        return derivative(a) if a == b else (f(a) - f(b)) / (a * a - b * b)

    def d_cos(a):  # d/dl cos(sqrt l) at l = a^2
        return -sinc(a) / 2

    def d_sinc(a):  # d/dl sinc(sqrt l) at l = a^2
        return (mp.cos(a) - sinc(a)) / (2 * a * a) if a else mp.mpf(-1) / 6

    for j, a in enumerate(angles):
        for k, b in enumerate(angles):
            assert abs(F_c[j, k].item() - float(divided(mp.cos, d_cos, a, b))) < 1e-15, (a, b)
            assert abs(F_s[j, k].item() - float(divided(sinc, d_sinc, a, b))) < 5e-13, (a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n", [1, 2, 3, 8, 65])
def test_cpu_op_of_the_backward_matches_the_torch_operations(n, dtype):
    """The C++ op that the CPU backward uses against the PyTorch operations it replaces (used under
    torch.compile, torch.func and on GPUs), on a batch of 2, with a zero, equal and close angles."""
    from nnrnn_fused.parametrization import _divided_differences, _per_eigenvalue

    k = n // 2 + n % 2
    gen = torch.Generator().manual_seed(n)
    theta = 3 * torch.rand(2, k, generator=gen, dtype=torch.float64)
    theta[:, 0] = 0.0
    if k > 2:
        theta[0, 2] = theta[0, 1]
        theta[1, 2] = theta[1, 1] + 1e-7
    M, K = (torch.randn(2, n, n, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    F_c, F_s = (_per_eigenvalue(F.to(dtype), n, dims=2) for F in _divided_differences(theta))
    expected = F_c * (M + M.mT) + F_s * (K + K.mT)
    scale = expected.abs().max().item()
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(torch.ops.nnrnn_fused.skew_exp_inner(theta, M, K), expected, rtol=0, atol=tol * scale)


def test_cpu_op_of_the_backward_names_bad_arguments():
    M = torch.zeros(4, 4)
    with pytest.raises(ValueError, match=r"theta must be float64 \(..., 2\)"):
        torch.ops.nnrnn_fused.skew_exp_inner(torch.zeros(3, dtype=torch.float64), M, M)
    with pytest.raises(ValueError, match="K must be like M"):
        torch.ops.nnrnn_fused.skew_exp_inner(torch.zeros(2, dtype=torch.float64), M, M.double())
    with pytest.raises(ValueError, match=r"M must be \(..., n, n\)"):
        torch.ops.nnrnn_fused.skew_exp_inner(torch.zeros(2, dtype=torch.float64), M[:3], M[:3])


def test_skew_exponential_batched_and_vmapped():
    """A stack of log_P matrices: P and gradients equal those of one matrix at a time, with
    torch.func.vmap too (generate_vmap_rule)."""
    from nnrnn_fused.parametrization import orthogonal_from

    L = torch.randn(3, 7, 7, dtype=torch.float64, requires_grad=True)
    G = torch.randn(3, 7, 7, dtype=torch.float64)
    g, = torch.autograd.grad((orthogonal_from(L) * G).sum(), L)
    for i in range(3):
        torch.testing.assert_close(orthogonal_from(L[i]), torch.linalg.matrix_exp(skew(L[i])), rtol=0, atol=1e-12)
        g_i, = torch.autograd.grad((orthogonal_from(L[i]) * G[i]).sum(), L)
        torch.testing.assert_close(g[i], g_i[i], rtol=0, atol=1e-13)
    grad_one = torch.func.grad(lambda log_P, G: (orthogonal_from(log_P) * G).sum())
    torch.testing.assert_close(torch.func.vmap(grad_one)(L.detach(), G), g, rtol=0, atol=1e-13)
