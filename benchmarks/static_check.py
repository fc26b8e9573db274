"""Static evidence for the CUDA kernels, without a GPU (docs/cuda.md, "Static evidence").

Compiles benchmarks/static_check.cu (the persistent kernels of csrc/cuda/global_kernels.cuh,
no torch) with nvcc -cubin for sm_90, then reads
  - ptxas's report: registers, stack frame and spills of every kernel;
  - the SASS (cuobjdump): in each kernel's inner loop (the innermost loop with the
    most FMAs; for the tensor-core kernels, the loop around the MMAs) shared-memory
    loads per FMA (per MMA); in its step loop (the outermost loop around it) the
    barrier, fence, mbarrier and L1-invalidate instructions;
and prints the cost model's predictions for the compass cases (nnrnn_fused.model_plan,
when the extension is built).

Fails (exit status 1) on any spill; on a kernel v2 inner loop with more than
MAX_SHARED_LOADS_PER_FMA shared loads per FMA, or other than a pair of rows with at most
the other instructions the cost model counts (kV2PairOverhead in kernels_v2.h); on a v2
finish whose sum of partial sums has more instructions per k-chunk than the model counts
(kV2FinishPerChunkFloat, kV2FinishPerChunkDouble); or on a tensor-core inner loop without exactly KT MMA instructions,
with more than MAX_SHARED_LOADS_PER_MMA shared loads per MMA, or with local memory in its
step loop. Run from the repository root:

    python -m benchmarks.static_check [--out benchmarks/results/static_check]

writes <out>.md and <out>.json (the committed copy: benchmarks/results/). CI runs it
through tests/test_static_check.py.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "benchmarks", "static_check.cu")
ARCH = "sm_90"
MAX_SHARED_LOADS_PER_FMA = 0.5  # kernel v2's bound (issue 11); v1 is reported, not bounded
# (N, B, dtype) of the performance targets (PERF.md, issue 11) and the compass cases
COMPASS = [(128, 10, "float32"), (256, 1, "float32"), (512, 32, "float32"), (1024, 128, "float32"),
           (512, 100, "float32"), (768, 16, "float32"), (128, 10, "float64"), (512, 32, "float64"),
           (768, 16, "float16")]
TARGETS = {(512, 32): (1.0, 2.5), (128, 10): (0.5, 1.2), (256, 1): (0.5, 1.2), (1024, 128): (8.0, 20.0)}
# The tensor-core path (issue 12): (N, B, dtype, TF32 allowed, target forward / forward+backward on an H100)
TC_COMPASS = [(768, 16, "float16", False, (0.5, 1.0)), (1024, 128, "bfloat16", False, (1.5, 4.0)),
              (512, 32, "bfloat16", False, (0.6, 1.5)), (128, 10, "bfloat16", False, None),
              (512, 100, "bfloat16", False, None), (1024, 128, "float32", True, None), (768, 16, "float32", True, None)]
MAX_SHARED_LOADS_PER_MMA = 2  # the tensor-core path: one 4-byte load per B-fragment register


def v2_constant(name: str) -> float:
    """A constant of csrc/cuda/kernels_v2.h that the cost model takes from the SASS: kV2PairOverhead (the
    instructions per pair of rows in kernel v2's inner loop besides FMAs and shared loads) or
    kV2FinishPerChunkFloat / kV2FinishPerChunkDouble (per k-chunk in the finish's sum of partial sums,
    v2_finish_per_chunk). A kernel with more fails."""
    with open(os.path.join(ROOT, "csrc", "cuda", "kernels_v2.h")) as f:
        return float(re.search(rf"constexpr \w+ {name} = ([\d.]+);", f.read()).group(1))


def v2_finish_per_chunk(dtype: str) -> float:
    """The instructions per k-chunk that the cost model counts in the finish of a kernel v2 of `dtype`."""
    return v2_constant({"float32": "kV2FinishPerChunkFloat", "float64": "kV2FinishPerChunkDouble"}[dtype])


# FMAs per row of a thread's register tile of W in kernel v2 (DeviceTileShape: KT x CT =
# 32 x 2 float32, 16 x 2 float64): the inner loop's FMAs over this are the rows it multiplies.
V2_FMA_PER_ROW = {"float32": 64, "float64": 32}

# Instructions counted in a step loop: block/cluster barriers, fences, mbarrier
# operations, L1 invalidation (what an acquire costs), atomics.
SYNC_OPCODES = ("BAR", "MEMBAR", "FENCE", "ERRBAR", "CGAERRBAR", "UCGABAR_ARV", "UCGABAR_WAIT", "SYNCS", "CCTL",
                "ATOM", "ATOMG", "RED", "REDG")


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    for candidate in (os.path.join(home, "bin", "nvcc"), shutil.which("nvcc")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def find_cuobjdump() -> str | None:
    """The CUDA toolkit's, or the one that ships inside the triton package."""
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidates = [os.path.join(home, "bin", "cuobjdump"), shutil.which("cuobjdump")]
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    candidates += glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages", "triton", "backends",
                                         "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.path.exists(c)), None)


def kernel_label(mangled: str) -> str:
    """'v2 forward float32 cluster' (or 'tc forward bfloat16 cluster KT16') from the mangled name of a
    kernel of static_check.cu."""
    dtype = "float64" if re.search(r"V2Idd|Idd", mangled) else "float32"
    direction = "backward" if "Backward" in mangled else "forward"
    exchanges = {"0": "block", "1": "cluster", "2": "grid"}
    if "tc_kernel" in mangled:
        m = re.search(r"MmaKindE(\d)ELi(\d+)E", mangled)
        kind = {"0": "float16", "1": "bfloat16", "2": "tf32"}[m.group(1)]
        exchange = exchanges[re.search(r"ExchangeE(\d)E", mangled).group(1)]
        return f"tc {direction} {kind} {exchange} KT{m.group(2)}"
    if "team_kernel" in mangled:
        exchange = {"0": "block", "1": "cluster", "2": "grid"}[re.search(r"ExchangeE(\d)E", mangled).group(1)]
        return f"v2 {direction} {dtype} {exchange}"
    return f"v1 {direction} {dtype}"


def compile_cubin(nvcc: str, workdir: str) -> tuple[str, str]:
    cubin = os.path.join(workdir, "kernels.cubin")
    cmd = [nvcc, "-std=c++17", "-O3", f"-arch={ARCH}", "-cubin", "-Xptxas", "-v", "-o", cubin, SOURCE]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return cubin, proc.stderr + proc.stdout


def read_ptxas_report(report: str) -> list[dict]:
    """ptxas -v's report, per kernel and arch in report order: mangled kernel name, arch, stack frame,
    spill stores and loads, registers. (The GPU check's build phase reads its report with this too.)"""
    rows, current = [], None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(\w+)'", line)
        if m:
            current = {"kernel": m.group(1), "arch": m.group(2)}
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current is not None:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            current["registers"] = int(m.group(1))
            rows.append(current)
            current = None
    return rows


def parse_ptxas(report: str) -> dict[str, dict]:
    """Per mangled kernel name (one arch is compiled here): registers, stack frame, spill stores and loads."""
    return {row["kernel"]: {k: v for k, v in row.items() if k not in ("kernel", "arch")}
            for row in read_ptxas_report(report)}


def sass_functions(cuobjdump: str, cubin: str) -> dict[str, list[tuple[int, str]]]:
    """Per mangled kernel name: its instructions as (address, text)."""
    out = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    functions: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in out.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = functions.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m and current is not None:
            current.append((int(m.group(1), 16), m.group(2).strip()))
    return functions


def opcode(text: str) -> str:
    """'LDS.128' from '@!P0 LDS.128 R4, [R2]'."""
    parts = text.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def loops(instructions: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(start, end) address ranges of loops: backward branches."""
    found = []
    for address, text in instructions:
        m = re.match(r"(?:@!?U?P\w+\s+)?BRA\s+(?:`\(\S+\)\s*)?0x([0-9a-f]+)", text)
        if m and opcode(text) == "BRA":
            target = int(m.group(1), 16)
            if target <= address:
                found.append((target, address))
    return found


def count(instructions, start, end, predicate) -> int:
    return sum(1 for address, text in instructions if start <= address <= end and predicate(opcode(text)))


def is_fma(op: str) -> bool:
    return op.startswith(("FFMA", "DFMA"))


def is_add(op: str) -> bool:
    return op in ("FADD", "DADD")


def is_shared_load(op: str) -> bool:
    return op.startswith(("LDS", "LDSM"))


def is_mma(op: str) -> bool:
    return op.startswith(("HMMA", "HGMMA"))


def analyse_mma(instructions) -> dict:
    """The tensor-core kernels: the inner loop is the loop around the MMAs (one n-tile
    of a warp: KT instructions, fully unrolled); its MMAs and shared loads, and the
    synchronisation in the step loop around it."""
    all_loops = loops(instructions)
    with_mma = [(s, e) for s, e in all_loops if count(instructions, s, e, is_mma) > 0]
    if not with_mma:
        return {"inner_mma": 0}
    innermost = [(s, e) for s, e in with_mma
                 if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in with_mma)]
    inner = max(innermost, key=lambda r: count(instructions, r[0], r[1], is_mma))
    mmas = count(instructions, *inner, is_mma)
    loads = count(instructions, *inner, is_shared_load)
    around = [(s, e) for s, e in all_loops if s <= inner[0] and inner[1] <= e]
    step = min(around, key=lambda r: r[0]) if around else inner
    sync = {}
    for address, text in instructions:
        op = opcode(text)
        if step[0] <= address <= step[1] and not (inner[0] <= address <= inner[1]) and op.startswith(SYNC_OPCODES):
            sync[op] = sync.get(op, 0) + 1
    mma_ops = sorted({opcode(t) for a, t in instructions if inner[0] <= a <= inner[1] and is_mma(opcode(t))})
    return {"inner_loop": [hex(inner[0]), hex(inner[1])], "inner_mma": mmas, "mma_instruction": ", ".join(mma_ops),
            "inner_shared_loads": loads, "shared_loads_per_mma": round(loads / mmas, 4),
            "local_memory": count(instructions, *step, lambda op: op.startswith(("LDL", "STL"))),
            "step_loop": [hex(step[0]), hex(step[1])], "step_sync_instructions": dict(sorted(sync.items()))}


def analyse(instructions) -> dict:
    all_loops = loops(instructions)
    with_fma = [(s, e) for s, e in all_loops if count(instructions, s, e, is_fma) > 0]
    if not with_fma:
        return {}
    # the inner loop: the densest in FMAs among the loops that contain no other loop with FMAs
    # (v1's pointwise finish, with tanh's FMAs, is a longer loop than its dot product)
    innermost = [(s, e) for s, e in with_fma
                 if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in with_fma)]
    inner = max(innermost, key=lambda r: count(instructions, r[0], r[1], is_fma) /
                count(instructions, r[0], r[1], lambda op: True))
    fmas = count(instructions, *inner, is_fma)
    loads = count(instructions, *inner, is_shared_load)
    wide = count(instructions, *inner, lambda op: op == "LDS.128")
    # the step loop: the outermost loop around the inner one
    around = [(s, e) for s, e in all_loops if s <= inner[0] and inner[1] <= e]
    step = min(around, key=lambda r: r[0]) if around else inner
    sync = {}
    for address, text in instructions:
        op = opcode(text)
        if step[0] <= address <= step[1] and not (inner[0] <= address <= inner[1]):
            if op.startswith(SYNC_OPCODES):
                key = op.split(".")[0] if op.startswith(("ATOM", "RED")) else op
                sync[key] = sync.get(key, 0) + 1
    other = count(instructions, *inner, lambda op: True) - fmas - loads
    # the finish's sum of partial sums: the loop in the step loop with the most adds, shared
    # loads and no FMA; its instructions per add are those per k-chunk
    adds = [(s, e) for s, e in all_loops if step[0] <= s and e <= step[1] and count(instructions, s, e, is_fma) == 0
            and count(instructions, s, e, is_shared_load) > 0 and count(instructions, s, e, is_add) > 0]
    finish = max(adds, key=lambda r: count(instructions, r[0], r[1], is_add), default=None)
    per_chunk = (round(count(instructions, *finish, lambda op: True) /
                       count(instructions, *finish, is_add), 6) if finish else None)
    return {"inner_loop": [hex(inner[0]), hex(inner[1])], "inner_fma": fmas, "inner_shared_loads": loads,
            "inner_lds128": wide, "shared_loads_per_fma": round(loads / fmas, 4), "inner_other": other,
            "finish_per_chunk": per_chunk,
            "step_loop": [hex(step[0]), hex(step[1])], "step_sync_instructions": dict(sorted(sync.items()))}


def model_predictions() -> list[dict] | str:
    try:
        import torch

        import nnrnn_fused  # noqa: F401  (loads the extension)
        from nnrnn_fused import _extension
        if not _extension.LOADED:
            return f"the extension is not loaded: {_extension.LOAD_ERROR}"
    except Exception as e:  # noqa: BLE001  (any import failure: say so and go on)
        return f"nnrnn_fused does not import: {e}"
    rows = []
    for N, B, dtype, tf32, target in TC_COMPASS:
        for kernel in ("auto", "v1"):
            text, v = torch.ops.nnrnn_fused.model_plan(N, B, getattr(torch, dtype), kernel, allow_tf32=tf32)
            rows.append({"N": N, "B": B, "dtype": dtype + (" (TF32 allowed)" if tf32 else ""), "kernel": kernel,
                         "plan": text, "forward_us": round(v[6], 2), "backward_us": round(v[7], 2),
                         "forward_backward_us": round(v[6] + v[7], 2), "target": target if kernel == "auto" else None})
    for N, B, dtype in COMPASS:
        for kernel in ("auto", "v1"):
            text, v = torch.ops.nnrnn_fused.model_plan(N, B, getattr(torch, dtype), kernel)
            rows.append({"N": N, "B": B, "dtype": dtype, "kernel": kernel, "plan": text,
                         "forward_us": round(v[6], 2), "backward_us": round(v[7], 2),
                         "forward_backward_us": round(v[6] + v[7], 2), "target": TARGETS.get((N, B))
                         if dtype == "float32" else None})
    return rows


def run(out: str | None) -> int:
    nvcc, cuobjdump = find_nvcc(), find_cuobjdump()
    if nvcc is None or cuobjdump is None:
        print(f"static check skipped: nvcc {nvcc!r}, cuobjdump {cuobjdump!r} (need both)")
        return 2
    with tempfile.TemporaryDirectory() as workdir:
        cubin, report = compile_cubin(nvcc, workdir)
        ptxas = parse_ptxas(report)
        sass = sass_functions(cuobjdump, cubin)
    nvcc_version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    kernels, failures = [], []
    overhead = v2_constant("kV2PairOverhead")
    per_chunk = {dtype: v2_finish_per_chunk(dtype) for dtype in V2_FMA_PER_ROW}
    for mangled, info in sorted(ptxas.items(), key=lambda kv: kernel_label(kv[0])):
        label = kernel_label(mangled)
        tc = label.startswith("tc")
        entry = {"kernel": label, **info, **(analyse_mma if tc else analyse)(sass.get(mangled, []))}
        kernels.append(entry)
        if info.get("spill_stores", 0) or info.get("spill_loads", 0):
            failures.append(f"{label}: spills ({info['spill_stores']} bytes stored, {info['spill_loads']} loaded)")
        if tc:
            kt = int(label.rsplit("KT", 1)[1])
            if entry["inner_mma"] != kt:  # one n-tile of a warp: KT instructions, none outside the unrolled loop
                failures.append(f"{label}: {entry['inner_mma']} MMA instructions in the inner loop, expected KT = {kt}")
            elif entry["shared_loads_per_mma"] > MAX_SHARED_LOADS_PER_MMA or entry["local_memory"]:
                failures.append(f"{label}: {entry['shared_loads_per_mma']} shared loads per MMA, "
                                f"{entry['local_memory']} local-memory accesses in the step loop")
            continue
        if not label.startswith("v2"):
            continue
        ratio, other = entry.get("shared_loads_per_fma"), entry.get("inner_other")
        entry["inner_rows"] = entry.get("inner_fma", 0) / V2_FMA_PER_ROW[label.split()[2]]
        if ratio is None or ratio > MAX_SHARED_LOADS_PER_FMA:
            failures.append(f"{label}: {ratio} shared loads per FMA in the inner loop (bound {MAX_SHARED_LOADS_PER_FMA})")
        elif entry["inner_rows"] != 2 or other > overhead:
            failures.append(f"{label}: an inner loop of {entry['inner_rows']} rows with {other} instructions besides "
                            f"FMAs and shared loads; the cost model counts pairs of rows with {overhead} "
                            "(kV2PairOverhead)")
        elif entry.get("finish_per_chunk") is None or entry["finish_per_chunk"] > per_chunk[label.split()[2]]:
            failures.append(f"{label}: {entry.get('finish_per_chunk')} instructions per k-chunk in the finish's sum; "
                            f"the cost model counts {per_chunk[label.split()[2]]} (kV2FinishPerChunk*)")
    model = model_predictions()
    result = {"arch": ARCH, "nvcc": nvcc_version, "bound_shared_loads_per_fma": MAX_SHARED_LOADS_PER_FMA,
              "bound_shared_loads_per_mma": MAX_SHARED_LOADS_PER_MMA, "v2_pair_overhead": overhead,
              "v2_finish_per_chunk": per_chunk,
              "kernels": kernels, "model": model, "failures": failures, "passed": not failures}
    text = report_markdown(result)
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(out + ".md", "w") as f:
            f.write(text)
    return 0 if result["passed"] else 1


def rows_other(k: dict) -> str:
    """'rows, other instructions' of a v2 inner loop; v1's other instructions alone."""
    return (f"{k['inner_rows']:g}, " if "inner_rows" in k else "") + str(k.get("inner_other"))


def report_markdown(r: dict) -> str:
    lines = [f"# Static check of the CUDA kernels ({r['arch']}, {r['nvcc']})", "",
             "Generated by `python -m benchmarks.static_check` (no GPU: ptxas report and SASS of "
             "benchmarks/static_check.cu; the model's predictions). Static instruction counts; "
             "docs/cuda.md explains each column.", "",
             "| kernel | registers | stack / spills (B) | inner loop: FMA | shared loads (LDS.128) | loads per FMA "
             "| rows, other instructions | finish: per k-chunk | step loop: barriers, fences, mbarrier ops |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k in r["kernels"]:
        if k["kernel"].startswith("tc"):
            continue
        sync = ", ".join(f"{n} {op}" for op, n in k.get("step_sync_instructions", {}).items())
        lines.append(f"| {k['kernel']} | {k.get('registers')} | {k.get('stack')} / {k.get('spill_stores')}+"
                     f"{k.get('spill_loads')} | {k.get('inner_fma')} | {k.get('inner_shared_loads')} "
                     f"({k.get('inner_lds128')}) | {k.get('shared_loads_per_fma')} | {rows_other(k)} | {k.get('finish_per_chunk')} | {sync} |")
    lines += ["", "Tensor-core kernels (docs/tensor_cores.md): the inner loop is one warp's n-tile (8 batch rows), "
              "KT MMA instructions; a step runs it ceil(rows / 8) times per warp.", "",
              "| kernel | registers | stack / spills (B) | inner loop: MMA | instruction | shared loads | loads per MMA "
              "| local memory in the step loop | step loop: barriers, fences, mbarrier ops |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k in r["kernels"]:
        if not k["kernel"].startswith("tc"):
            continue
        sync = ", ".join(f"{n} {op}" for op, n in k.get("step_sync_instructions", {}).items())
        lines.append(f"| {k['kernel']} | {k.get('registers')} | {k.get('stack')} / {k.get('spill_stores')}+"
                     f"{k.get('spill_loads')} | {k.get('inner_mma')} | {k.get('mma_instruction')} | "
                     f"{k.get('inner_shared_loads')} | {k.get('shared_loads_per_mma')} | {k.get('local_memory')} | "
                     f"{sync} |")
    lines += ["", f"Bounds: at most {r['bound_shared_loads_per_fma']} shared loads per FMA in a v2 inner loop, and "
              f"a pair of rows with at most {r['v2_pair_overhead']:g} other instructions and at most "
              + " / ".join(f"{v:g} ({dtype})" for dtype, v in r["v2_finish_per_chunk"].items())
              + " per k-chunk in the finish (what the cost model counts); "
              f"KT MMA instructions and at most {r['bound_shared_loads_per_mma']} shared loads per MMA in a tensor-core "
              "inner loop, no local memory in its step loop; no spills. "
              + ("PASSED" if r["passed"] else "FAILED: " + "; ".join(r["failures"])), ""]
    lines += ["## The cost model's predictions (csrc/cuda/plan.h, tc_plan.h; H100 SXM constants), µs per step", ""]
    if isinstance(r["model"], str):
        lines.append(f"Not available: {r['model']}")
    else:
        lines += ["| N | B | dtype | kernel | forward | backward | fwd+bwd | target fwd / fwd+bwd | plan |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for m in r["model"]:
            target = f"{m['target'][0]} / {m['target'][1]}" if m["target"] else ""
            lines.append(f"| {m['N']} | {m['B']} | {m['dtype']} | {m['kernel']} | {m['forward_us']} | "
                         f"{m['backward_us']} | {m['forward_backward_us']} | {target} | {m['plan']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write <out>.md and <out>.json")
    args = parser.parse_args(argv)
    return run(args.out)


if __name__ == "__main__":
    sys.exit(main())
