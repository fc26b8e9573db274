#!/usr/bin/env bash
# Builds the extension for one toolchain (a Python and a torch) in a copy of the source tree,
# so that several toolchains can be built and tested side by side without touching the
# checkout's own build. Used by .ci/run (the torch matrix) and tools/prebuild_gpu.sh.
#
#   tools/build_leg.sh PYTHON TORCH_SPEC VENV TREE
#     PYTHON      the interpreter to make the venv from (e.g. python3.12)
#     TORCH_SPEC  what pip installs for torch (e.g. torch==2.11.0)
#     VENV        the virtual environment (created when missing; reused otherwise)
#     TREE        where the copy of the source tree goes (replaced)
#   TORCH_CUDA_ARCH_LIST, NNRNN_CUDA, MAX_JOBS, CUDA_HOME are passed to setup.py as they are.
#
# The venv gets the torch asked for, the build tools, and the package's dependencies with
# its `test` extra (read from pyproject.toml), so `VENV/bin/python -m pytest` runs in TREE.
set -euo pipefail
[ $# -eq 4 ] || { echo "usage: $0 PYTHON TORCH_SPEC VENV TREE" >&2; exit 2; }
python=$1 torch_spec=$2 venv=$3 tree=$4
root=$(cd "$(dirname "$0")/.." && pwd)

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda  # torch guesses wrong from the nvcc wrapper on PATH
fi

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
# The package's own requirements with the torch asked for in their place.
mapfile -t requirements < <("$venv/bin/python" - "$root/pyproject.toml" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    if not req.startswith("torch"):
        print(req)
PY
)
"$venv/bin/python" -m pip install --quiet "$torch_spec" ninja "setuptools>=77" wheel "${requirements[@]}"

# A copy of the tree: the tracked files and the untracked ones git does not ignore.
rm -rf "$tree"
mkdir -p "$tree"
(cd "$root" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$tree" 2>/dev/null || true)
[ -f "$tree/setup.py" ] || { echo "copying the source tree to $tree failed" >&2; exit 1; }

cd "$tree"
echo "+ building in $tree with $("$venv/bin/python" -c 'import sys, torch; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}")')"
"$venv/bin/python" setup.py --quiet build_ext --inplace
"$venv/bin/python" -c "import nnrnn_fused; s = nnrnn_fused.status(); assert s['extension_loaded'], s['load_error']; print('+ built:', s)"
