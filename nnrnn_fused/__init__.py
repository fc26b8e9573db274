"""nnrnn_fused: the Non-normal RNN (Kerg et al., NeurIPS 2019) over a fused
C++/CUDA recurrence.

    fused_nnrnn(x, W, b=None, h0=None, *, nonlinearity="modrelu", lengths=None)
    NNRNN(input_size, hidden_size, ...)      the layer
    reuse_recurrent_matrices(module)         build each layer's W once, for inference
    reference.nnrnn_recurrence(...)          the same recurrence as a PyTorch loop
    status()                                 what is built and which path runs
    cuda_path(N, B, dtype, device)           which CUDA path (persistent or fallback) a shape takes
    cpu_path(N, B, dtype)                    which CPU path (packed or BLAS) a shape takes
    cpu_cache_info(), empty_cpu_cache()      the CPU outputs' cache of freed big blocks
"""
from . import recipe, reference
from ._version import __version__
from ._extension import status
from .layer import NNRNN, count_free_parameters, reuse_recurrent_matrices
from .ops import cpu_cache_info, cpu_path, cuda_path, empty_cpu_cache, fused_nnrnn
from .parametrization import DenseRecurrence, OrthogonalRecurrence, SchurRecurrence
from .recipe import delta_penalty, make_optimizers, parameter_groups

__all__ = [
    "NNRNN", "reuse_recurrent_matrices", "fused_nnrnn", "cuda_path", "cpu_path", "cpu_cache_info", "empty_cpu_cache",
    "reference", "recipe", "status",
    "count_free_parameters",
    "SchurRecurrence", "OrthogonalRecurrence", "DenseRecurrence",
    "parameter_groups", "make_optimizers", "delta_penalty",
]
