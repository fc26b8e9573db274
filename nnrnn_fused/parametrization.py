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

INITS = ("cayley", "henaff", "random")


def skew(log_P: torch.Tensor) -> torch.Tensor:
    """A = triu(log_P, 1) - triu(log_P, 1)^T."""
    upper = torch.triu(log_P, 1)
    return upper - upper.transpose(-1, -2)


class _SkewExpEigh(torch.autograd.Function):
    """exp(A) for a real skew-symmetric A, and its gradient, from one eigendecomposition.

    iA is Hermitian, so A = V diag(i w) V^H with V unitary and w real, and
    exp(A) = V diag(e^{i w}) V^H. The gradient of a loss with dL/dP = G is the adjoint
    Frechet derivative, exp's derivative at A^T = -A applied to G:
        dL/dA = V [(V^H G V) * Phi] V^H,  Phi_jk = e^{-i (w_j + w_k) / 2} sinc((w_j - w_k) / 2)
    (sinc(x) = sin(x) / x; continuous where eigenvalues coincide). Equal to what autograd
    through torch.linalg.matrix_exp gives (to 1e-11 in float64), and in float32 about
    1e-6 relative off the float64 truth where matrix_exp's autograd is 3e-5 to 1e-3 off
    (scaling and squaring; tests/test_parametrization.py measures both).

    float16/bfloat16 are computed in float32 (complex64); float64 in complex128.
    """

    # forward and setup_context apart (the form torch.func transforms need): the
    # eigenvectors and eigenvalues go to the backward as extra, non-differentiable outputs
    generate_vmap_rule = True

    @staticmethod
    def forward(A):
        complex_dtype = torch.complex128 if A.dtype == torch.float64 else torch.complex64
        h, V = torch.linalg.eigh(1j * A.to(complex_dtype))  # iA = V diag(h) V^H, so w = -h
        w = -h
        # copy=True: the output must be a new tensor. torch 2.11's torch.compile gives an
        # autograd.Function whose output is a same-dtype .to() (which returns its input)
        # zero gradients (docs/torch_versions.md has the three-line reproduction).
        return ((V * torch.exp(1j * w)) @ V.mH).real.to(A.dtype, copy=True), V, w

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, V, w = output
        ctx.mark_non_differentiable(V, w)
        ctx.save_for_backward(V, w)

    @staticmethod
    def backward(ctx, G, _grad_V, _grad_w):
        V, w = ctx.saved_tensors
        half = torch.exp(-0.5j * w)  # e^{-i (w_j + w_k) / 2} as an outer product: N exps, not N^2
        phi = half[..., :, None] * half[..., None, :] * torch.sinc((w[..., :, None] - w[..., None, :]) / (2 * math.pi))
        return (V @ ((V.mH @ G.to(V.dtype) @ V) * phi) @ V.mH).real.to(G.dtype, copy=True)


def orthogonal_from(log_P: torch.Tensor) -> torch.Tensor:
    """P = matrix_exp(skew(log_P)): orthogonal with det +1.

    One route on every device: P and its gradient come from an eigendecomposition
    (_SkewExpEigh), accurate in float32 and 2-4x faster than torch.linalg.matrix_exp on
    the CPU for N = 128-512.
    """
    return _SkewExpEigh.apply(skew(log_P))[0]


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
