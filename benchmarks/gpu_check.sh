#!/usr/bin/env bash
# The one call on a lent GPU (docs/cuda.md, "The GPU check"): eleven phases in order of value, each under
# its own `timeout -k` inside a total deadline; every result a JSON line in $OUT/results.jsonl the
# moment it exists; an EXIT trap writes $OUT/summary.md from whatever exists, however the script
# ends, and prints it with the verdict table last. On a CPU machine every phase runs as a dry run
# or says why not (tests/test_gpu_check_script.py runs it so, in CI).
#
#   OUT=dir                      results (default ./gpu_check_out): results.jsonl, summary.md, log.txt
#                                (every phase's output), tests.xml, ncu.txt, benchmarks.json
#   PYTHON=python3               the interpreter
#   GPU_CHECK_TOTAL_S=480        deadline of the whole script; keep the device call's timeout_s above it
#   GPU_CHECK_<PHASE>_S          a phase's cap in s (ENV BUILD SMOKE TIMINGS EXCHANGE BARRIER BREAKDOWN TESTS NCU;
#                                SANITIZER per tool; SUITES: default what is left); 0 skips the phase
#   GPU_CHECK_COMMIT             the commit, where the tree travels without .git
#   NNRNN_PREBUILT_DIR           the extension prebuilt for the GPU machine (default .prebuilt/gpu)
#   NNRNN_SKIP_BUILD=1           use the extension in the tree as it is
#   MAX_JOBS, TORCH_CUDA_ARCH_LIST   when it must build (default 16 and 9.0)
#   NNRNN_CUDA_WATCHDOG_MS       the grid barrier's deadlock watchdog (default here 5000)
#   GPU_CHECK_PATHS              the CUDA paths compared (benchmarks/gpu_phases.py: cuda_paths)
#   GPU_CHECK_SUITES_ARGS        options of the benchmark suites (default: --grid gpucheck -k cuda)
#   GPU_CHECK_HANG="phase ..."   these phases hang after their first result (the dry-run test)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_check_out}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
export GPU_CHECK_RESULTS="$OUT/results.jsonl" GPU_CHECK_LOG="$OUT/log.txt"
export GPU_CHECK_DEADLINE=$(( $(date +%s) + ${GPU_CHECK_TOTAL_S:-480} ))
export NNRNN_CUDA_WATCHDOG_MS="${NNRNN_CUDA_WATCHDOG_MS:-5000}" PYTHONUNBUFFERED=1
: > "$GPU_CHECK_RESULTS"
: > "$GPU_CHECK_LOG"
rm -f "$OUT/summary.md" "$OUT/tests.xml" "$OUT/ncu.txt" "$OUT/benchmarks.json"

helper() { "$PYTHON" -m benchmarks.gpu_check "$@"; }

in_flight="" in_flight_step="" in_flight_cap=0 in_flight_t0=0
status=0

finish() {  # EXIT: end the step in flight, then the summary (the verdict table printed last)
  trap - EXIT INT TERM
  if [ -n "$in_flight" ]; then
    kill -TERM -- "-$in_flight" "$in_flight" 2>/dev/null
    helper end "$in_flight_step" 143 $(( SECONDS - in_flight_t0 )) "$in_flight_cap"
  fi
  helper report "$OUT"
  local rc=$?
  [ "$status" -ne 0 ] && exit "$status"
  exit "$rc"
}
trap finish EXIT
trap 'status=143; exit 143' INT TERM

step() {  # step NAME CMD...: CMD under `timeout -k` with the step's cap, its output appended to log.txt
  local name=$1 cap
  shift
  cap=$(helper start "$name") || cap=0
  [ "${cap:-0}" -gt 0 ] 2>/dev/null || return 0
  echo "== $name: running (cap $cap s)" >&2
  echo "=============== $name (cap $cap s) ===============" >> "$GPU_CHECK_LOG"
  in_flight_step=$name in_flight_cap=$cap in_flight_t0=$SECONDS
  # timeout leads its own process group: at the cap everything the step started is killed.
  GPU_CHECK_PHASE_DEADLINE=$(( $(date +%s) + cap )) timeout -k 10 "$cap" "$@" >> "$GPU_CHECK_LOG" 2>&1 &
  in_flight=$!
  wait "$in_flight"
  local rc=$?
  in_flight=""
  helper end "$name" "$rc" $(( SECONDS - in_flight_t0 )) "$cap"
}

phases=("$PYTHON" -m benchmarks.gpu_phases)
step env "${phases[@]}" env
step build "${phases[@]}" build
step smoke "${phases[@]}" smoke
if helper fallback-needed; then
  export NNRNN_CUDA_FORCE_FALLBACK=1
  echo "== the remaining phases run with NNRNN_CUDA_FORCE_FALLBACK=1" >&2
fi
step timings "${phases[@]}" timings
step exchange "${phases[@]}" exchange
step barrier "${phases[@]}" barrier
step breakdown "${phases[@]}" breakdown
step tests "$PYTHON" -m pytest tests/test_cuda.py -v -p no:cacheprovider -k "not compute_sanitizer" \
  --junitxml="$OUT/tests.xml"
sanitizer=$(helper which compute-sanitizer)
for tool in memcheck racecheck synccheck; do
  # only our kernels are instrumented (kns=nnrnn); no caching allocator, so memcheck sees the true bounds
  step "sanitizer:$tool" env NNRNN_CUDA_WATCHDOG_MS=20000 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "${sanitizer:-compute-sanitizer}" --tool "$tool" --kernel-name kns=nnrnn --error-exitcode 99 --print-limit 20 \
    "${phases[@]}" sanitizer-case
done
# the persistent kernels' names: KERNEL_NAMES in benchmarks/gpu_phases.py
step ncu "$(helper which ncu)" --clock-control none --target-processes all \
  --kernel-name "regex:persistent_kernel|team_kernel|tc_kernel" \
  --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SourceCounters \
  --log-file "$OUT/ncu.txt" "${phases[@]}" ncu-case
# shellcheck disable=SC2086  # GPU_CHECK_SUITES_ARGS is a list of options
step suites "$PYTHON" -m pytest benchmarks/test_speed.py benchmarks/test_memory.py --benchmark-only -q \
  -p no:cacheprovider ${GPU_CHECK_SUITES_ARGS:---grid gpucheck -k cuda} --benchmark-json="$OUT/benchmarks.json"
