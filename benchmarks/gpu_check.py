"""Bookkeeping of benchmarks/gpu_check.sh: the phases, their caps, the JSON lines, the verdicts
and the summary. No torch here: these calls are quick and cannot hang on a broken GPU.

    python -m benchmarks.gpu_check start PHASE                 record the start; print the cap in
                                                               seconds (0: not run, and why is recorded)
    python -m benchmarks.gpu_check end PHASE RC SECONDS CAP    record the end and the verdict; print it
    python -m benchmarks.gpu_check fallback-needed             exit 0 if the smoke phase calls for the
                                                               fallback in the remaining phases (recorded)
    python -m benchmarks.gpu_check which TOOL                  path of compute-sanitizer, ncu, ... or ""
    python -m benchmarks.gpu_check report OUT_DIR              summary.md from results.jsonl, printed
                                                               (the phase table last); exit 1 if a phase FAILED

The script exports GPU_CHECK_RESULTS (results.jsonl), GPU_CHECK_LOG (log.txt) and GPU_CHECK_DEADLINE
(epoch seconds). Every result is one JSON line {"t", "phase", "kind", ...}, appended and closed at
once, so whatever was measured before a kill survives. Verdicts (docs/cuda.md, "The GPU check"):
PASSED, FAILED, NOT RUN, NOT VERIFIED.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

PASSED, FAILED, NOT_RUN, NOT_VERIFIED = "PASSED", "FAILED", "NOT RUN", "NOT VERIFIED"
REPORT_RESERVE_S = 10  # kept before the deadline for the summary
MIN_CAP_S = 5  # a phase that would get less is not started
TIMED_OUT = (124, 137)  # timeout(1): the cap expired (137: it took SIGKILL after -k)
INTERRUPTED = (130, 143)  # SIGINT, SIGTERM: the script was stopped
BOOKKEEPING = ("start", "end", "verdict")  # line kinds that are not results


@dataclass(frozen=True)
class Phase:
    name: str
    title: str
    cap_s: int | None  # per run; None: whatever is left before the deadline
    runs: int = 1  # separate capped runs (the sanitizer's three tools)
    needs: tuple = ()  # "gpu", "extension", "tool:<name>", "module:<name>"


# In order of value: what a short window must not miss comes first. The caps add up to the budget
# in docs/cuda.md (8 minutes on an H100); GPU_CHECK_<NAME>_S overrides one (per run).
PHASES = [
    Phase("env", "Environment", 20),
    Phase("build", "Build or load", 110),
    Phase("smoke", "Smoke: fwd+bwd vs float64", 40, needs=("extension",)),
    Phase("timings", "Target timings", 75, needs=("extension",)),
    Phase("exchange", "Exchange microbenchmark", 25, needs=("extension",)),
    Phase("barrier", "Barrier microbenchmark", 10, needs=("extension",)),
    Phase("breakdown", "Profiler breakdown", 15, needs=("extension",)),
    Phase("tests", "GPU tests", 75),
    Phase("sanitizer", "compute-sanitizer", 25, runs=3, needs=("gpu", "extension", "tool:compute-sanitizer")),
    Phase("ncu", "Nsight Compute", 25, needs=("gpu", "extension", "tool:ncu")),
    Phase("suites", "Benchmark suites", None, needs=("extension", "module:pytest_benchmark")),
]
PHASE = {p.name: p for p in PHASES}
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")


def phase_of(step: str) -> Phase:
    """A step is a phase ("smoke") or one run of it ("sanitizer:memcheck")."""
    return PHASE[step.split(":")[0]]


def planned_cap(phase: Phase) -> int | None:
    value = os.environ.get(f"GPU_CHECK_{phase.name.upper()}_S")
    return int(value) if value else phase.cap_s


# ---------------------------------------------------------------- recording


def results_path() -> str:
    return os.environ.get("GPU_CHECK_RESULTS", "results.jsonl")


def record(phase: str, kind: str, **fields) -> dict:
    """Append one result line and close the file (it survives any later kill). With
    GPU_CHECK_HANG naming the phase, hang after its first result: the dry-run test's forced hang."""
    line = {"t": round(time.time(), 3), "phase": phase, "kind": kind, **fields}
    hang = kind not in BOOKKEEPING and phase in os.environ.get("GPU_CHECK_HANG", "").split() and not any(
        r["kind"] not in BOOKKEEPING for r in since_start(read_results(), phase))
    with open(results_path(), "a") as f:
        f.write(json.dumps(line, default=str) + "\n")
    if hang:
        print(f"{phase}: hanging on purpose (GPU_CHECK_HANG)", flush=True)
        time.sleep(10**6)
    return line


def read_results(path: str | None = None) -> list[dict]:
    lines = []
    try:
        with open(path or results_path()) as f:
            for text in f:
                try:
                    lines.append(json.loads(text))
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
    except FileNotFoundError:
        pass
    return lines


def since_start(lines: list[dict], step: str) -> list[dict]:
    """The lines of a step's last run (from its last start line on)."""
    starts = [i for i, line in enumerate(lines) if line["phase"] == step and line["kind"] == "start"]
    begin = starts[-1] if starts else 0
    return [line for line in lines[begin:] if line["phase"] == step]


def last(lines: list[dict], phase: str, kind: str) -> dict | None:
    found = [line for line in lines if line["phase"] == phase and line["kind"] == kind]
    return found[-1] if found else None


def find_tool(name: str) -> str:
    """A CUDA tool on PATH or in the toolkit (CUDA_HOME, /usr/local/cuda, Nsight Compute's folder)."""
    found = shutil.which(name)
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    candidates = [os.path.join(h, "bin", name) for h in homes if h]
    candidates += sorted(glob.glob(f"/opt/nvidia/nsight-compute/*/{name}"), reverse=True)
    return next((c for c in candidates if os.access(c, os.X_OK)), "")


def source_hash(root: str = ".") -> str:
    """sha256 of csrc/, nnrnn_fused/*.py and setup.py: names the code where the tree has no .git."""
    files = sorted(glob.glob(os.path.join(root, "csrc", "**", "*.*"), recursive=True)
                   + glob.glob(os.path.join(root, "nnrnn_fused", "**", "*.py"), recursive=True)
                   + [os.path.join(root, "setup.py")])
    h = hashlib.sha256()
    for path in files:
        if os.path.basename(path) == "_build_info.py" or not os.path.isfile(path):
            continue
        h.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


# ---------------------------------------------------------------- start and end of a phase


def unmet_need(phase: Phase, lines: list[dict]) -> str | None:
    """Why the phase cannot run, from what earlier phases recorded; None: run it (also when unknown)."""
    device, extension = last(lines, "env", "device"), last(lines, "build", "extension")
    for need in phase.needs:
        if need == "gpu" and device is not None and not device.get("gpu"):
            return "no GPU visible"
        if need == "extension" and extension is not None and not extension.get("extension_loaded"):
            return f"the extension did not load ({extension.get('load_error')})"
        if need.startswith("tool:") and not find_tool(need[5:]):
            return f"{need[5:]} not found (PATH, CUDA_HOME/bin)"
        if need.startswith("module:"):
            import importlib.util

            if importlib.util.find_spec(need[7:]) is None:
                return f"Python module {need[7:]} not installed"
    return None


def start(step: str) -> int:
    """Record the start; return the cap (0: the step does not run, with the reason recorded)."""
    phase = phase_of(step)
    lines = read_results()
    planned = planned_cap(phase)
    left = int(float(os.environ.get("GPU_CHECK_DEADLINE", time.time() + 3600)) - time.time()) - REPORT_RESERVE_S
    cap = left if planned is None else min(planned, left)
    log = os.environ.get("GPU_CHECK_LOG", "")
    offset = os.path.getsize(log) if log and os.path.exists(log) else 0
    record(step, "start", planned_cap_s=planned, cap_s=cap, log_offset=offset)
    why = f"skipped (GPU_CHECK_{phase.name.upper()}_S=0)" if planned == 0 else unmet_need(phase, lines)
    if why is None and cap < MIN_CAP_S:
        why = f"no time left before the deadline ({max(left, 0)} s)"
    if why is not None:
        finish(step, NOT_RUN, why, rc=None, elapsed_s=0, cap_s=0)
        return 0
    return cap


def finish(step: str, verdict: str, detail: str, **fields) -> dict:
    line = record(step, "end", verdict=verdict, detail=detail, **fields)
    print(f"== {step}: {verdict}" + (f" ({detail})" if detail else ""), file=sys.stderr, flush=True)
    return line


def log_since(offset: int) -> str:
    log = os.environ.get("GPU_CHECK_LOG", "")
    if not log or not os.path.exists(log):
        return ""
    with open(log, errors="replace") as f:
        f.seek(offset)
        return f.read()


def dry_run(lines: list[dict]) -> bool:
    device = last(lines, "env", "device")
    return device is not None and not device.get("gpu")


def end(step: str, rc: int, elapsed_s: int, cap_s: int) -> dict:
    """Record the step's verdict: a timeout or signal first, then the step's judge, then what the
    step itself recorded as its verdict."""
    lines = read_results()
    mine = since_start(lines, step)
    began = mine[0] if mine and mine[0]["kind"] == "start" else {}
    results = [line for line in mine if line["kind"] not in BOOKKEEPING]
    kept = f"{len(results)} result line(s) kept"
    fields = dict(rc=rc, elapsed_s=elapsed_s, cap_s=cap_s)
    planned = began.get("planned_cap_s")
    judge = JUDGES.get(phase_of(step).name)
    judged = judge(step, rc, mine, lines) if judge is not None else None  # also records what the tool left
    if judged is not None:
        kept += f"; {judged[1]}"
    if rc in TIMED_OUT:
        if planned is None or cap_s < planned:
            return finish(step, NOT_VERIFIED, f"cut by the deadline after {cap_s} s; {kept}", **fields)
        return finish(step, FAILED, f"killed at its cap of {cap_s} s (a hang, or slower than planned); {kept}",
                      **fields)
    if rc in INTERRUPTED:
        return finish(step, NOT_VERIFIED, f"interrupted by a signal after {elapsed_s} s; {kept}", **fields)
    if judged is not None:
        return finish(step, *judged, **fields)
    own = [line for line in mine if line["kind"] == "verdict"]
    if own and (rc == 0 or own[-1]["verdict"] != PASSED):
        return finish(step, own[-1]["verdict"], own[-1].get("detail", ""), **fields)
    return finish(step, FAILED, f"exit {rc} without a verdict (see log.txt); {kept}", **fields)


def fallback_needed() -> bool:
    """After a smoke phase in which a persistent path hung or lost the CUDA context: force the
    fallback for the remaining phases (recorded)."""
    lines = read_results()
    smoke = since_start(lines, "smoke")
    ended = [line for line in smoke if line["kind"] == "end"]
    why = None
    if ended and ended[-1].get("rc") in TIMED_OUT:
        why = "the smoke phase hung"
    for line in smoke:
        if line["kind"] == "path" and line.get("fatal") and "NNRNN_CUDA_FORCE_FALLBACK" not in line.get("env", {}):
            why = f"path {line['path']}: {line.get('detail', 'hung or lost the CUDA context')}"
    if why is None:
        return False
    record("smoke", "note", text=f"NNRNN_CUDA_FORCE_FALLBACK=1 for the remaining phases: {why}")
    return True


# ---------------------------------------------------------------- judges of tool phases


def pytest_counts(xml_path: str, log: str) -> dict:
    """Test counts from the JUnit XML, or from pytest -v's lines when the XML is missing (killed)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failed_tests": [], "source": "log"}
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        root = None
    if root is not None:
        counts["source"] = "junit xml"
        for case in root.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                counts["failed"] += 1
                counts["failed_tests"].append(name)
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
        return counts
    for name, outcome in re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", log, re.M):
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "failed"}.get(outcome, "skipped")
        counts[key] += 1
        if key == "failed":
            counts["failed_tests"].append(name)
    return counts


def judge_tests(step, rc, mine, lines):
    out_dir = os.path.dirname(os.path.abspath(results_path()))
    log = log_since(mine[0].get("log_offset", 0)) if mine else ""
    c = pytest_counts(os.path.join(out_dir, "tests.xml"), log)
    c["failed_tests"] = c["failed_tests"][:50]
    record(step, "counts", **c)
    summary = f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped (from the {c['source']})"
    if c["failed"] or rc not in (0, 5):
        return FAILED, summary + (f"; pytest exit {rc}" if rc not in (0, 1) else "")
    if c["passed"] == 0:
        why = "no GPU" if dry_run(lines) else "see log.txt for the skip reasons"
        return NOT_VERIFIED, f"nothing ran: {summary}; {why}"
    return PASSED, summary


def judge_sanitizer(step, rc, mine, lines):
    log = log_since(mine[0].get("log_offset", 0)) if mine else ""
    summary = re.findall(r"(ERROR SUMMARY: .*|RACECHECK SUMMARY: .*)", log)
    done = "sanitizer case done" in log
    record(step, "summary", rc=rc, summary=summary[-1:] or None, case_done=done)
    if rc == 99:
        errors = [line.strip("= ").strip() for line in log.splitlines() if re.search(r"Invalid|Race|hazard|Barrier", line)]
        return FAILED, f"{summary[-1] if summary else 'errors found'}: " + "; ".join(errors[:3])
    clean = summary and re.search(r"\b0 (errors|hazards)", summary[-1])
    if rc == 0 and done and clean:
        return PASSED, summary[-1]
    tail = [line for line in log.strip().splitlines() if line.strip()][-2:]
    return NOT_VERIFIED, f"the tool did not complete a clean run (exit {rc}): " + " | ".join(tail)[:300]


def ncu_metrics(text: str) -> dict:
    """{section: {metric: "value unit"}} from Nsight Compute's text report."""
    sections, current = {}, None
    for line in text.splitlines():
        m = re.match(r"\s+Section: (.+?)\s*$", line)
        if m:
            current = sections.setdefault(m.group(1), {})
            continue
        m = re.match(r"\s{4}(\S.*?)\s{2,}(\S+)\s+([-\d.,]+)\s*$", line)
        if m and current is not None and m.group(1) != "Metric Name":
            current[m.group(1)] = f"{m.group(3)} {m.group(2)}"
    return sections


def judge_ncu(step, rc, mine, lines):
    path = os.path.join(os.path.dirname(os.path.abspath(results_path())), "ncu.txt")
    text = open(path, errors="replace").read() if os.path.exists(path) else log_since(mine[0].get("log_offset", 0))
    sections = ncu_metrics(text)
    if sections:
        record(step, "metrics", sections=sections)
    if rc == 0 and sections:
        return PASSED, f"{len(sections)} section(s) of one forward launch in ncu.txt"
    tail = [line for line in text.strip().splitlines() if line.strip()][-2:]
    return NOT_VERIFIED, f"no profile (exit {rc}): " + " | ".join(tail)[:300]


def judge_suites(step, rc, mine, lines):
    cases = [line for line in mine if line["kind"] == "case"]
    if rc == 5:
        return NOT_RUN, "no benchmark case selected (no CUDA cases without a GPU)"
    if rc == 4:
        return NOT_RUN, "pytest usage error (pytest-benchmark missing?); see log.txt"
    if rc != 0:
        return FAILED, f"pytest exit {rc} after {len(cases)} case(s); see log.txt"
    if dry_run(lines):
        return NOT_VERIFIED, f"dry run on the CPU: {len(cases)} case(s)"
    return PASSED, f"{len(cases)} case(s)"


JUDGES = {"tests": judge_tests, "sanitizer": judge_sanitizer, "ncu": judge_ncu, "suites": judge_suites}


# ---------------------------------------------------------------- the summary


def combine(verdicts: list[str]) -> str:
    if FAILED in verdicts:
        return FAILED
    if verdicts and all(v == PASSED for v in verdicts):
        return PASSED
    if not verdicts or all(v == NOT_RUN for v in verdicts):
        return NOT_RUN
    return NOT_VERIFIED


def phase_verdicts(lines: list[dict]) -> list[dict]:
    """One row per phase: verdict, detail, seconds used, seconds planned."""
    rows = []
    for phase in PHASES:
        steps = [f"sanitizer:{t}" for t in SANITIZER_TOOLS] if phase.runs > 1 else [phase.name]
        ends = [last(lines, s, "end") for s in steps]
        started = [last(lines, s, "start") for s in steps]
        verdicts, details = [], []
        for s, e, b in zip(steps, ends, started):
            if e is not None:
                verdicts.append(e["verdict"])
                details.append(f"{s.split(':')[1]}: {e['verdict']}: {e['detail']}" if ":" in s else e["detail"])
            elif b is not None:
                verdicts.append(NOT_VERIFIED)
                details.append(f"{s}: started, never ended (the script was killed)")
        if not verdicts:
            verdicts, details = [NOT_RUN], ["not reached"]
        planned = planned_cap(phase)
        rows.append(dict(name=phase.name, title=phase.title, verdict=combine(verdicts), detail="; ".join(details),
                         used=sum(e.get("elapsed_s") or 0 for e in ends if e),
                         planned=None if planned is None else planned * phase.runs))
    return rows


def fmt(value, digits=2) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        out.append("| " + " | ".join(" ".join(fmt(c).replace("|", "/").split()) for c in r) + " |")
    return out


def section_env(lines):
    out = []
    dev = last(lines, "env", "device") or {}
    props = dev.get("properties") or {}
    clocks = last(lines, "env", "clocks")
    clusters = last(lines, "env", "clusters")
    if props:
        keys = ["multi_processor_count", "shared_memory_per_block_optin", "shared_memory_per_multiprocessor",
                "L2_cache_size", "total_memory", "regs_per_multiprocessor", "max_threads_per_multi_processor"]
        out += ["", "### Device", ""] + table(["property", "value"], [[k, props.get(k)] for k in keys if k in props])
    if clocks and clocks.get("fields"):
        out += ["", "Clocks and state (nvidia-smi): " + ", ".join(f"{k} {v}" for k, v in clocks["fields"].items())]
    if clusters and clusters.get("rows"):
        out += ["", "Max active clusters (cudaOccupancyMaxActiveClusters; threads per block, shared bytes per block):", ""]
        out += table(["cluster size", "threads", "shared bytes", "max active clusters", "error"],
                     [[r.get("cluster"), r.get("threads"), r.get("shared_bytes"), r.get("max_active_clusters"),
                       r.get("error", "")] for r in clusters["rows"]])
    return out


def section_build(lines):
    out = []
    ext = last(lines, "build", "extension")
    kernels = last(lines, "build", "kernels")
    if ext:
        out += ["", f"### Build: {ext.get('how')}; extension loaded: {ext.get('extension_loaded')}, CUDA kernels: "
                    f"{ext.get('cuda_kernels_compiled')}, built against torch {ext.get('built_against_torch')}"]
    if kernels and kernels.get("rows"):
        out += ["", f"Kernel resources ({kernels.get('source')}):", ""]
        out += table(["kernel", "arch", "registers", "stack", "spill stores", "spill loads", "local"],
                     [[r.get("kernel"), r.get("arch"), r.get("registers"), r.get("stack"), r.get("spill_stores"),
                       r.get("spill_loads"), r.get("local")] for r in kernels["rows"]])
    return out


def section_rows(lines, phase, kind, title, header, cells):
    rows = [line for line in lines if line["phase"] == phase and line["kind"] == kind]
    if not rows:
        return []
    return ["", f"### {title}", ""] + table(header, [cells(r) for r in rows])


def timing_cells(r):
    f, fb = r.get("fwd") or {}, r.get("fwdbwd") or {}
    return [r.get("case"), r.get("impl"), (r.get("path") or "")[:70], fmt(f.get("us_per_step")), fmt(f.get("fixed_ms"), 3),
            fmt(fb.get("us_per_step")), fmt(fb.get("fixed_ms"), 3),
            " / ".join(fmt(v) for v in r["model_us"]) if r.get("model_us") else "",
            fmt(r["peak_bytes"] / 2**20, 1) if r.get("peak_bytes") is not None else "", r.get("error", "")[:80]]


def section_suites(lines):
    cases = [line for line in lines if line["phase"] == "suites" and line["kind"] == "case"]
    if not cases:
        return []
    from benchmarks import report as bench_report

    speed, memory = bench_report.tables((c["extra_info"], c["median_s"]) for c in cases)
    out = ["", "### Benchmark suites (median µs per timestep; ratios within this run)", ""]
    if speed:
        out += [bench_report.speed_table(speed)]
    if memory:
        out += ["", bench_report.memory_table(memory)]
    return out


def short_commit(commit: str) -> str:
    return commit[:12] if re.fullmatch(r"[0-9a-f]{40}", commit) else commit


def report(out_dir: str) -> int:
    lines = read_results(os.path.join(out_dir, "results.jsonl"))
    versions = last(lines, "env", "versions") or {}
    source = last(lines, "env", "source") or {}
    dev = last(lines, "env", "device") or {}
    card = dev.get("name") or ("none (CPU machine: a dry run)" if dev else "unknown")
    out = [f"## GPU check: {card}", "",
           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(lines[0]['t'])) if lines else ''}; driver "
           f"{versions.get('driver', '?')}, torch {versions.get('torch', '?')} (CUDA {versions.get('torch_cuda', '?')}), "
           f"nvcc {versions.get('nvcc', '?')}, Python {versions.get('python', '?')}; commit "
           f"{short_commit(source.get('commit') or '?')}{' (dirty)' if source.get('dirty') else ''}, sources sha256 "
           f"{(source.get('source_sha256') or '?')[:12]}; watchdog {versions.get('watchdog_ms', '?')} ms"]
    out += [f"**{n['text']}**" for n in lines if n["kind"] == "note"]
    out += section_env(lines) + section_build(lines)
    out += section_rows(lines, "smoke", "case", "Smoke: forward and backward against the float64 reference "
                        "(relative error ‖got − ref‖ / ‖ref‖)",
                        ["path", "plan", "dtype", "T", "B", "N", "out err", "grad err", "bound fwd/grad", "ok"],
                        lambda r: [r.get("path"), (r.get("plan") or "")[:60], r.get("dtype"), r.get("T"), r.get("B"),
                                   r.get("N"), f"{r['out_err']:.1e}" if "out_err" in r else r.get("error", "")[:80],
                                   f"{r['grad_err']:.1e}" if "grad_err" in r else "",
                                   f"{r.get('fwd_bound')}/{r.get('grad_bound')}",
                                   r.get("ok")])
    out += section_rows(lines, "smoke", "path", "Smoke: paths that did not finish", ["path", "detail"],
                        lambda r: [r.get("path"), r.get("detail")])
    setting = last(lines, "timings", "settings") or {}
    tf32_except = " but in " + ", ".join(setting["tf32_cases"]) if setting.get("tf32_cases") else ""
    out += section_rows(lines, "timings", "row", f"Target timings ({setting.get('timer', '')}; per-step cost from "
                        f"T={setting.get('T')}; TF32 off on both sides{tf32_except})",
                        ["case", "impl", "path", "fwd µs/step", "fwd fixed ms", "fwd+bwd µs/step",
                         "fwd+bwd fixed ms", "model fwd / fwd+bwd", "peak MiB", "error"], timing_cells)
    out += section_rows(lines, "timings", "same", "Target timings: paths not run again (what runs was timed above)",
                        ["case", "impl", "path", "timed as"],
                        lambda r: [r.get("case"), r.get("impl"), (r.get("path") or "")[:70], r.get("same_as")])
    out += section_rows(lines, "exchange", "row", "Exchange: forward µs/step, one team, the layout forced "
                        "(NNRNN_CUDA_TEAMS); above block: the exchange's latency and publishing",
                        ["kernel", "dtype", "N", "B", "teams", "fwd µs/step", "model fwd", "above block (series: B=1), µs",
                         "fixed ms", "path", "error"],
                        lambda r: [r.get("kernel"), r.get("dtype"), r.get("N"), r.get("B"), r.get("teams"),
                                   fmt(r.get("us_per_step")), fmt((r.get("model_us") or [None])[0]),
                                   fmt(r.get("above_base_us")), fmt(r.get("fixed_ms"), 3),
                                   (r.get("path") or "")[:60], r.get("error", "")[:80]])
    out += section_rows(lines, "barrier", "row", "Barrier: forward µs/step of a tiny N at chosen grids",
                        ["grid", "path", "N", "B", "fwd µs/step", "fixed ms", "step cost above grid 1, µs"],
                        lambda r: [r.get("grid"), (r.get("path") or "")[:70], r.get("N"), r.get("B"),
                                   fmt(r.get("us_per_step")), fmt(r.get("fixed_ms"), 3), fmt(r.get("above_base_us"))])
    out += section_rows(lines, "breakdown", "case", "Breakdown (torch.profiler, per forward+backward)",
                        ["case", "path", "category µs"],
                        lambda r: [r.get("case"), (r.get("path") or "")[:50],
                                   ", ".join(f"{k} {v:.0f}" for k, v in (r.get("categories") or {}).items())])
    counts = [line for line in lines if line["kind"] == "counts"]
    if counts and counts[-1]["failed_tests"]:
        out += ["", "### Failed GPU tests", ""] + [f"- {n}" for n in counts[-1]["failed_tests"]]
    metrics = last(lines, "ncu", "metrics")
    if metrics:
        sol = metrics["sections"].get("GPU Speed Of Light Throughput", {})
        out += ["", "### ncu (one forward launch; full report in ncu.txt): "
                + ", ".join(f"{k} {v}" for k, v in list(sol.items())[:8])]
    out += section_suites(lines)

    rows = phase_verdicts(lines)
    missing = [r for r in rows if r["verdict"] != PASSED]
    if missing:
        out += ["", "### Not verified by this run", ""]
        out += [f"- {r['name']}: {r['verdict']}: {' '.join(r['detail'].split())}" for r in missing]
    out += ["", "### Phases", ""]
    out += table(["#", "phase", "verdict", "s used / cap", "detail"],
                 [[i + 1, r["title"], f"**{r['verdict']}**", f"{r['used']} / {r['planned'] or 'rest'}",
                   r["detail"][:300]] for i, r in enumerate(rows)])
    text = "\n".join(out) + "\n"
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text)
    sys.stdout.write(text)
    sys.stdout.flush()
    return 1 if any(r["verdict"] == FAILED for r in rows) else 0


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "start":
        print(start(argv[1]))
        return 0
    if len(argv) == 5 and argv[0] == "end":
        end(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))
        return 0
    if argv == ["fallback-needed"]:
        return 0 if fallback_needed() else 1
    if len(argv) == 2 and argv[0] == "which":
        print(find_tool(argv[1]))
        return 0
    if len(argv) == 2 and argv[0] == "report":
        return report(argv[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
