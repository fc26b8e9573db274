"""A quick check of an installed nnrnn_fused (not the source tree): the extension loads, the
fused op matches the reference loop forward and backward, and the layer runs.
Run from outside the source tree (.ci/run does, after installing from the sdist)."""
import sys

import torch

import nnrnn_fused

assert "site-packages" in nnrnn_fused.__file__, f"imported from the source tree: {nnrnn_fused.__file__}"
status = nnrnn_fused.status()
assert status["extension_loaded"], status["load_error"]

torch.manual_seed(0)
T, B, N = 7, 3, 6
x = torch.randn(T, B, N, dtype=torch.float64, requires_grad=True)
W = (0.5 * torch.randn(N, N, dtype=torch.float64)).requires_grad_()
b = (0.1 * torch.randn(N, dtype=torch.float64)).requires_grad_()
got = nnrnn_fused.fused_nnrnn(x, W, b)
want = nnrnn_fused.reference.nnrnn_recurrence(x, W, b)
for g, w in zip(got, want):
    torch.testing.assert_close(g, w)
grads = torch.autograd.grad(got[0].sum() + got[1].sum(), (x, W, b))
ref_grads = torch.autograd.grad(want[0].sum() + want[1].sum(), (x, W, b))
for g, w in zip(grads, ref_grads):
    torch.testing.assert_close(g, w)
out, h_n = nnrnn_fused.NNRNN(4, 8)(torch.randn(5, 2, 4))
assert out.shape == (5, 2, 8) and h_n.shape == (1, 2, 8)
print(f"installed nnrnn_fused {nnrnn_fused.__version__} on torch {torch.__version__}: fused op equals the "
      f"reference; Python {sys.version.split()[0]}")
