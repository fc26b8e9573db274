"""Recurrent matrices as small modules whose forward() returns W (row convention:
the op computes z = x + h @ W).

- SchurRecurrence: nnRNN, W = P (Lambda + T * M) P^T (SPEC section 2).
- OrthogonalRecurrence: expRNN, W = P = matrix_exp(skew(log_P)).
- DenseRecurrence: a free matrix (vanilla RNN).

Each knows how many of its entries are free (``free_parameter_counts``): only the
strict upper triangles of log_P and T enter W.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import _extension

INITS = ("cayley", "henaff", "random")


def skew(log_P: torch.Tensor) -> torch.Tensor:
    """A = triu(log_P, 1) - triu(log_P, 1)^T."""
    upper = torch.triu(log_P, 1)
    return upper - upper.transpose(-1, -2)


# Float64 helpers of the backward: x / x stays finite at 0 with this floor.
_TINY = 1e-300


def _sinc(x: torch.Tensor) -> torch.Tensor:
    """sin(x) / x for x >= 0, 1 at 0 (float64; torch.sinc is several times slower on the CPU)."""
    x = x.clamp_min(_TINY)
    return torch.sin(x) / x


def _blend(cond: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.where(cond, a, b) for finite a and b, by arithmetic (torch.where is slow on the CPU)."""
    w = cond.to(a.dtype)
    return a * w + b * (1 - w)


def _divided_differences(theta: torch.Tensor):
    """F_c, F_s (float64): the divided differences of c(l) = cos(sqrt(l)) and s(l) = sinc(sqrt(l))
    between l_j = theta_j^2 and l_k = theta_k^2 (derivatives where they coincide), theta >= 0.

    With hi, lo = max, min(theta_j, theta_k), m = (hi + lo) / 2, d = (hi - lo) / 2:
        F_c = -sinc(m) sinc(d) / 2,
        F_s = (sinc hi - sinc lo) / (hi^2 - lo^2) = (cos m sinc d - sinc lo) / (2 hi m),
    free of the cancellation of the plain quotients as lo -> hi. The last one loses digits as
    hi -> 0 (absolute error ~ eps / hi^2), so below hi = 0.05 its Taylor series takes over.
    """
    a, b = theta[..., :, None], theta[..., None, :]
    hi, lo = torch.maximum(a, b), torch.minimum(a, b)
    m, d = (a + b) * 0.5, (hi - lo) * 0.5
    sinc_m, sinc_d = _sinc(m), _sinc(d)
    F_c = sinc_m * sinc_d * -0.5
    F_s = (torch.cos(m) * sinc_d - _sinc(lo)) / (hi * m * 2 + _TINY)
    lam = theta * theta
    s1, s2 = lam[..., :, None] + lam[..., None, :], (a * b).square()  # l_j + l_k, l_j l_k
    # s(l) = 1 - l/6 + l^2/120 - l^3/5040 + ..., to the l^3 term (the next adds < 2e-13 below 0.05)
    series = s1 * (1 / 120 - s1 / 5040) + (s2 / 5040 - 1 / 6)
    return F_c, _blend(hi < 0.05, series, F_s)


def _rotation_angles(lam: torch.Tensor) -> torch.Tensor:
    """theta (float64), one per rotation plane of A, from the eigenvalues of A^T A (ascending).

    A^T A = -A^2 has the eigenvalues theta_k^2 of A's 2x2 rotation planes, each twice, and one 0
    for odd n: in ascending order the pairs are neighbours (where rounding mixes two pairs, they
    are equal to rounding). Each pair's mean serves both, so the forward and the backward see one
    theta per plane, and the backward's divided differences are over n/2 angles.
    """
    n, odd = lam.shape[-1], lam.shape[-1] % 2
    pairs = lam[..., odd:].unflatten(-1, (n // 2, 2)).mean(-1, dtype=torch.float64)
    if odd:
        pairs = torch.cat([pairs.new_zeros((*pairs.shape[:-1], 1)), pairs], -1)
    return pairs.clamp_min(0).sqrt()


def _per_eigenvalue(x: torch.Tensor, n: int, dims: int = 1) -> torch.Tensor:
    """x (..., k) over the angles, or (..., k, k) with dims=2, spread over the n eigenvalues:
    every entry twice along each axis, less the first for odd n (its lone 0)."""
    k, odd = x.shape[-1], n % 2
    if dims == 1:
        return x[..., :, None].expand(*x.shape, 2).reshape(*x.shape[:-1], 2 * k)[..., odd:]
    x = x[..., :, None, :, None].expand(*x.shape[:-2], k, 2, k, 2).reshape(*x.shape[:-2], 2 * k, 2 * k)
    return x[..., odd:, odd:]


class _SkewExp(torch.autograd.Function):
    """exp(A) for a real skew-symmetric A, and its gradient, from one real symmetric eigendecomposition.

    S = A^T A = -A^2 is symmetric positive semi-definite, S = V diag(theta^2) V^T, and the even
    and odd parts of exp's series are functions of S:
        exp(A) = cos(sqrt S) + A sinc(sqrt S) = [V diag(cos theta) + (A V) diag(sinc theta)] V^T.
    Its gradient (G = dL/dP), with the Daleckii-Krein formula for the functions of S:
        dL/dA = [(G V) diag(sinc theta) + (A V) (F_c * (M + M^T) + F_s * (K + K^T))] V^T,
        M = V^T G V, K = (A V)^T G V, F_c and F_s from _divided_differences.
    (This is the gradient of the formula as a function of any A; on skew-symmetric directions,
    the only ones skew() passes on, it is exp's.) Equal to torch.linalg.matrix_exp and its
    autograd to about 1e-14 in float64; float32 gradients about 1e-6 off the float64 truth near
    an nnRNN initialisation, where matrix_exp's float32 autograd is 2e-5 to 3e-5 off
    (tests/test_parametrization.py).

    float16/bfloat16 are computed in float32.
    """

    # forward and setup_context apart (the form torch.func transforms need): V, A V, the angles
    # and sinc per eigenvalue go to the backward as extra, non-differentiable outputs
    generate_vmap_rule = True

    @staticmethod
    def forward(A):
        Aw = A.to(torch.float64 if A.dtype == torch.float64 else torch.float32)
        lam, V = torch.linalg.eigh(Aw.mT @ Aw)
        theta = _rotation_angles(lam)
        AV = Aw @ V
        cos, sinc = (_per_eigenvalue(f(theta).to(V.dtype), V.shape[-1]).unsqueeze(-2)
                     for f in (torch.cos, _sinc))
        # copy=True: the output must be a new tensor. torch 2.11's torch.compile gives an
        # autograd.Function whose output is a same-dtype .to() (which returns its input)
        # zero gradients (docs/torch_versions.md has the three-line reproduction).
        return ((V * cos + AV * sinc) @ V.mT).to(A.dtype, copy=True), V, AV, theta, sinc

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, *saved = output
        ctx.mark_non_differentiable(*saved)
        ctx.save_for_backward(*saved)

    @staticmethod
    def backward(ctx, G, *_):
        V, AV, theta, sinc = ctx.saved_tensors
        GV = G.to(V.dtype) @ V
        M, K = V.mT @ GV, AV.mT @ GV
        return ((GV * sinc + AV @ _inner(theta, M, K)) @ V.mT).to(G.dtype, copy=True)


def _inner(theta, M, K):
    """F_c * (M + M^T) + F_s * (K + K^T), F_c and F_s spread over the eigenvalues. On the CPU in eager
    mode one C++ op (csrc/cpu/skew_exp_cpu.cpp: the same formulas, some forty fewer PyTorch calls);
    under torch.compile and torch.func transforms, and on other devices, these operations."""
    if (M.device.type == "cpu" and _extension.LOADED and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()):
        return torch.ops.nnrnn_fused.skew_exp_inner(theta, M, K)
    F_c, F_s = (_per_eigenvalue(F.to(M.dtype), M.shape[-1], dims=2) for F in _divided_differences(theta))
    return F_c * (M + M.mT) + F_s * (K + K.mT)


def orthogonal_from(log_P: torch.Tensor) -> torch.Tensor:
    """P = matrix_exp(skew(log_P)): orthogonal with det +1.

    One route on every device: P and its gradient come from a real symmetric eigendecomposition
    (_SkewExp), accurate in float32 and faster than torch.linalg.matrix_exp and its autograd.
    """
    return _SkewExp.apply(skew(log_P))[0]


def block_rotations(thetas: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """Lambda: block-diagonal, block i = gamma_i [[cos th_i, -sin th_i], [sin th_i, cos th_i]].

    Built without a loop over blocks: the (2, 2, K) stack of blocks is spread onto
    the diagonal of a (2, 2, K, K) tensor and interleaved into (2K, 2K).
    """
    c, s = gammas * torch.cos(thetas), gammas * torch.sin(thetas)
    blocks = torch.stack([torch.stack([c, -s]), torch.stack([s, c])])  # (2, 2, K)
    K = thetas.shape[0]
    return torch.diag_embed(blocks).permute(2, 0, 3, 1).reshape(2 * K, 2 * K)


def schur_mask(n: int, exact_spectrum: bool, dtype=None, device=None) -> torch.Tensor:
    """M: ones strictly above the diagonal; with exact_spectrum also zero at (2i, 2i+1)."""
    mask = torch.ones(n, n, dtype=dtype, device=device).triu(1)
    if exact_spectrum:
        i = torch.arange(0, n, 2, device=device)
        mask[i, i + 1] = 0
    return mask


def init_log_P(n: int, init: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """log_P (n, n) whose strict upper triangle holds the initial skew-symmetric A."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    log_P = torch.zeros(n, n, dtype=torch.float64)
    i = torch.arange(0, n - 1, 2)  # pairs (0, 1), (2, 3), ...; an odd n leaves the last index fixed
    if init == "henaff":
        s = -math.pi * torch.rand(len(i), generator=generator, dtype=torch.float64)  # U(-pi, 0)
        log_P[i, i + 1] = s
    elif init == "cayley":
        u = (math.pi / 2) * torch.rand(len(i), generator=generator, dtype=torch.float64)  # U(0, pi/2)
        log_P[i, i + 1] = -torch.sqrt((1 - torch.cos(u)) / (1 + torch.cos(u)))
    else:  # random rotation Q, A = logm(Q) from Q's eigendecomposition
        q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r))  # Haar distributed
        if torch.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        evals, evecs = torch.linalg.eig(q)
        A = (evecs @ torch.diag(1j * torch.angle(evals)) @ torch.linalg.inv(evecs)).real
        log_P = torch.triu(0.5 * (A - A.T), 1)
    return log_P


def _rotation_init(n, init, generator):
    """thetas ~ U(0, 2 pi), gammas = 1, log_P from `init` (float64, cast by the caller)."""
    thetas = 2 * math.pi * torch.rand(n // 2, generator=generator, dtype=torch.float64)
    return init_log_P(n, init, generator), thetas, torch.ones(n // 2, dtype=torch.float64)


class SchurRecurrence(nn.Module):
    """nnRNN: W = P (Lambda + T * M) P^T with P = matrix_exp(skew(log_P)).

    Parameters: log_P (N, N), thetas (N/2), gammas (N/2), T (N, N). With
    exact_spectrum=True the mask M also drops the entries of T inside the 2x2
    blocks, so the eigenvalues of W are exactly gamma_i e^{+-i theta_i}.
    """

    def __init__(self, hidden_size: int, init: str = "cayley", exact_spectrum: bool = False,
                 generator: torch.Generator | None = None, dtype=None, device=None):
        super().__init__()
        if hidden_size % 2:
            raise ValueError(f"recurrent='nnrnn' needs an even hidden_size (2x2 rotation blocks), got {hidden_size}")
        self.hidden_size, self.init, self.exact_spectrum = hidden_size, init, exact_spectrum
        kw = dict(dtype=dtype or torch.get_default_dtype(), device=device)
        self.log_P = nn.Parameter(torch.empty(hidden_size, hidden_size, **kw))
        self.thetas = nn.Parameter(torch.empty(hidden_size // 2, **kw))
        self.gammas = nn.Parameter(torch.empty(hidden_size // 2, **kw))
        self.T = nn.Parameter(torch.empty(hidden_size, hidden_size, **kw))
        self.register_buffer("mask", torch.empty(hidden_size, hidden_size, **kw), persistent=False)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The initial state of SPEC section 2 (and the mask, for modules made with to_empty())."""
        log_P, thetas, gammas = _rotation_init(self.hidden_size, self.init, generator)
        self.log_P.copy_(log_P)
        self.thetas.copy_(thetas)
        self.gammas.copy_(gammas)
        self.T.zero_()
        self.mask.copy_(schur_mask(self.hidden_size, self.exact_spectrum))

    def orthogonal(self) -> torch.Tensor:
        return orthogonal_from(self.log_P)

    def forward(self) -> torch.Tensor:
        P = self.orthogonal()
        return P @ (block_rotations(self.thetas, self.gammas) + self.T * self.mask) @ P.T

    def free_parameter_counts(self) -> dict:
        n = self.hidden_size
        triangle = n * (n - 1) // 2
        return {"log_P": triangle, "thetas": n // 2, "gammas": n // 2,
                "T": triangle - (n // 2 if self.exact_spectrum else 0)}


class OrthogonalRecurrence(nn.Module):
    """expRNN: W = P = matrix_exp(skew(log_P)), initialised like nnRNN's P Lambda P^T
    (the rotation angles folded into log_P)."""

    def __init__(self, hidden_size: int, init: str = "cayley", generator: torch.Generator | None = None,
                 dtype=None, device=None):
        super().__init__()
        self.hidden_size, self.init = hidden_size, init
        self.log_P = nn.Parameter(torch.empty(hidden_size, hidden_size, dtype=dtype or torch.get_default_dtype(),
                                              device=device))
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        self.log_P.copy_(init_log_P(self.hidden_size, self.init, generator))

    def forward(self) -> torch.Tensor:
        return orthogonal_from(self.log_P)

    def free_parameter_counts(self) -> dict:
        return {"log_P": self.hidden_size * (self.hidden_size - 1) // 2}


class DenseRecurrence(nn.Module):
    """A free recurrent matrix (vanilla RNN), initialised to the same orthogonal
    matrix as OrthogonalRecurrence."""

    def __init__(self, hidden_size: int, init: str = "cayley", generator: torch.Generator | None = None,
                 dtype=None, device=None):
        super().__init__()
        self.hidden_size, self.init = hidden_size, init
        self.weight = nn.Parameter(torch.empty(hidden_size, hidden_size, dtype=dtype or torch.get_default_dtype(),
                                               device=device))
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        self.weight.copy_(orthogonal_from(init_log_P(self.hidden_size, self.init, generator)))

    def forward(self) -> torch.Tensor:
        return self.weight

    def free_parameter_counts(self) -> dict:
        return {"weight": self.weight.numel()}
