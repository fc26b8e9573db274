"""Build of nnrnn_fused and its C++/CUDA extension ``nnrnn_fused._C``.

Environment switches (see README, "Build options"):
  NNRNN_CUDA=auto|1|0   compile the CUDA kernels: auto (default) when nvcc (CUDA_HOME) and a
                        CUDA build of torch are present, whether or not a GPU is; 1 requires
                        them; 0 builds the CPU part only.
  TORCH_CUDA_ARCH_LIST  GPU architectures; when unset and no GPU is visible: "8.0;9.0".
  MAX_JOBS              parallel compile jobs (read by torch's build extension).
"""
import ctypes
import glob
import os
import re
import runpy
import shutil
import sys
import sysconfig

import torch
from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
SUPPORTED = runpy.run_path(os.path.join(HERE, "nnrnn_fused", "_supported.py"))
VERSION = runpy.run_path(os.path.join(HERE, "nnrnn_fused", "_version.py"))["__version__"]


def check_torch_version() -> None:
    """Refuse to build against a torch outside the tested range (README, "Supported versions")."""
    if os.environ.get("NNRNN_ALLOW_UNTESTED_TORCH") == "1":
        return
    release = tuple(int(v) for v in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    low, below = (tuple(int(v) for v in SUPPORTED[k].split(".")) for k in ("TORCH_MIN", "TORCH_BELOW"))
    if not low <= release < below:
        sys.exit(f"nnrnn_fused is tested with {SUPPORTED['TORCH_REQUIREMENT']}, but the build sees torch "
                 f"{torch.__version__}. Install a torch in that range, or set NNRNN_ALLOW_UNTESTED_TORCH=1 "
                 "to build anyway (then run the test suite).")


check_torch_version()


def is_cuda_toolkit(path) -> bool:
    return bool(path) and os.path.exists(os.path.join(path, "include", "cuda_runtime.h")) and os.path.exists(
        os.path.join(path, "bin", "nvcc"))


def locate_cuda_home() -> None:
    """torch guesses CUDA_HOME from the nvcc on PATH; when that nvcc is a wrapper script
    the guess is wrong (/usr/local). Pick a real toolkit before torch's build tools load."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for path in candidates + ["/usr/local/cuda"]:
        if is_cuda_toolkit(path):
            os.environ["CUDA_HOME"] = path
            return


locate_cuda_home()
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def cuda_requested() -> bool:
    setting = os.environ.get("NNRNN_CUDA", "auto").strip().lower()
    available = is_cuda_toolkit(CUDA_HOME) and torch.version.cuda is not None
    if setting in ("0", "off", "false", "no"):
        return False
    if setting in ("1", "on", "true", "yes"):
        if not available:
            sys.exit(
                f"NNRNN_CUDA={setting} but the CUDA part cannot be built: CUDA_HOME={CUDA_HOME}, "
                f"torch {torch.__version__} (torch.version.cuda={torch.version.cuda}). "
                "Set CUDA_HOME to the toolkit and install a CUDA build of torch."
            )
        return True
    if setting != "auto":
        sys.exit(f"NNRNN_CUDA must be auto, 1 or 0, got {setting!r}")
    return available


def torch_exports_fortran_blas() -> bool:
    """Whether torch's CPU library exports sgemm_/dgemm_ (MKL or OpenBLAS inside)."""
    for lib in glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.*")):
        try:
            handle = ctypes.CDLL(lib)
            return hasattr(handle, "sgemm_") and hasattr(handle, "dgemm_")
        except OSError:
            continue
    return False


def write_build_info(with_cuda: bool, direct_blas: bool) -> None:
    # Read at import time: an extension built against another torch is not loaded.
    with open(os.path.join(HERE, "nnrnn_fused", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"VERSION = {VERSION!r}\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"DIRECT_BLAS = {direct_blas!r}\n")
        f.write(f"EXT_SUFFIX = {sysconfig.get_config_var('EXT_SUFFIX')!r}\n")  # the Python the module is for
        f.write(f"CUDA_ARCH_LIST = {os.environ.get('TORCH_CUDA_ARCH_LIST') if with_cuda else None!r}\n")


def extension():
    with_cuda = cuda_requested()
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    direct_blas = torch_exports_fortran_blas()
    write_build_info(with_cuda, direct_blas)

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # No -std flag: the code is C++17, the standard torch 2.11's builder passes; newer torch
    # may pass a later standard. Never use C++20-only features (std::barrier, concepts).
    cxx = ["-O3", "-fno-math-errno", "-fno-trapping-math"]  # lets the pointwise loops vectorize
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")  # at::parallel_for over the rows of a step
        link.append("-fopenmp")
    macros = [("NNRNN_DIRECT_BLAS", None)] if direct_blas else []
    if not with_cuda:
        return CppExtension("nnrnn_fused._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=link, define_macros=macros)

    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    macros.append(("NNRNN_WITH_CUDA", None))
    return CUDAExtension("nnrnn_fused._C", sources,
                         extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
                         extra_link_args=link, define_macros=macros)


setup(
    packages=find_packages(include=["nnrnn_fused", "nnrnn_fused.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
