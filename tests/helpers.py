"""Helpers shared by the tests."""
import torch


def tolerances(dtype):
    """(rtol, atol) for fused-vs-reference comparisons, scaled to the precision."""
    return {torch.float64: (1e-9, 1e-10), torch.float32: (2e-4, 2e-5)}[dtype]


def stable_W(n, dtype, scale=0.95, generator=None):
    """A scaled random orthogonal matrix: long sequences neither explode nor vanish."""
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return (scale * q).to(dtype)
