"""Helpers of benchmarks/gpu_check.sh.

    python -m benchmarks.gpu_check timings OUT_JSON   per-step times of the fused op (both CUDA
                                                     paths) and of cuDNN's nn.RNN, CUDA events
    python -m benchmarks.gpu_check report OUT_DIR     gathers what the script wrote under OUT_DIR
                                                     into results.json and summary.md; prints the table

Every figure names the card it was measured on; compare figures only within one run.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET

# (label, T, B, N, dtype name, nonlinearity): the paper's sizes and the PERF.md comparison case.
CASES = [
    ("copy task", 220, 10, 128, "float32", "modrelu"),
    ("psMNIST", 784, 100, 512, "float32", "modrelu"),
    ("PTB char", 150, 128, 1024, "float32", "modrelu"),
    ("cuDNN comparison", 200, 16, 768, "float16", "tanh"),
]


def _median_ms(fn, warmup=3, reps=10):
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def timings(out_json: str) -> None:
    import torch

    import nnrnn_fused

    rows = []
    if not torch.cuda.is_available():
        json.dump({"skipped": "no GPU"}, open(out_json, "w"))
        print("timings: skipped (no GPU)")
        return
    card = torch.cuda.get_device_name()
    for label, T, B, N, dtype_name, nl in CASES:
        dtype = getattr(torch, dtype_name)
        x = torch.randn(T, B, N, device="cuda", dtype=dtype, requires_grad=True)
        q, _ = torch.linalg.qr(torch.randn(N, N, device="cuda"))
        W = (0.95 * q).to(dtype).requires_grad_()
        b = torch.zeros(N, device="cuda", dtype=dtype, requires_grad=True)

        def fwd():
            with torch.no_grad():
                nnrnn_fused.fused_nnrnn(x, W, b, nonlinearity=nl)

        def fwd_bwd():
            out, h_n = nnrnn_fused.fused_nnrnn(x, W, b, nonlinearity=nl)
            out.sum().backward()

        # kernel v2, v1 and the fallback side by side (v2 where it fits: float32/float64)
        for kernel, force in (("v2", "0"), ("v1", "0"), ("auto", "1")):
            os.environ["NNRNN_CUDA_KERNEL"] = kernel
            os.environ["NNRNN_CUDA_FORCE_FALLBACK"] = force
            path = nnrnn_fused.cuda_path(N, B, dtype)
            try:
                f, fb = _median_ms(fwd), _median_ms(fwd_bwd)
                rows.append(dict(case=label, T=T, B=B, N=N, dtype=dtype_name, impl="nnrnn_fused", path=path,
                                 fwd_us_per_step=1e3 * f / T, fwd_bwd_us_per_step=1e3 * fb / T))
            except Exception as e:  # a failure is a result too; the tests say more
                rows.append(dict(case=label, T=T, B=B, N=N, dtype=dtype_name, impl="nnrnn_fused", path=path,
                                 error=f"{type(e).__name__}: {e}"[:300]))
        os.environ.pop("NNRNN_CUDA_FORCE_FALLBACK", None)
        os.environ.pop("NNRNN_CUDA_KERNEL", None)

        # cuDNN's tanh RNN of the same size (input size N, so its input GEMM is extra work it does)
        rnn = torch.nn.RNN(N, N, nonlinearity="tanh").to("cuda", dtype)
        xr = x.detach().clone().requires_grad_()

        def cudnn_fwd():
            with torch.no_grad():
                rnn(xr)

        def cudnn_fwd_bwd():
            rnn(xr)[0].sum().backward()

        rows.append(dict(case=label, T=T, B=B, N=N, dtype=dtype_name, impl="cuDNN nn.RNN(tanh)", path="cudnn",
                         fwd_us_per_step=1e3 * _median_ms(cudnn_fwd) / T,
                         fwd_bwd_us_per_step=1e3 * _median_ms(cudnn_fwd_bwd) / T))
        print(f"timings: {label} done", flush=True)
    json.dump({"card": card, "rows": rows}, open(out_json, "w"), indent=1)


def _junit_counts(path: str) -> dict:
    if not os.path.exists(path):
        return {"missing": True}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for s in suites:
        for k in counts:
            counts[k] += int(s.get(k, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    counts["failed_tests"] = failed[:50]
    return counts


def _run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:  # the tool may be missing on a CPU machine
        return f"unavailable ({type(e).__name__})"


def report(out_dir: str) -> None:
    import torch

    def load(name):
        p = os.path.join(out_dir, name)
        return json.load(open(p)) if os.path.exists(p) else None

    gpu = torch.cuda.is_available()
    env = {
        "card": torch.cuda.get_device_name() if gpu else "none (CPU machine)",
        "driver": _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if gpu else "n/a",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "nvcc": _run(["nvcc", "--version"]).splitlines()[-1] if gpu or os.environ.get("CUDA_HOME") else "n/a",
        "python": platform.python_version(),
        "commit": _run(["git", "rev-parse", "HEAD"]),
        "dirty": bool(_run(["git", "status", "--porcelain", "--untracked-files=no"])),
    }
    steps = load("steps.json") or {}
    tests = _junit_counts(os.path.join(out_dir, "tests.xml"))
    timing = load("timings.json") or {}
    bench_json = os.path.join(out_dir, "benchmarks.json")
    speed, memory = {}, {}
    if os.path.exists(bench_json):
        from benchmarks import report as bench_report

        _, speed, memory = bench_report.load(bench_json)
    results = {"env": env, "steps": steps, "tests": tests, "timings": timing,
               "benchmarks": "benchmarks.json" if speed or memory else None}
    json.dump(results, open(os.path.join(out_dir, "results.json"), "w"), indent=1)

    lines = [f"## GPU check: {env['card']}", "",
             f"driver {env['driver']}, torch {env['torch']} (CUDA {env['torch_cuda']}), {env['nvcc']}, "
             f"commit {env['commit'][:12]}{' (dirty)' if env['dirty'] else ''}", "",
             "| step | result |", "| --- | --- |"]
    for k, v in steps.items():
        lines.append(f"| {k} | {v} |")
    if not tests.get("missing"):
        lines.append(f"| GPU test counts | {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
                     f"{tests['skipped']} skipped |")
        for name in tests["failed_tests"]:
            lines.append(f"| failed | {name} |")
    if timing.get("rows"):
        lines += ["", f"Per-step times on {timing['card']} (median of 10, CUDA events):", "",
                  "| case | T | B | N | dtype | impl | path | fwd µs/step | fwd+bwd µs/step |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in timing["rows"]:
            if "error" in r:
                lines.append(f"| {r['case']} | {r['T']} | {r['B']} | {r['N']} | {r['dtype']} | {r['impl']} | "
                             f"{r['path']} | error: {r['error'][:80]} | |")
            else:
                lines.append(f"| {r['case']} | {r['T']} | {r['B']} | {r['N']} | {r['dtype']} | {r['impl']} | "
                             f"{r['path']} | {r['fwd_us_per_step']:.2f} | {r['fwd_bwd_us_per_step']:.2f} |")
    if speed:  # the benchmark suites' own report: µs per step and ratios, plus PNGs beside it
        lines += ["", f"Benchmark suites on {env['card']} (median µs per timestep; ratios in the same run):", "",
                  bench_report.speed_table(speed)]
        bench_report.plot(speed, out_dir)
    if memory:
        lines += ["", "Memory of forward+backward:", "", bench_report.memory_table(memory)]
    text = "\n".join(lines) + "\n"
    open(os.path.join(out_dir, "summary.md"), "w").write(text)
    print(text)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("timings", "report"):
        sys.exit(__doc__)
    {"timings": timings, "report": report}[sys.argv[1]](sys.argv[2])
