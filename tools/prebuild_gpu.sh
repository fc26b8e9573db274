#!/usr/bin/env bash
# Builds, here on a CPU machine, the extension for the GPU machine's toolchain (Python 3.12,
# torch 2.11.0+cu130, sm_90: ../shared/GPU.md) into .prebuilt/gpu/ (git-ignored), which the
# device tool carries (carry=[".prebuilt"]). benchmarks/gpu_check.sh copies it into the package
# when the torch and Python it records match the machine's, and builds there only otherwise.
#
#   PY312=python3.12            the interpreter (default: python3.12 on PATH, else pyenv's 3.12)
#   GPU_TORCH=torch==2.11.0     the GPU machine's torch
#   PREBUILT_VENV=.ci/venv-py312, PREBUILT_TREE=.ci/tree-py312   where the build happens
#   TORCH_CUDA_ARCH_LIST=9.0    the GPU machine's architecture (H100/H200)
# The tree copy keeps the built module, so `$PREBUILT_VENV/bin/python -m pytest` can be run
# there to test exactly what is carried (.ci/run does).
set -euo pipefail
cd "$(dirname "$0")/.."
is_python312() { [ -n "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }
py312=""
# PY312, then python3.12 on PATH (a pyenv shim there may not run), then pyenv's and the system's.
for candidate in "${PY312:-}" "$(command -v python3.12 || true)" "$HOME"/.pyenv/versions/3.12.*/bin/python3.12 \
                 /usr/bin/python3.12 /usr/local/bin/python3.12; do
  if is_python312 "$candidate"; then py312=$candidate; break; fi
done
[ -n "$py312" ] || { echo "prebuild_gpu: no working Python 3.12 found; set PY312" >&2; exit 1; }
venv=${PREBUILT_VENV:-.ci/venv-py312}
tree=${PREBUILT_TREE:-.ci/tree-py312}
out=.prebuilt/gpu

TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} NNRNN_CUDA=1 \
  bash tools/build_leg.sh "$py312" "${GPU_TORCH:-torch==2.11.0}" "$venv" "$tree"

rm -rf "$out"
mkdir -p "$out"
cp "$tree"/nnrnn_fused/_C*.so "$tree/nnrnn_fused/_build_info.py" "$out/"
echo "+ $out:"
ls -l "$out"
cat "$out/_build_info.py"
