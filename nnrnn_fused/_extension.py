"""Loading of the compiled extension ``nnrnn_fused._C``.

The package imports without it; ``status()`` says which path runs and why. An
extension built against another torch is not loaded (that would end in an
undefined-symbol error): the message says how to rebuild.
"""
from __future__ import annotations

import torch

REBUILD_HINT = (
    "rebuild it against the installed torch: "
    "pip install --no-build-isolation --force-reinstall --no-deps . (from the source tree)"
)


def _load() -> tuple[bool, str | None, dict]:
    try:
        from . import _build_info as info
    except ImportError:
        return False, "the C++/CUDA extension is not built (no nnrnn_fused/_build_info.py); " + REBUILD_HINT, {}
    built = {k: getattr(info, k) for k in ("TORCH_VERSION", "TORCH_CUDA_VERSION", "WITH_CUDA", "DIRECT_BLAS")}
    if info.TORCH_VERSION != torch.__version__:
        return False, (
            f"the extension was built against torch {info.TORCH_VERSION} but torch {torch.__version__} "
            "is installed; " + REBUILD_HINT
        ), built
    try:
        from . import _C  # noqa: F401  (registers the op's kernels)
    except ImportError as e:
        return False, f"the extension failed to load ({e}); " + REBUILD_HINT, built
    return True, None, built


LOADED, LOAD_ERROR, BUILD_INFO = _load()
WITH_CUDA = bool(LOADED and BUILD_INFO.get("WITH_CUDA"))


def require(device=None) -> None:
    """Raise a RuntimeError that explains why the fused op is unavailable (on `device`)."""
    if not LOADED:
        raise RuntimeError(
            f"nnrnn_fused: the fused op is unavailable: {LOAD_ERROR}. "
            "The pure-PyTorch path can be asked for by name: backend='reference'."
        )
    if device is not None and torch.device(device).type == "cuda" and not WITH_CUDA:
        raise RuntimeError(
            "nnrnn_fused: CUDA tensors need the CUDA kernels, and this build has none (it was built without "
            "nvcc/CUDA_HOME or with NNRNN_CUDA=0). Rebuild with CUDA_HOME set: NNRNN_CUDA=1 pip install "
            "--no-build-isolation --force-reinstall --no-deps . ; or ask for backend='reference'."
        )


def status() -> dict:
    """What is built and which path a call takes."""
    return {
        "extension_loaded": LOADED,
        "load_error": LOAD_ERROR,
        "cuda_kernels_compiled": WITH_CUDA,
        "cpu_direct_blas": bool(BUILD_INFO.get("DIRECT_BLAS")),
        "built_against_torch": BUILD_INFO.get("TORCH_VERSION"),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
