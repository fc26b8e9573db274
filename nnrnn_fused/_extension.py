"""Loading of the compiled extension ``nnrnn_fused._C``.

The package imports without it; ``status()`` says which path runs and why. An
extension built against another torch is not loaded (that would end in an
undefined-symbol error): the message says how to rebuild.
"""
from __future__ import annotations

import os
import re

import torch

from ._supported import TORCH_BELOW, TORCH_MIN, TORCH_REQUIREMENT

REBUILD_HINT = (
    "rebuild it against the installed torch: "
    "pip install --no-build-isolation --force-reinstall --no-deps . (from the source tree)"
)


def minor_release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string: "2.15.0a0+git" -> (2, 15)."""
    major, minor = re.match(r"(\d+)\.(\d+)", str(version)).groups()
    return int(major), int(minor)


def unsupported_torch_reason(version: str | None = None) -> str | None:
    """Why `version` (default: the installed torch) is outside the tested range (None inside it).
    NNRNN_ALLOW_UNTESTED_TORCH=1 loads the extension anyway, to try a torch before it is added."""
    version = torch.__version__ if version is None else version
    if minor_release(TORCH_MIN) <= minor_release(version) < minor_release(TORCH_BELOW):
        return None
    if os.environ.get("NNRNN_ALLOW_UNTESTED_TORCH") == "1":
        return None
    return (f"torch {version} is outside the range this package is tested with ({TORCH_REQUIREMENT}); "
            f"install a torch in that range (pip install '{TORCH_REQUIREMENT}'), or set "
            "NNRNN_ALLOW_UNTESTED_TORCH=1 to load the extension anyway and run the test suite first")


def _load() -> tuple[bool, str | None, dict]:
    unsupported = unsupported_torch_reason()
    if unsupported:
        return False, unsupported, {}
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
