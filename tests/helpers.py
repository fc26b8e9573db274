"""Helpers shared by the tests."""
import torch

from nnrnn_fused.parametrization import (DenseRecurrence, OrthogonalRecurrence, SchurRecurrence, init_log_P,
                                         orthogonal_from)


def tolerances(dtype):
    """(rtol, atol) for fused-vs-reference comparisons, scaled to the precision."""
    return {torch.float64: (1e-9, 1e-10), torch.float32: (2e-4, 2e-5)}[dtype]


def stable_W(n, dtype, scale=0.95, generator=None):
    """A scaled random orthogonal matrix: long sequences neither explode nor vanish."""
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return (scale * q).to(dtype)


def random_inputs(T, B, N, dtype, with_h0=True, with_lengths=False, seed=0):
    """(x, W, b, h0, lengths) for the op: drawn in float64 from a seeded generator (the same
    values whatever the dtype), W stable; lengths in [0, T] with one full-length sequence."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, N, generator=gen, dtype=torch.float64).to(dtype)
    W = stable_W(N, dtype, generator=gen)
    b = (0.1 * torch.randn(N, generator=gen, dtype=torch.float64)).to(dtype)
    h0 = torch.randn(B, N, generator=gen, dtype=torch.float64).to(dtype) if with_h0 else None
    lengths = None
    if with_lengths:
        lengths = torch.randint(0, T + 1, (B,), generator=gen)
        lengths[:1] = T
    return x, W, b, h0, lengths


def relative_gradient_error(n, dtype, device="cpu", seed=0):
    """|g - g64| / |g64| for the gradient of sum(P * G) w.r.t. log_P computed in `dtype`,
    against the float64 gradient, near an nnRNN initialisation (Cayley plus a perturbation)."""
    gen = torch.Generator().manual_seed(seed)
    L64 = init_log_P(n, "cayley", gen) + torch.randn(n, n, generator=gen, dtype=torch.float64) / n ** 0.5
    G64 = torch.randn(n, n, generator=gen, dtype=torch.float64)

    def grad(dtype):
        L = L64.to(dtype=dtype, device=device).requires_grad_()
        g, = torch.autograd.grad((orthogonal_from(L) * G64.to(dtype=dtype, device=device)).sum(), L)
        return g.double().cpu()

    truth = grad(torch.float64)
    return ((grad(dtype) - truth).norm() / truth.norm()).item()



def count_W_builds(monkeypatch):
    """A list that grows by one at every build of a recurrent matrix W (a call of any
    recurrence module's forward), for the rest of the test."""
    builds = []
    for cls in (SchurRecurrence, OrthogonalRecurrence, DenseRecurrence):
        original = cls.forward

        def counted(self, _original=original):
            builds.append(type(self).__name__)
            return _original(self)

        monkeypatch.setattr(cls, "forward", counted)
    return builds
