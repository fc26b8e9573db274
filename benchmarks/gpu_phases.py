"""The phases of benchmarks/gpu_check.sh that run torch. Each records its results as JSON lines
(benchmarks.gpu_check.record) the moment they exist, and its verdict last.

    python -m benchmarks.gpu_phases env|build|smoke|timings|exchange|barrier|breakdown
    python -m benchmarks.gpu_phases sanitizer-case|ncu-case     the small cases run under those tools

Without a GPU every phase is a dry run: the same code on the CPU at tiny sizes, so that the script
cannot rot between GPU windows. A dry run's verdict is NOT VERIFIED (or FAILED), never PASSED.
GPU_CHECK_PHASE_DEADLINE (epoch seconds, set by the script) paces the phases that share their time.
"""
from __future__ import annotations

import json
import os
import platform
import re
import runpy
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from contextlib import contextmanager
from functools import lru_cache

import torch

from benchmarks.gpu_check import (FAILED, NOT_RUN, NOT_VERIFIED, PASSED, find_tool, read_results, record, since_start,
                                  source_hash)
from benchmarks.static_check import read_ptxas_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"


def seconds_left(margin: float = 5.0) -> float:
    """Until the phase's cap, less a margin to record the verdict."""
    return float(os.environ.get("GPU_CHECK_PHASE_DEADLINE", time.time() + 600)) - margin - time.time()


def verdict(phase: str, ok: bool, detail: str) -> None:
    """PASSED only on a GPU; a dry run that went well is NOT VERIFIED."""
    if not ok:
        record(phase, "verdict", verdict=FAILED, detail=detail)
    elif GPU:
        record(phase, "verdict", verdict=PASSED, detail=detail)
    else:
        record(phase, "verdict", verdict=NOT_VERIFIED, detail=f"dry run on the CPU: {detail}; no GPU")


def run_text(cmd: list[str], timeout: float = 30) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (proc.stdout + proc.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({type(e).__name__})"


# ---------------------------------------------------------------- the CUDA paths


DEFAULT_PATHS = ("tc:NNRNN_CUDA_KERNEL=tc;v2:NNRNN_CUDA_KERNEL=v2;v1:NNRNN_CUDA_KERNEL=v1;"
                 "fallback:NNRNN_CUDA_FORCE_FALLBACK=1")
# The persistent kernels' names (global_kernels.cuh): v1, v2, the tensor-core path.
KERNEL_NAMES = r"persistent_kernel|team_kernel|tc_kernel"


def cuda_paths() -> list[tuple[str, dict]]:
    """The paths run side by side: (name, environment settings). GPU_CHECK_PATHS overrides the
    default, as "name:VAR=value,VAR=value;name:...": the tensor-core path (float16, bfloat16, and
    float32 where TF32 is allowed), kernel v2 (float32, float64), kernel v1 and the fallback. Where
    a path does not take a case (cuda_path says the fallback, or the same plan as a path before it)
    the case is not run again for it.
    Once the fallback is forced for the whole check (after a hang), only the fallback runs."""
    if os.environ.get("NNRNN_CUDA_FORCE_FALLBACK", "0") not in ("", "0"):
        return [("fallback", {})]
    spec = os.environ.get("GPU_CHECK_PATHS", DEFAULT_PATHS)
    paths = []
    for item in filter(None, spec.split(";")):
        name, _, settings = item.partition(":")
        paths.append((name, dict(s.split("=", 1) for s in settings.split(",") if s)))
    return paths


class using_env:
    """Environment settings for the calls inside (the driver reads them at every call)."""

    def __init__(self, settings: dict):
        self.settings, self.saved = settings, {}

    def __enter__(self):
        for k, v in self.settings.items():
            self.saved[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def path_name(N: int, B: int, dtype) -> str:
    """What cuda_path says (kernel version and plan), or the CPU path in a dry run."""
    import nnrnn_fused

    return nnrnn_fused.cuda_path(N, B, dtype) if GPU else "cpu"


def same_code(path: str) -> str:
    """What runs for a cuda_path text: the fallback whatever its reason, else the plan itself."""
    return "fallback" if path.startswith("fallback") else path


@contextmanager
def tf32(allowed: bool):
    """TF32 in float32 matmuls (the tensor-core path's switch) and cuDNN, inside; restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def torch_dtype(name: str) -> torch.dtype:
    """A case's dtype: "tf32" is float32 (run with TF32 allowed)."""
    return torch.float32 if name == "tf32" else getattr(torch, name)


def tf32_changes_nothing(dtype_name: str, path: str) -> bool:
    """A "tf32" case on a persistent kernel without tensor cores (v2, v1: float32 FMAs): the
    float32 case runs the same. TF32 changes only the tensor-core path and the fallback's GEMMs."""
    return dtype_name == "tf32" and path.startswith("persistent") and "tensor cores" not in path


def predicted_us(path: str):
    """The model's [forward, forward+backward] µs/step in a cuda_path text, or None."""
    m = re.search(r"predicted ([\d.]+) us/step forward, ([\d.]+) us/step backward", path)
    return [float(m.group(1)), round(float(m.group(1)) + float(m.group(2)), 2)] if m else None


# ---------------------------------------------------------------- 1. environment


def probe_clusters(props) -> dict:
    """Compile and run benchmarks/cluster_probe.cu: max active clusters by cluster size and shared
    memory per block, with the persistent kernels' block of 512 threads."""
    nvcc = find_tool("nvcc")
    if not nvcc:
        return {"error": "nvcc not found"}
    m = re.findall(r"(\d+)\.(\d+)([a-z]?)", os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    arch = "".join(m[-1]) if m else "90"
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "cluster_probe")
        built = subprocess.run([nvcc, "-O1", f"-arch=sm_{arch}", "-o", exe,
                                os.path.join(ROOT, "benchmarks", "cluster_probe.cu")],
                               capture_output=True, text=True, timeout=120)
        if built.returncode != 0:
            return {"error": "cluster_probe.cu did not compile: " + (built.stdout + built.stderr)[-500:]}
        optin = getattr(props, "shared_memory_per_block_optin", 0) if props is not None else 0
        ran = subprocess.run([exe, "512", "0", str(optin // 2), str(optin)], capture_output=True, text=True,
                             timeout=30)
        rows = [json.loads(line) for line in ran.stdout.splitlines() if line.startswith("{")]
        if ran.returncode != 0 or not rows:
            return {"error": f"cluster_probe exit {ran.returncode}: " + (ran.stdout + ran.stderr)[-300:],
                    "compiled_for": f"sm_{arch}"}
        return {"rows": rows, "compiled_for": f"sm_{arch}"}


def smi_fields() -> dict:
    fields = ["name", "driver_version", "pstate", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
              "power.draw", "power.limit", "temperature.gpu", "compute_mode", "mig.mode.current", "utilization.gpu",
              "memory.used", "memory.total"]
    def query(names):
        text = run_text(["nvidia-smi", f"--query-gpu={','.join(names)}", "--format=csv,noheader"])
        values = [v.strip() for v in text.splitlines()[0].split(",")] if text else []
        return dict(zip(names, values)) if len(values) == len(names) else None

    # one field this driver does not know fails the whole query: then field by field
    return query(fields) or {name: (query([name]) or {}).get(name, "not readable") for name in fields}


def nvcc_release(nvcc: str) -> str:
    if not nvcc:
        return "not found"
    text = run_text([nvcc, "--version"])
    m = re.search(r"release [\d.]+, V[\d.]+", text)
    return m.group(0) if m else text.splitlines()[-1]


def phase_env() -> None:
    nvcc = find_tool("nvcc")
    commit = run_text(["git", "-C", ROOT, "rev-parse", "HEAD"])
    in_git = re.fullmatch(r"[0-9a-f]{40}", commit) is not None
    record("env", "source", commit=commit if in_git else os.environ.get("GPU_CHECK_COMMIT", "unknown (no .git)"),
           dirty=bool(run_text(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"])) if in_git else None,
           source_sha256=source_hash(ROOT))
    record("env", "versions", python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
           cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           nvcc=nvcc_release(nvcc),
           driver=smi_fields().get("driver_version", "n/a") if GPU else "n/a",
           watchdog_ms=os.environ.get("NNRNN_CUDA_WATCHDOG_MS", "off"))
    tools = {name: find_tool(name) or None for name in ("nvcc", "compute-sanitizer", "ncu", "cuobjdump", "nvidia-smi")}
    record("env", "tools", **tools)
    props = torch.cuda.get_device_properties(0) if GPU else None
    plain = {}
    if props is not None:
        for k in dir(props):
            v = getattr(props, k, None)
            if not k.startswith("_") and isinstance(v, (int, float, str, bool)):
                plain[k] = v
    record("env", "device", gpu=GPU, name=torch.cuda.get_device_name(0) if GPU else None,
           count=torch.cuda.device_count() if GPU else 0, properties=plain)
    if GPU:
        record("env", "clocks", fields=smi_fields())
    clusters = probe_clusters(props)
    record("env", "clusters", **clusters)
    missing = [name for name, path in tools.items() if path is None]
    detail = f"{'; '.join(f'{k} not found' for k in missing) or 'all tools found'}"
    if "error" in clusters:
        detail += f"; clusters not read: {clusters['error'][:120]}"
    if GPU and "error" in clusters:  # read what it could, but not everything
        record("env", "verdict", verdict=NOT_VERIFIED, detail=detail)
    else:
        verdict("env", True, detail)


# ---------------------------------------------------------------- 2. build or load


def prebuilt_matches(folder: str) -> tuple[bool, str]:
    """Whether the extension prebuilt for the GPU machine (tools/prebuild_gpu.sh) fits this
    interpreter and torch: its _build_info.py names the torch version and EXT_SUFFIX it was built for."""
    info_path = os.path.join(folder, "_build_info.py")
    if not os.path.exists(info_path):
        return False, f"no {info_path}"
    info = runpy.run_path(info_path)  # constants written by the build
    ext = sysconfig.get_config_var("EXT_SUFFIX")
    if info.get("TORCH_VERSION") != torch.__version__:
        return False, f"built for torch {info.get('TORCH_VERSION')}, torch {torch.__version__} is installed"
    if info.get("EXT_SUFFIX") != ext:
        return False, f"built for {info.get('EXT_SUFFIX')}, this Python needs {ext}"
    if not os.path.exists(os.path.join(folder, "_C" + ext)):
        return False, f"no _C{ext} in {folder}"
    return True, f"torch {torch.__version__}, {ext}"


def extension_status() -> dict:
    """nnrnn_fused.status() from a fresh interpreter (this one may hold an older copy)."""
    proc = subprocess.run([sys.executable, "-c", "import json, nnrnn_fused; print(json.dumps(nnrnn_fused.status()))"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"extension_loaded": False, "load_error": (proc.stdout + proc.stderr)[-500:]}


def demangle(names: list[str]) -> list[str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return names
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def short_kernel(name: str) -> str:
    """persistent_kernel<PersistentForward<float, float>> from the demangled name."""
    name = re.sub(r"nnrnn::kern::(\(anonymous namespace\)::)?", "", name)
    name = re.sub(r"c10::(BFloat16|Half)", r"\1", name)
    return re.sub(r"\(.*\)$", "", name)[:90]


def ptxas_rows(text: str) -> list[dict]:
    """Per kernel and arch: registers, stack frame and spills from ptxas -v, kernels demangled."""
    rows = read_ptxas_report(text)
    for row, name in zip(rows, demangle([r["kernel"] for r in rows])):
        row["kernel"] = short_kernel(name)
    return rows


def resource_rows(text: str) -> list[dict]:
    """Per kernel: REG, STACK, SHARED, LOCAL from cuobjdump --dump-resource-usage."""
    rows, arch = [], None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m and i + 1 < len(lines):
            usage = dict(re.findall(r"(\w+):(\d+)", lines[i + 1]))
            rows.append({"kernel": m.group(1), "arch": arch, "registers": int(usage.get("REG", 0)),
                         "stack": int(usage.get("STACK", 0)), "local": int(usage.get("LOCAL", 0))})
    for row, name in zip(rows, demangle([r["kernel"] for r in rows])):
        row["kernel"] = short_kernel(name)
    return rows


def build_here() -> tuple[int, str]:
    """setup.py build_ext --inplace with the CUDA kernels required (NNRNN_CUDA=1), its output streamed
    to the log; ptxas -v (through NVCC_APPEND_FLAGS) reports registers and spills per kernel."""
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "16"), NNRNN_CUDA=os.environ.get("NNRNN_CUDA", "1"),
               TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    env["NVCC_APPEND_FLAGS"] = (env.get("NVCC_APPEND_FLAGS", "") + " -Xptxas -v").strip()
    proc = subprocess.Popen([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kept = []
    for line in proc.stdout:
        sys.stdout.write(line)
        if "ptxas" in line or "spill" in line:
            kept.append(line.rstrip())
    sys.stdout.flush()
    return proc.wait(), "\n".join(kept)


def phase_build() -> None:
    folder = os.path.join(ROOT, os.environ.get("NNRNN_PREBUILT_DIR", os.path.join(".prebuilt", "gpu")))
    package = os.path.join(ROOT, "nnrnn_fused")
    ptxas, status = "", {}
    if os.environ.get("NNRNN_SKIP_BUILD") == "1":
        how = "in the tree as it is (NNRNN_SKIP_BUILD=1)"
    else:
        usable, why = prebuilt_matches(folder)
        record("build", "prebuilt", folder=folder, usable=usable, why=why)
        how = None
        if usable:
            ext = sysconfig.get_config_var("EXT_SUFFIX")
            for name in ("_C" + ext, "_build_info.py"):
                shutil.copy2(os.path.join(folder, name), os.path.join(package, name))
            status = extension_status()
            if status.get("extension_loaded"):
                how = f"prebuilt ({why})"
            else:
                record("build", "prebuilt", folder=folder, usable=False, why=f"did not load: {status.get('load_error')}")
        if how is None:
            started = time.time()
            rc, ptxas = build_here()
            record("build", "compile", rc=rc, seconds=round(time.time() - started, 1),
                   arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
            how = f"built here in {time.time() - started:.0f} s" + ("" if rc == 0 else f" (FAILED, exit {rc})")
    if not how.startswith("prebuilt"):
        status = extension_status()
    record("build", "extension", how=how, **status)
    rows = ptxas_rows(ptxas)
    source = "ptxas -v of this build"
    if not rows:
        so = [os.path.join(package, f) for f in os.listdir(package) if f.startswith("_C") and f.endswith(".so")]
        cuobjdump = find_tool("cuobjdump")
        if cuobjdump and so:
            rows = resource_rows(run_text([cuobjdump, "--dump-resource-usage", max(so, key=os.path.getmtime)], 60))
            source = "cuobjdump --dump-resource-usage of the loaded module"
    record("build", "kernels", source=source, rows=rows)
    if not status.get("extension_loaded"):
        verdict("build", False, f"{how}; the extension does not load: {status.get('load_error')}")
    elif not status.get("cuda_kernels_compiled"):
        verdict("build", False, f"{how}; loaded without its CUDA kernels")
    else:
        spills = [r for r in rows if r.get("spill_stores") or r.get("local")]
        resources = (f"resources of {len(rows)} kernel build(s) read, {len(spills)} spill or use local memory" if rows
                     else "kernel resources not read (no ptxas output, no cuobjdump)")
        verdict("build", True, f"{how}; CUDA kernels loaded; {resources}")


# ---------------------------------------------------------------- 3. smoke

# (T, B, N, with h0 and lengths); dtypes; bounds on ||got - ref|| / ||ref|| (forward, gradients)
SMOKE_SHAPES = [(17, 5, 300, True), (32, 32, 512, False), (8, 128, 1024, False)] if GPU else [(5, 3, 16, True)]
# "tf32": float32 with TF32 allowed (the tensor-core path's operands rounded to 10 mantissa bits).
SMOKE_DTYPES = ["float32", "float64", "float16", "bfloat16", "tf32"] if GPU else ["float32", "float64"]
SMOKE_BOUNDS = {"float64": (1e-10, 1e-9), "float32": (1e-5, 1e-4), "float16": (3e-3, 2e-2), "bfloat16": (2e-2, 1e-1),
                "tf32": (3e-3, 2e-2)}
FATAL = re.compile(r"launch failure|illegal (instruction|memory|address)|unspecified|device-side assert|CUDA error")


def relative_error(got, want) -> float:
    want = want.double()
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def smoke_case(T, B, N, dtype_name, full, seed) -> dict:
    import nnrnn_fused
    from nnrnn_fused.reference import nnrnn_recurrence

    dtype = torch_dtype(dtype_name)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
    x64 = torch.randn(T, B, N, generator=g, dtype=torch.float64)
    b64 = 0.1 * torch.randn(N, generator=g, dtype=torch.float64)
    h64 = torch.randn(B, N, generator=g, dtype=torch.float64) if full else None
    lengths = torch.randint(0, T + 1, (B,), generator=g) if full else None
    leaves64 = [t.to(DEVICE) for t in (x64, 0.95 * q, b64)] + ([h64.to(DEVICE)] if full else [])
    leaves = [t.to(dtype).requires_grad_() for t in leaves64]
    out, h_n = nnrnn_fused.fused_nnrnn(*leaves[:3], leaves[3] if full else None, nonlinearity="modrelu", lengths=lengths)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEVICE)
    grads = torch.autograd.grad((out.double() * go).sum() + h_n.double().sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_out, ref_hn = nnrnn_recurrence(*ref_leaves[:3], ref_leaves[3] if full else None, nonlinearity="modrelu",
                                       lengths=lengths)
    ref_grads = torch.autograd.grad((ref_out * go).sum() + ref_hn.sum(), ref_leaves)
    if GPU:
        torch.cuda.synchronize()
    out_err = max(relative_error(out, ref_out), relative_error(h_n, ref_hn))
    grad_err = max(relative_error(a, b) for a, b in zip(grads, ref_grads))
    fwd_bound, grad_bound = SMOKE_BOUNDS[dtype_name]
    finite = all(torch.isfinite(t).all().item() for t in (out, h_n, *grads))
    return dict(out_err=out_err, grad_err=grad_err, fwd_bound=fwd_bound, grad_bound=grad_bound,
                ok=bool(finite and out_err <= fwd_bound and grad_err <= grad_bound))


def smoke_path(name: str) -> int:
    """One path's cases, in a process of its own (a trap loses the CUDA context)."""
    settings = dict(cuda_paths()).get(name, {})
    with using_env(settings):
        for seed, (T, B, N, full) in enumerate(SMOKE_SHAPES):
            for dtype_name in SMOKE_DTYPES:
                row = dict(path=name, T=T, B=B, N=N, dtype=dtype_name, with_h0_lengths=full)
                try:
                    with tf32(dtype_name == "tf32"):
                        row["plan"] = plan = path_name(N, B, torch_dtype(dtype_name))
                        # the fallback is the fallback path's to run
                        if GPU and name != "fallback" and (plan.startswith("fallback") or
                                                           tf32_changes_nothing(dtype_name, plan)):
                            record("smoke", "skip", **row)
                            continue
                        row.update(smoke_case(T, B, N, dtype_name, full, seed))
                except Exception as e:  # recorded; a lost CUDA context ends the path
                    row.update(ok=False, error=f"{type(e).__name__}: {e}"[:400])
                    record("smoke", "case", **row)
                    if GPU and FATAL.search(str(e)):
                        record("smoke", "path", path=name, env=settings, fatal=True,
                               detail=f"CUDA error (context lost): {str(e)[:200]}")
                        return 3
                    continue
                record("smoke", "case", **row)
    return 0


def phase_smoke() -> None:
    paths = cuda_paths() if GPU else [("cpu", {})]
    child_env = dict(os.environ)
    os.environ.pop("GPU_CHECK_HANG", None)  # a forced hang is the paths' (children's), not this supervisor's
    for i, (name, settings) in enumerate(paths):
        share = seconds_left() / (len(paths) - i)
        try:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_phases", "smoke-path", name], cwd=ROOT,
                                  env=child_env, timeout=max(share, 1.0))
            if proc.returncode not in (0, 3):
                record("smoke", "path", path=name, env=settings, fatal=True, detail=f"crashed (exit {proc.returncode})")
        except subprocess.TimeoutExpired:
            record("smoke", "path", path=name, env=settings, fatal=True, detail=f"hung: killed after {share:.0f} s")
    mine = since_start(read_results(), "smoke")
    cases = [r for r in mine if r["kind"] == "case"]
    wrong = [f"{r['path']} {r['dtype']} N={r['N']} B={r['B']}: {r.get('error') or 'error above the bound'}"[:160]
             for r in cases if not r.get("ok")]
    lost = [f"path {r['path']}: {r['detail']}"[:160] for r in mine if r["kind"] == "path"]
    skipped = sum(r["kind"] == "skip" for r in mine)
    again = [f"{skipped} not run again (the fallback's, or TF32 without tensor cores)"] if skipped else []
    detail = "; ".join([f"{len(cases) - len(wrong)} of {len(cases)} cases within bounds"] + again + lost + wrong[:3])
    verdict("smoke", not wrong and not lost and len(cases) > 0, detail)


# ---------------------------------------------------------------- 4. target timings

# (label, dtype, N, B): the compass cases of the kernel issues (v2: float32; the tensor-core path:
# float16, bfloat16, and float32 as TF32: dtype "tf32", TF32 allowed on both sides).
COMPASS = ([("f32 N=512 B=32", "float32", 512, 32), ("f32 N=1024 B=128", "float32", 1024, 128),
            ("f32 N=128 B=10", "float32", 128, 10), ("f32 N=256 B=1", "float32", 256, 1),
            ("f16 N=768 B=16", "float16", 768, 16), ("bf16 N=768 B=16", "bfloat16", 768, 16),
            ("bf16 N=512 B=32", "bfloat16", 512, 32), ("bf16 N=1024 B=128", "bfloat16", 1024, 128),
            ("tf32 N=1024 B=128", "tf32", 1024, 128)]
           if GPU else [("dry f32 N=16 B=2", "float32", 16, 2)])
T_PAIR = (100, 400) if GPU else (5, 10)


def median_ms(fn, budget_s: float = 0.25) -> float:
    """Median time of fn(): CUDA events after a warm-up, as many repetitions as fit the budget (3 to 15)."""
    fn()
    if GPU:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if GPU:
        torch.cuda.synchronize()
    reps = int(min(15, max(3, budget_s / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(reps):
        if GPU:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def per_step(times: dict) -> dict:
    """Cost per step and fixed cost from the times at the two sequence lengths."""
    (t1, ms1), (t2, ms2) = sorted(times.items())
    us = 1e3 * (ms2 - ms1) / (t2 - t1)
    return {"us_per_step": us, "fixed_ms": ms1 - t1 * us / 1e3, "ms": {str(k): v for k, v in times.items()}}


@lru_cache(maxsize=4)
def orthogonal(N: int, seed: int = 0) -> torch.Tensor:
    """A random orthogonal N x N matrix on the CPU (a QR: once per size, not per runner)."""
    return torch.linalg.qr(torch.randn(N, N, generator=torch.Generator().manual_seed(seed)))[0]


def make_runner(impl: str, N: int, B: int, T: int, dtype, grad: bool, seed: int = 0):
    """A closure running one call (forward, or forward+backward) of an implementation."""
    import nnrnn_fused

    g, on_device = torch.Generator().manual_seed(seed + 1), torch.Generator(DEVICE).manual_seed(seed)
    x = torch.randn(T, B, N, generator=on_device, device=DEVICE).to(dtype).requires_grad_(grad)
    if impl.startswith("cudnn"):
        module = (torch.nn.RNN(N, N, nonlinearity="tanh") if impl == "cudnn_rnn" else torch.nn.LSTM(N, N))
        module = module.to(DEVICE, dtype).requires_grad_(grad)

        def forward():
            return module(x)[0]
    else:
        W = (0.95 * orthogonal(N, seed)).to(DEVICE, dtype).requires_grad_(grad)
        b = (0.01 * torch.randn(N, generator=g)).to(DEVICE, dtype).requires_grad_(grad)

        def forward():
            return nnrnn_fused.fused_nnrnn(x, W, b, nonlinearity="modrelu")[0]
    if not grad:
        def run():
            with torch.no_grad():
                forward()
        return run
    go = torch.randn(T, B, N, generator=on_device, device=DEVICE).to(dtype)
    return lambda: forward().backward(go)


def phase_timings() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # true float32 on both sides (but in the "tf32" case)
    torch.backends.cudnn.allow_tf32 = False
    record("timings", "settings", T=list(T_PAIR), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
           tf32_cudnn=torch.backends.cudnn.allow_tf32, tf32_cases=[c[0] for c in COMPASS if c[1] == "tf32"],
           timer="CUDA events, median" if GPU else "perf_counter, median (dry run)")
    impls = cuda_paths() if GPU else [("cpu", {})]
    impls += [("cudnn_rnn", {}), ("cudnn_lstm", {})] if GPU else [("torch_rnn", {}), ("torch_lstm", {})]
    rows = errors = 0
    for label, dtype_name, N, B in COMPASS:
        dtype = torch_dtype(dtype_name)
        timed = {}  # what runs (same_code) -> the impl that timed it, in this case
        for name, settings in impls:
            baseline = name.startswith(("cudnn", "torch_"))
            row = dict(case=label, dtype=dtype_name, N=N, B=B, impl=name if baseline else f"fused {name}")
            try:
                with using_env(settings), tf32(dtype_name == "tf32"):
                    row["path"] = "cudnn" if GPU and baseline else ("cpu" if baseline else path_name(N, B, dtype))
                    if not baseline:
                        # timed already in this case, or in the float32 case
                        done = timed.get(same_code(row["path"]))
                        if done is None and tf32_changes_nothing(dtype_name, row["path"]):
                            done = "the float32 case (no TF32 in this kernel)"
                        if done is not None:
                            record("timings", "same", **row, same_as=done)
                            continue
                        timed[same_code(row["path"])] = row["impl"]
                        row["model_us"] = predicted_us(row["path"])
                    kind = "cudnn_rnn" if name in ("cudnn_rnn", "torch_rnn") else (
                        "cudnn_lstm" if name in ("cudnn_lstm", "torch_lstm") else "fused")
                    for mode, grad in (("fwd", False), ("fwdbwd", True)):
                        row[mode] = per_step({T: median_ms(make_runner(kind, N, B, T, dtype, grad)) for T in T_PAIR})
                    if GPU:
                        run = make_runner(kind, N, B, T_PAIR[1], dtype, True)
                        run()
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                        run()
                        torch.cuda.synchronize()
                        row["peak_bytes"] = torch.cuda.max_memory_allocated() - base
            except Exception as e:  # a failure is a result too
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            record("timings", "row", **row)
            rows += 1
            errors += "error" in row
    verdict("timings", errors == 0, f"{rows} rows, {errors} with an error")


# ---------------------------------------------------------------- 5. exchange microbenchmark

# Kernel v2 (float32) and the tensor-core kernel (bfloat16) at a small N, one team, each exchange
# forced with NNRNN_CUDA_TEAMS: the product is small there, so a step's cost above the block
# exchange's is the exchange's own (latency and publishing): the model's cluster_exchange_us and
# grid_exchange_us (plan.h), which only a GPU can measure. Then the cluster of 16 with more rows,
# whose slope adds the bytes each block stores into its 15 peers (dsmem_bytes_per_clock).
# (kernel, dtype, N, B, NNRNN_CUDA_TEAMS)
LATENCY_SPECS = ["block:1x1", "cluster:2x1", "cluster:4x1", "cluster:8x1", "cluster:16x1", "grid:2x1", "grid:4x1",
                 "grid:8x1", "grid:16x1"]
EXCHANGE_CASES = ([("v2", "float32", 64, 1, s) for s in LATENCY_SPECS] +
                  [("tc", "bfloat16", 128, 8, s) for s in LATENCY_SPECS] +
                  [("v2", "float32", 256, B, "cluster:16x1") for B in (1, 8, 32)]
                  if GPU else [(k, "float32", 16, 1, s) for k in ("v2", "tc") for s in ("block:1x1", "cluster:2x1",
                                                                                          "grid:2x1")])


def emulated_forward(kernel: str, spec: str, x, W) -> str:
    """Dry run: the emulated kernel (v2, or tc as TF32, with the emulation's KT of 1) with the layout
    the plan takes for `spec`; returns the plan's text."""
    N, B = W.shape[0], x.shape[1]
    with using_env({"NNRNN_CUDA_TEAMS": spec}):
        text, v = torch.ops.nnrnn_fused.model_plan(N, B, torch.float32, kernel, allow_tf32=kernel == "tc")
    if v[0] == 0:
        raise RuntimeError(text)
    exchange, C, G, rt = ["block", "cluster", "grid"][int(v[1])], int(v[2]), int(v[3]), int(v[5])
    if kernel == "v2":
        torch.ops.nnrnn_fused.emulated_recurrence_v2(x, W, None, None, None, "tanh", exchange, C, G, rt)
    else:
        torch.ops.nnrnn_fused.emulated_recurrence_tc(x, W, None, None, None, "tanh", exchange, C, G, rt, 1)
    return text


def step_rows(phase: str, cases: list, T_steps: tuple, measure) -> None:
    """The microbenchmarks' rows: for each (row, base) of `cases`, measure(row, x, W) -> ms of one
    forward, at the two lengths T_steps (x: T x B x N, W: 0.9 x orthogonal, float32 or row["dtype"]),
    gives µs per step and the fixed cost, the model's prediction read off row["path"] (measure sets
    it), and above_base_us: the step above that of the first case of the same `base` (none where that
    one failed). A failure is a row too; the verdict is the phase's."""
    bases, count, errors = {}, 0, 0
    for row, base in cases:
        bases.setdefault(base, row)
        if seconds_left() < 2:
            row["error"] = "not run: the phase's time is up"
        else:
            try:
                dtype, N, B = getattr(torch, row.get("dtype", "float32")), row["N"], row["B"]
                times = {}
                for T in T_steps:
                    x = torch.randn(T, B, N, generator=torch.Generator().manual_seed(T)).to(DEVICE, dtype)
                    times[T] = measure(row, x, (0.9 * orthogonal(N)).to(DEVICE, dtype))
                row.update({k: v for k, v in per_step(times).items() if k != "ms"})
                row["model_us"] = predicted_us(row["path"])
                if "us_per_step" in bases[base]:
                    row["above_base_us"] = row["us_per_step"] - bases[base]["us_per_step"]
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
        record(phase, "row", **row)
        count += 1
        errors += "error" in row
    verdict(phase, errors == 0 and count > 0, f"{count} rows, {errors} with an error")


def phase_exchange() -> None:
    """Forward µs/step of EXCHANGE_CASES (T = 200 and 1000, CUDA events), beside the model's prediction
    for the same layout; per kernel, the step cost above its block exchange's. Dry run: the emulated
    kernels with the layouts the plan takes for those settings, at T = 3 and 6."""
    import nnrnn_fused

    if os.environ.get("NNRNN_CUDA_FORCE_FALLBACK", "0") not in ("", "0"):
        record("exchange", "verdict", verdict=NOT_RUN, detail="the fallback is forced for the remaining phases "
               "(a path hung or lost the CUDA context in smoke): no persistent kernel to time")
        return

    def measure(row, x, W):
        if not GPU:
            row["path"] = "emulated: " + emulated_forward(row["kernel"], row["teams"], x, W)
            return median_ms(lambda: emulated_forward(row["kernel"], row["teams"], x, W), budget_s=0.05)
        with using_env({"NNRNN_CUDA_KERNEL": row["kernel"], "NNRNN_CUDA_TEAMS": row["teams"]}):
            row["path"] = nnrnn_fused.cuda_path(W.shape[0], x.shape[1], x.dtype)
            if not row["path"].startswith("persistent"):
                raise RuntimeError(f"the plan is not the forced layout: {row['path']}")
            return median_ms(lambda: nnrnn_fused.fused_nnrnn(x, W, nonlinearity="tanh"), 0.1)

    # the first case of a kernel and N is the base: its block exchange (the cluster series: B = 1)
    step_rows("exchange", [(dict(kernel=k, dtype=d, N=N, B=B, teams=s), (k, N)) for k, d, N, B, s in EXCHANGE_CASES],
              (200, 1000) if GPU else (3, 6), measure)


# ---------------------------------------------------------------- 6. barrier microbenchmark


def phase_barrier() -> None:
    """Forward µs/step of a tiny N (one row of 32 per block) at grids of 1, 8, 32 and all SMs, forced
    through NNRNN_CUDA_PLAN; the step cost above grid 1 is the grid barrier's. Dry run: the
    emulated kernels at grids of 1, 2 and 4 blocks."""
    import nnrnn_fused

    N = 32 if GPU else 8
    if GPU:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        grids = sorted({int(g) for g in os.environ.get("GPU_CHECK_BARRIER_GRIDS", f"1 8 32 {sms}").split()})
    else:
        grids = [1, 2, 4]
    record("barrier", "note", text="kernel v1 uses no thread-block clusters: no cluster sizes to measure")

    def measure(row, x, W):
        grid = row["grid"]
        if not GPU:
            row["path"] = f"emulated persistent 1 x {grid} blocks"
            return median_ms(lambda: torch.ops.nnrnn_fused.emulated_recurrence(
                x, W, None, None, None, "tanh", 1, grid, 4, 1, True), budget_s=0.05)
        with using_env({"NNRNN_CUDA_PLAN": f"1x{grid}"}):
            row["path"] = nnrnn_fused.cuda_path(N, grid)
            return median_ms(lambda: nnrnn_fused.fused_nnrnn(x, W, nonlinearity="tanh"))

    # one row per block; grid 1 (the smallest, first) is the base
    step_rows("barrier", [(dict(grid=grid, N=N, B=grid), N) for grid in grids], (500, 2000) if GPU else (10, 20),
              measure)


# ---------------------------------------------------------------- 7. profiler breakdown

CATEGORIES = [("persistent kernel", KERNEL_NAMES), ("fallback pointwise", r"pointwise_kernel"),
              ("GEMM", r"gemm|nvjet|cutlass|xmma|cublas|aten::mm|aten::addmm"),
              ("fused op (CPU)", r"nnrnn_fused::")]


def category(name: str) -> str:
    return next((c for c, pattern in CATEGORIES if re.search(pattern, name, re.I)), "rest")


def phase_breakdown() -> None:
    from torch.profiler import ProfilerActivity, profile

    cases = [("f32 N=512 B=32 T=400", 512, 32, 400), ("f32 N=1024 B=128 T=400", 1024, 128, 400)] if GPU else [
        ("dry f32 N=16 B=2 T=10", 16, 2, 10)]
    reps, ok = 3, 0
    for label, N, B, T in cases:
        run = make_runner("fused", N, B, T, torch.float32, True)
        run()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if GPU else [])
        with profile(activities=activities) as prof:
            for _ in range(reps):
                run()
            if GPU:
                torch.cuda.synchronize()
        totals, top = {}, []
        for e in prof.key_averages():
            if GPU:
                is_kernel = str(getattr(e, "device_type", "")).endswith("CUDA")
                us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            else:
                is_kernel, us = True, e.self_cpu_time_total
            if not is_kernel or us <= 0:
                continue
            totals[category(e.key)] = totals.get(category(e.key), 0.0) + us / reps
            top.append((e.key[:100], us / reps))
        top.sort(key=lambda kv: -kv[1])
        record("breakdown", "case", case=label, path=path_name(N, B, torch.float32), categories=totals, top=top[:8],
               unit="µs per forward+backward (device time)" if GPU else "µs per forward+backward (CPU self time)")
        ok += 1
    verdict("breakdown", ok == len(cases), f"{ok} case(s) profiled")


# ---------------------------------------------------------------- cases under the tools


def sanitizer_case() -> None:
    """Both paths on a small case with h0, lengths and the backward (also tests/test_cuda.py's)."""
    import nnrnn_fused

    torch.manual_seed(0)
    for fallback in ("0", "1"):
        os.environ["NNRNN_CUDA_FORCE_FALLBACK"] = fallback
        T, B, N = 4, 3, 40
        x = torch.randn(T, B, N, device="cuda", requires_grad=True)
        W = (0.3 * torch.randn(N, N, device="cuda")).requires_grad_()
        b = torch.zeros(N, device="cuda", requires_grad=True)
        h0 = torch.randn(B, N, device="cuda", requires_grad=True)
        out, h_n = nnrnn_fused.fused_nnrnn(x, W, b, h0, lengths=torch.tensor([4, 0, 2]))
        (out.sum() + h_n.sum()).backward()
    torch.cuda.synchronize()
    print("sanitizer case done", flush=True)


def ncu_case() -> None:
    """One forward launch of the compass case N=512 B=32 (float32, T=100) for Nsight Compute."""
    import nnrnn_fused

    x = torch.randn(100, 32, 512, device="cuda")
    W = 0.03 * torch.randn(512, 512, device="cuda")
    print("path:", nnrnn_fused.cuda_path(512, 32), flush=True)
    nnrnn_fused.fused_nnrnn(x, W)
    torch.cuda.synchronize()
    print("ncu case done", flush=True)


COMMANDS = {"env": phase_env, "build": phase_build, "smoke": phase_smoke, "timings": phase_timings,
            "exchange": phase_exchange, "barrier": phase_barrier, "breakdown": phase_breakdown, "sanitizer-case": sanitizer_case,
            "ncu-case": ncu_case}

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "smoke-path":
        sys.exit(smoke_path(sys.argv[2]))
    if len(sys.argv) != 2 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    COMMANDS[sys.argv[1]]()
