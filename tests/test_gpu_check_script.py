"""benchmarks/gpu_check.sh, the one script a lent GPU runs, on a CPU machine: every phase runs as a dry
run or says why not, a forced hang is killed and recorded while the other phases' results and the
summary survive, the deadline and a signal end it cleanly, and nothing is PASSED that a GPU did not
show. Also the parsers of its tool outputs."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.gpu_check import FAILED, NOT_RUN, NOT_VERIFIED, PASSED
from nnrnn_fused import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join("benchmarks", "gpu_check.sh")
needs_cpu_machine = pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs for real")
needs_extension = pytest.mark.skipif(not _extension.WITH_CUDA, reason="needs the extension built with its CUDA kernels")


# Phases that do not hang in a dry run get room for a loaded CI machine (their H100 caps are for a GPU's speed);
# a test that needs a cap or the deadline sets it itself.
DRY_RUN_CAPS = dict(GPU_CHECK_TOTAL_S="850", GPU_CHECK_ENV_S="120", GPU_CHECK_BUILD_S="300",
                    GPU_CHECK_EXCHANGE_S="120", GPU_CHECK_BARRIER_S="120", GPU_CHECK_BREAKDOWN_S="120",
                    GPU_CHECK_TESTS_S="300")


def run_script(cwd, out, timeout=900, **env):
    full = dict(os.environ, OUT=str(out), PYTHON=sys.executable, **{**DRY_RUN_CAPS, **env})
    full.pop("NNRNN_CUDA_FORCE_FALLBACK", None)
    if str(cwd) != ROOT:  # a copy: keep an editable install of this checkout from filling in its modules
        isolate = out.parent / "isolate"
        isolate.mkdir(exist_ok=True)
        (isolate / "sitecustomize.py").write_text(
            "import sys\nsys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in getattr(f, '__name__', '')]\n")
        full["PYTHONPATH"] = str(isolate)
    return subprocess.run(["bash", SCRIPT], cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


def results(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def verdicts(out):
    ends = {}
    for line in results(out):
        if line["kind"] == "end":
            ends[line["phase"]] = line
    return ends


def copy_with_prebuilt(tmp_path):
    """The tree, with the local extension moved into .prebuilt/gpu as tools/prebuild_gpu.sh leaves it:
    only the script's prebuilt branch can make the copy load it."""
    repo = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", ".git", "gpu_check_out", "results", "runs")
    for name in ("benchmarks", "csrc", "nnrnn_fused", "tests"):
        shutil.copytree(os.path.join(ROOT, name), repo / name, ignore=ignore)
    shutil.copy2(os.path.join(ROOT, "setup.py"), repo / "setup.py")
    prebuilt = repo / ".prebuilt" / "gpu"
    prebuilt.mkdir(parents=True)
    ext = sysconfig.get_config_var("EXT_SUFFIX")
    shutil.move(repo / "nnrnn_fused" / f"_C{ext}", prebuilt / f"_C{ext}")
    info = (repo / "nnrnn_fused" / "_build_info.py").read_text()
    (repo / "nnrnn_fused" / "_build_info.py").unlink()
    (prebuilt / "_build_info.py").write_text(info if "EXT_SUFFIX" in info else info + f"EXT_SUFFIX = {ext!r}\n")
    for stale in (repo / "nnrnn_fused").glob("_C*.so"):
        stale.unlink()
    return repo


@needs_cpu_machine
@needs_extension
def test_dry_run_survives_forced_hangs(tmp_path):
    repo, out = copy_with_prebuilt(tmp_path), tmp_path / "out"
    proc = run_script(repo, out, GPU_CHECK_HANG="smoke timings", GPU_CHECK_SMOKE_S="15", GPU_CHECK_TIMINGS_S="10",
                      GPU_CHECK_NCU_S="0", GPU_CHECK_SUITES_ARGS="--grid quick -k N64-B10-T50-fused")
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 1, log  # a phase FAILED (the hangs)
    summary = (out / "summary.md").read_text()
    assert proc.stdout == summary, log  # stdout is the summary, the phase table last
    table = summary.rstrip().splitlines()[-11:]
    assert [row.split(" | ")[0] for row in table] == [f"| {i}" for i in range(1, 12)], table

    lines, ends = results(out), verdicts(out)
    by = {(line["phase"], line["kind"]): line for line in lines}
    assert by[("env", "device")]["gpu"] is False
    assert by[("build", "prebuilt")]["usable"] is True
    assert by[("build", "extension")]["how"].startswith("prebuilt") and by[("build", "extension")]["extension_loaded"]
    assert ends["env"]["verdict"] == NOT_VERIFIED and "dry run" in ends["env"]["detail"]
    assert ends["build"]["verdict"] == NOT_VERIFIED and "CUDA kernels loaded" in ends["build"]["detail"]

    # smoke: its path hung, was killed and recorded; the fallback is forced from then on
    assert ends["smoke"]["verdict"] == FAILED and "path cpu: hung: killed after" in ends["smoke"]["detail"]
    assert "NNRNN_CUDA_FORCE_FALLBACK=1 for the remaining phases" in by[("smoke", "note")]["text"]
    # timings: the whole phase hung and was killed at its cap; what it wrote before survives
    assert ends["timings"]["verdict"] == FAILED and "killed at its cap of 10 s" in ends["timings"]["detail"]
    assert ("timings", "settings") in by
    # the later phases ran (dry) and kept their results
    assert ends["barrier"]["verdict"] == NOT_VERIFIED and len([r for r in lines if r["kind"] == "row"
                                                               and r["phase"] == "barrier"]) == 3
    # the exchange microbenchmark times persistent kernels only: none after a hang (its dry run: below)
    assert ends["exchange"]["verdict"] == NOT_RUN and "the fallback is forced" in ends["exchange"]["detail"]
    assert ends["breakdown"]["verdict"] == NOT_VERIFIED and by[("breakdown", "case")]["categories"]
    assert ends["tests"]["verdict"] == NOT_VERIFIED and "nothing ran" in ends["tests"]["detail"]
    assert by[("tests", "counts")]["skipped"] > 0 and by[("tests", "counts")]["source"] == "junit xml"
    for tool in gpu_check.SANITIZER_TOOLS:
        assert ends[f"sanitizer:{tool}"]["verdict"] == NOT_RUN and "no GPU" in ends[f"sanitizer:{tool}"]["detail"]
    assert ends["ncu"]["verdict"] == NOT_RUN and ends["ncu"]["detail"] == "skipped (GPU_CHECK_NCU_S=0)"
    assert ends["suites"]["verdict"] == NOT_VERIFIED
    suites = sorted(r["id"] for r in lines if r["phase"] == "suites" and r["kind"] == "case")
    assert suites == sorted([f"test_speed[cpu-float32-{mode}-N64-B10-T50-{impl}]" for mode in ("fwd", "fwdbwd")
                             for impl in ("fused", "fused_blas")] + ["test_memory[cpu-float32-fwdbwd-N64-B10-T50-fused]"])

    # the summary says what was not verified, and nothing is PASSED without a GPU
    assert "### Not verified by this run" in summary and "- sanitizer: NOT RUN: memcheck: NOT RUN: no GPU" in summary
    assert "**PASSED**" not in summary
    assert "| 3 | Smoke: fwd+bwd vs float64 | **FAILED** |" in summary
    assert len(os.listdir(out)) <= 8  # the device tool brings back at most 8 files


@needs_cpu_machine
@needs_extension
def test_missing_extension_is_never_passed(tmp_path):
    repo, out = copy_with_prebuilt(tmp_path), tmp_path / "out"
    shutil.rmtree(repo / ".prebuilt")  # the copy has no extension now
    proc = run_script(repo, out, NNRNN_SKIP_BUILD="1", GPU_CHECK_SUITES_ARGS="--grid quick -k N64-B10-T50-fused")
    assert proc.returncode == 1, proc.stderr[-3000:]
    ends = verdicts(out)
    assert ends["build"]["verdict"] == FAILED and "does not load" in ends["build"]["detail"]
    for phase in ("smoke", "timings", "exchange", "barrier", "breakdown", "suites"):
        assert ends[phase]["verdict"] == NOT_RUN and "extension did not load" in ends[phase]["detail"], ends[phase]
    assert ends["tests"]["verdict"] == NOT_VERIFIED  # collected, every one skipped
    assert "**PASSED**" not in proc.stdout


@needs_cpu_machine
def test_deadline_cuts_a_phase_and_skips_the_rest(tmp_path):
    out = tmp_path / "out"
    proc = run_script(ROOT, out, timeout=120, GPU_CHECK_TOTAL_S="20", GPU_CHECK_ENV_S="60", GPU_CHECK_HANG="env",
                      NNRNN_SKIP_BUILD="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ends = verdicts(out)
    assert ends["env"]["verdict"] == NOT_VERIFIED and "cut by the deadline" in ends["env"]["detail"]
    for phase in ("build", "smoke", "timings", "tests", "suites"):
        assert ends[phase]["verdict"] == NOT_RUN and "no time left" in ends[phase]["detail"], ends[phase]
    assert proc.stdout == (out / "summary.md").read_text()


@needs_cpu_machine
def test_signal_writes_the_summary(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, GPU_CHECK_HANG="env", NNRNN_SKIP_BUILD="1")
    proc = subprocess.Popen(["bash", SCRIPT], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(r["phase"] == "env" and r["kind"] != "start"
                                             for r in (results(out) if (out / "results.jsonl").exists() else [])):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-2000:]
    ends = verdicts(out)
    assert ends["env"]["verdict"] == NOT_VERIFIED and "interrupted" in ends["env"]["detail"]
    assert stdout == (out / "summary.md").read_text()
    assert "| 11 | Benchmark suites | **NOT RUN** | 0 / rest | not reached |" in stdout


# ---------------------------------------------------------------- the parsers, on text in the tools' formats


def test_pytest_counts_from_the_log_when_the_xml_is_missing(tmp_path):
    log = ("tests/test_cuda.py::test_a[float32] PASSED   [ 1%]\ntests/test_cuda.py::test_b FAILED   [ 2%]\n"
           "tests/test_cuda.py::test_c SKIPPED (no GPU)   [ 3%]\n")
    c = gpu_check.pytest_counts(str(tmp_path / "missing.xml"), log)
    assert (c["passed"], c["failed"], c["skipped"], c["source"]) == (1, 1, 1, "log")
    assert c["failed_tests"] == ["tests/test_cuda.py::test_b"]


def test_tests_killed_at_their_cap_keep_the_counts_from_the_log(tmp_path, monkeypatch):
    log = tmp_path / "log.txt"
    log.write_text("earlier phases\n")
    monkeypatch.setenv("GPU_CHECK_LOG", str(log))
    monkeypatch.setenv("GPU_CHECK_RESULTS", str(tmp_path / "results.jsonl"))
    monkeypatch.setenv("GPU_CHECK_DEADLINE", str(time.time() + 400))
    assert gpu_check.start("tests") == 75
    with open(log, "a") as f:  # pytest -v, killed in the middle: no tests.xml
        f.write("tests/test_cuda.py::test_a PASSED [ 1%]\ntests/test_cuda.py::test_b FAILED [ 2%]\n"
                "tests/test_cuda.py::test_c ")
    line = gpu_check.end("tests", 124, 75, 75)
    assert line["verdict"] == FAILED and line["detail"].startswith("killed at its cap of 75 s")
    assert "1 passed, 1 failed, 0 skipped (from the log)" in line["detail"]
    counts = gpu_check.last(gpu_check.read_results(), "tests", "counts")
    assert counts["failed_tests"] == ["tests/test_cuda.py::test_b"]


def test_ptxas_and_resource_usage_parsers():
    from benchmarks.gpu_phases import ptxas_rows, resource_rows

    ptxas = ("ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'\n"
             "ptxas info    : Function properties for _Z6kernelPf\n"
             "    24 bytes stack frame, 32 bytes spill stores, 24 bytes spill loads\n"
             "ptxas info    : Used 40 registers, used 1 barriers, 472 bytes cmem[0]\n")
    assert ptxas_rows(ptxas) == [{"kernel": "kernel", "arch": "sm_90", "stack": 24, "spill_stores": 32,
                                  "spill_loads": 24, "registers": 40}]
    usage = ("Fatbin elf code:\n================\narch = sm_90\n\nResource usage:\n Common:\n  GLOBAL:0\n"
             " Function _Z6kernelPf:\n  REG:59 STACK:0 SHARED:0 LOCAL:8 CONSTANT[0]:584 TEXTURE:0\n")
    assert resource_rows(usage) == [{"kernel": "kernel", "arch": "sm_90", "registers": 59, "stack": 0, "local": 8}]


def test_the_persistent_kernels_are_profiled_by_name():
    # ncu (gpu_check.sh) and the profiler breakdown find the persistent kernels by name: every
    # __global__ entry point of global_kernels.cuh, and nothing else of the op's (the fallback's pointwise)
    from benchmarks.gpu_phases import KERNEL_NAMES, category

    with open(os.path.join(ROOT, "csrc", "cuda", "global_kernels.cuh")) as f:
        kernels = re.findall(r"__global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(", f.read())
    assert sorted(kernels) == sorted(KERNEL_NAMES.split("|"))
    with open(os.path.join(ROOT, SCRIPT)) as f:
        assert f'--kernel-name "regex:{KERNEL_NAMES}"' in f.read()
    for name in kernels:
        assert category(f"void nnrnn::kern::{name}<nnrnn::kern::TeamKernel<float>>(Body, unsigned long long)") == \
            "persistent kernel", name
    assert category("void nnrnn::kern::pointwise_kernel<float>(...)") == "fallback pointwise"


@needs_cpu_machine
def test_exchange_microbenchmark_dry_run(tmp_path):
    # each forced layout runs in the emulation, its plan's text and prediction recorded beside its time
    env = dict(os.environ, GPU_CHECK_RESULTS=str(tmp_path / "results.jsonl"), GPU_CHECK_LOG=str(tmp_path / "log"))
    env.pop("NNRNN_CUDA_FORCE_FALLBACK", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_phases", "exchange"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = results(tmp_path)
    rows = [r for r in lines if r["kind"] == "row"]
    assert lines[-1]["kind"] == "verdict" and lines[-1]["verdict"] == NOT_VERIFIED, lines[-1]
    assert sorted((r["kernel"], r["teams"]) for r in rows) == sorted(
        (k, s) for k in ("v2", "tc") for s in ("block:1x1", "cluster:2x1", "grid:2x1"))
    for r in rows:
        assert "error" not in r and r["us_per_step"] is not None, r
        assert f"layout set by NNRNN_CUDA_TEAMS={r['teams']}" in r["path"] and r["model_us"][0] > 0, r
        kernel = "v2" if r["kernel"] == "v2" else r"tensor cores \(KT \d+\)"
        assert re.match(rf"emulated: persistent {kernel} {r['teams'].split(':')[0]}: 1 teams x ", r["path"]), r
        assert r["above_base_us"] == pytest.approx(r["us_per_step"] - next(
            b["us_per_step"] for b in rows if b["kernel"] == r["kernel"] and b["teams"] == "block:1x1"))


def test_paths_are_compared_by_what_runs():
    # timings and smoke run a case once per plan: every fallback is the same code, whatever its reason;
    # the model's prediction is read off the path beside the measured time
    from benchmarks.gpu_phases import predicted_us, same_code, tf32, torch_dtype

    assert same_code("fallback: forced by NNRNN_CUDA_FORCE_FALLBACK; predicted 9.00 us/step forward, ...") == \
        same_code("fallback: kernel v2 runs float32 and float64 only; predicted ...") == "fallback"
    v2 = "persistent v2 cluster: 16 teams x 8 blocks ...; predicted 0.98 us/step forward, 1.42 us/step backward"
    assert same_code(v2) == v2 and predicted_us(v2) == [0.98, 2.4] and predicted_us("cudnn") is None
    assert torch_dtype("tf32") is torch.float32 and torch_dtype("bfloat16") is torch.bfloat16
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with tf32(True):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_ncu_and_sanitizer_judges(tmp_path, monkeypatch):
    text = ("  persistent_kernel (130, 1, 1)x(512, 1, 1), Context 1, Stream 7, Device 0, CC 9.0\n"
            "    Section: GPU Speed Of Light Throughput\n    ----------------------- ----------- ------------\n"
            "    Metric Name             Metric Unit Metric Value\n    ----------------------- ----------- ------------\n"
            "    Memory Throughput                 %         12.34\n    Duration                         us        70.66\n")
    assert gpu_check.ncu_metrics(text) == {"GPU Speed Of Light Throughput": {"Memory Throughput": "12.34 %",
                                                                             "Duration": "70.66 us"}}
    log = tmp_path / "log.txt"
    monkeypatch.setenv("GPU_CHECK_LOG", str(log))
    monkeypatch.setenv("GPU_CHECK_RESULTS", str(tmp_path / "results.jsonl"))
    start = [{"phase": "sanitizer:memcheck", "kind": "start", "log_offset": 0}]
    log.write_text("sanitizer case done\n========= ERROR SUMMARY: 0 errors\n")
    assert gpu_check.judge_sanitizer("sanitizer:memcheck", 0, start, [])[0] == PASSED
    log.write_text("========= Invalid __global__ read of size 4 bytes\n========= ERROR SUMMARY: 1 error\n")
    assert gpu_check.judge_sanitizer("sanitizer:memcheck", 99, start, []) == (
        FAILED, "ERROR SUMMARY: 1 error: Invalid __global__ read of size 4 bytes")
    log.write_text("========= Error: Device not supported\n")
    assert gpu_check.judge_sanitizer("sanitizer:memcheck", 1, start, [])[0] == NOT_VERIFIED


def test_prebuilt_matches_only_the_same_torch_and_python(tmp_path):
    from benchmarks.gpu_phases import prebuilt_matches

    ext = sysconfig.get_config_var("EXT_SUFFIX")
    assert prebuilt_matches(str(tmp_path))[0] is False  # nothing there
    (tmp_path / f"_C{ext}").write_bytes(b"")
    for version, suffix, usable, why in [(torch.__version__, ext, True, ext),
                                         ("2.9.0+cu130", ext, False, "built for torch 2.9.0+cu130"),
                                         (torch.__version__, ".cpython-39-x86_64-linux-gnu.so", False, "this Python needs")]:
        (tmp_path / "_build_info.py").write_text(f"TORCH_VERSION = {version!r}\nEXT_SUFFIX = {suffix!r}\n")
        got, reason = prebuilt_matches(str(tmp_path))
        assert got is usable and why in reason, reason


def test_verdicts_combine_and_the_budget_fits_eight_minutes():
    assert gpu_check.combine([PASSED, PASSED, PASSED]) == PASSED
    assert gpu_check.combine([PASSED, NOT_RUN]) == NOT_VERIFIED
    assert gpu_check.combine([NOT_RUN, NOT_RUN]) == NOT_RUN
    assert gpu_check.combine([PASSED, FAILED, NOT_VERIFIED]) == FAILED
    planned = sum(p.cap_s * p.runs for p in gpu_check.PHASES if p.cap_s is not None)
    assert planned + gpu_check.REPORT_RESERVE_S <= 480
