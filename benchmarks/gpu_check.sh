#!/usr/bin/env bash
# One call on a lent GPU (under 8 minutes on an H100): build, GPU tests, timings,
# GPU benchmarks; results as JSON and a markdown table under $OUT (default
# ./gpu_check_out), the table printed last. On a CPU machine it runs to the end
# with the GPU parts skipped and says so (tests/test_gpu_check_script.py runs it
# that way, so the script cannot rot).
#
#   OUT=dir                 where results go
#   NNRNN_SKIP_BUILD=1      use the extension already built in the source tree
#   PYTHON=python3          the interpreter
#   MAX_JOBS, TORCH_CUDA_ARCH_LIST   build settings (default 16 and 9.0)
#   GPU_CHECK_TOTAL_S       deadline for the whole script (default 450 s): a phase gets at most what is left
#   GPU_CHECK_BUILD_S, GPU_CHECK_TESTS_S, GPU_CHECK_TIMINGS_S, GPU_CHECK_BENCH_S   time caps per phase
#   GPU_CHECK_BENCH_ARGS    options of the benchmark suites (default: --grid gpu, the GPU-verification grid)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_check_out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
steps="$OUT/steps.json"
echo "{}" > "$steps"
deadline=$(( $(date +%s) + ${GPU_CHECK_TOTAL_S:-450} ))

cap() {  # cap SECONDS: the phase's cap, or what is left before the deadline (keeping 20 s for the report)
  local left=$(( deadline - $(date +%s) - 20 ))
  [ "$left" -lt 5 ] && left=5
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}

note() {  # note STEP RESULT: record one line of the summary
  echo "== $1: $2"
  "$PYTHON" - "$steps" "$1" "$2" <<'EOF'
import json, sys
path, key, value = sys.argv[1:]
d = json.load(open(path)); d[key] = value; json.dump(d, open(path, "w"), indent=1)
EOF
}

has_gpu=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$has_gpu" = 1 ]; then
  note "device" "$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name())")"
else
  note "device" "no GPU visible: GPU tests, timings and benchmarks are skipped"
fi

# 1. build
if [ "${NNRNN_SKIP_BUILD:-0}" = 1 ]; then
  note "build" "skipped (NNRNN_SKIP_BUILD=1)"
else
  start=$(date +%s)
  if MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
     timeout "$(cap "${GPU_CHECK_BUILD_S:-240}")" "$PYTHON" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    note "build" "ok in $(( $(date +%s) - start )) s"
  else
    note "build" "FAILED after $(( $(date +%s) - start )) s (see build.log)"
    tail -30 "$OUT/build.log"
  fi
fi
note "extension" "$("$PYTHON" -c "import nnrnn_fused as n; s = n.status(); print('loaded, CUDA kernels' if s['cuda_kernels_compiled'] else ('loaded, CPU only' if s['extension_loaded'] else 'NOT loaded: ' + str(s['load_error'])))" 2>&1 | tail -1)"

# 2. GPU tests (on a CPU machine they are collected and skipped, which checks they import)
start=$(date +%s)
tests_cap=$(cap "${GPU_CHECK_TESTS_S:-270}")
PYTHONUNBUFFERED=1 timeout "$tests_cap" "$PYTHON" -m pytest tests/test_cuda.py -v -p no:cacheprovider \
  --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
rc=$?
tail -15 "$OUT/tests.log"
case $rc in
  0) note "GPU tests" "passed in $(( $(date +%s) - start )) s$([ "$has_gpu" = 1 ] || echo ' (all skipped: no GPU)')" ;;
  124) note "GPU tests" "TIMED OUT after $tests_cap s (a hang? see tests.log)" ;;
  *) note "GPU tests" "FAILED (pytest exit $rc; see tests.log)" ;;
esac

# 3. timings of the fused op and cuDNN
if [ "$has_gpu" = 1 ]; then
  if timeout "$(cap "${GPU_CHECK_TIMINGS_S:-90}")" "$PYTHON" -m benchmarks.gpu_check timings "$OUT/timings.json" > "$OUT/timings.log" 2>&1; then
    note "timings" "ok"
  else
    note "timings" "FAILED or timed out (see timings.log)"
    tail -5 "$OUT/timings.log"
  fi
else
  note "timings" "skipped (no GPU)"
fi

# 4. the GPU benchmark suites (test ids containing "cuda")
if [ "$has_gpu" != 1 ]; then
  note "benchmarks" "skipped (no GPU)"
else
  # shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS is a list of options
  bench_cap=$(cap "${GPU_CHECK_BENCH_S:-150}")
  timeout "$bench_cap" "$PYTHON" -m pytest benchmarks/ --benchmark-only -k cuda -q -p no:cacheprovider \
    ${GPU_CHECK_BENCH_ARGS:---grid gpu} --benchmark-json="$OUT/benchmarks.json" > "$OUT/benchmarks.log" 2>&1
  rc=$?
  case $rc in
    0) note "benchmarks" "ok" ;;
    5) note "benchmarks" "none: no CUDA benchmarks in benchmarks/ yet" ;;
    4) note "benchmarks" "not run: pytest usage error (pytest-benchmark missing?); see benchmarks.log" ;;
    124) note "benchmarks" "TIMED OUT after $bench_cap s (partial results lost)" ;;
    *) note "benchmarks" "FAILED (pytest exit $rc; see benchmarks.log)"; tail -5 "$OUT/benchmarks.log" ;;
  esac
fi

# 5. results.json and summary.md; the table last
"$PYTHON" -m benchmarks.gpu_check report "$OUT"
