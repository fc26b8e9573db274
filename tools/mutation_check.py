"""Mutation check of the kernels' synchronisation (docs/cuda.md, "Mutation check").

For every barrier and wait in a kernel source (default csrc/cuda/kernels_v2.h: block,
warp and cluster barriers, mbarrier waits and armings, step-counter waits, and the calls
of exchange.h's helpers that make them), builds a
copy of the package (CPU only) with that one call removed and runs the emulation
tests of the kernel against the float64 reference (tests/test_cuda_emulation.py -k v2).
Then the source's value mutants (VALUE_MUTANTS: an expression the synchronisation
relies on, changed: a wait for one tile fewer, one buffer where there are two, the
wrong warp publishing), one at a time, the same way.
A mutant is killed when a test fails (a wrong result, or the emulation's deadlock
watchdog). Prints one line per mutant; exit status 1 if any survives.

    python tools/mutation_check.py [--source csrc/cuda/kernels_v2.h] [--tests "-k v2"] [--workdir DIR]
                                   [--sites 1,4] [--test-file tests/test_cuda_emulation.py]

(The tensor-core kernels: --source csrc/cuda/tc_kernels.h --test-file tests/test_tc_emulation.py --tests "".
The protocol both share, csrc/cuda/exchange.h: --source csrc/cuda/exchange.h, once with each kernel's tests.)

Slow (a rebuild of two translation units per mutant, 1-3 minutes each on 2 cores):
run by hand after changing the kernels' synchronisation, not in CI.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The environment's barriers, waits and armings, and the calls of exchange.h's helpers that
# make them (not their definitions: "void " before the name).
CALLS = (r"env\.(sync_block|sync_warp|sync_cluster|sync_grid|mbar_wait|mbar_expect|flag_wait)\("
         r"|(?<!void )\b(init_cluster_exchange|arm_cluster_slot|wait_cluster_slices|wait_grid_rows)\(")


# (what the change breaks, the text, its replacement): each text occurs exactly once in its source.
VALUE_MUTANTS = {
    "csrc/cuda/kernels_v2.h": [
        ("the Grid's consumers wait for one tile fewer",
         "rows_published(s - 1, rows, rt0 + trows));", "rows_published(s - 1, rows, rt0));"),
        ("one buffer of partial sums for all tiles",
         "P + p_parity(ex, s, tiles, tile) * L.d.p_tile_elems;", "P;"),
        ("the Cluster's buffers of partial sums alternated by tile only, not across steps",
         "p_parity(ex, s, tiles, tile)", "p_parity(Exchange::Block, s, tiles, tile)"),
        ("the Grid's tile published by every warp of the block as it gets there, not the last",
         "last_warp_of_tile(env, warps_done, warps)", "last_warp_of_tile(env, warps_done, 1)"),
        ("P's slots that no chunk writes left unzeroed",
         "P[i] = acc_t(0);  // the slots no chunk writes", "(void)P;"),
    ],
    "csrc/cuda/tc_kernels.h": [
        ("the Grid's consumers wait for one tile fewer",
         "rows_published(s - 1, rows, rt0 + trows));", "rows_published(s - 1, rows, rt0));"),
        ("one buffer of partial sums for all tiles",
         "p_parity(ex, static_cast<int>(s), tile_count(), rt0 / RT) * L.d.p_buffer_bytes", "0"),
        ("the Cluster's buffers of partial sums alternated by tile only, not across steps",
         "p_parity(ex, static_cast<int>(s), tile_count(), rt0 / RT)",
         "p_parity(Exchange::Block, static_cast<int>(s), tile_count(), rt0 / RT)"),
        ("the Grid's tile published by every warp of the block as it gets there, not the last",
         "last_warp_of_tile(env, warps_done(), env.threads() / 32)", "last_warp_of_tile(env, warps_done(), 1)"),
    ],
    # The protocol both kernels share: run with each kernel's tests.
    "csrc/cuda/exchange.h": [
        ("the Cluster's waits for the other phase",
         "static_cast<uint32_t>(((s - 1) >> 1) & 1));", "static_cast<uint32_t>(((s + 1) >> 1) & 1));"),
        ("the Grid's count of warps done with a tile not set back to 0",
         "*warps_done = 0;\n  return true;", "(void)warps_done;\n  return true;"),
    ],
}


def value_mutants(source: str, text: str) -> list[tuple[int, int, str, str]]:
    """(start, end, description, replacement) of the source's value mutants."""
    mutants = []
    for what, old, new in VALUE_MUTANTS.get(source, []):
        if text.count(old) != 1:
            raise SystemExit(f"{source}: the value mutant '{what}' expects {old!r} once, found it "
                             f"{text.count(old)} times: update VALUE_MUTANTS in {__file__}")
        start = text.index(old)
        mutants.append((start, start + len(old), what, new))
    return mutants


def call_sites(text: str) -> list[tuple[int, int, str]]:
    """(start, end, call) of every synchronising call, end just after its closing parenthesis."""
    sites = []
    for m in re.finditer(CALLS, text):
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        sites.append((m.start(), i, text[m.start():i]))
    return sites


def run(cmd, cwd, timeout, env=None):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="csrc/cuda/kernels_v2.h")
    parser.add_argument("--test-file", default="tests/test_cuda_emulation.py", help="the emulation tests to run")
    parser.add_argument("--tests", default="-k v2", help="pytest selection within the test file")
    parser.add_argument("--workdir", default=None, help="where the copy is built (default: a temporary folder)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutant's tests")
    parser.add_argument("--sites", default="", help="the mutants to run, by number (default: all)")
    args = parser.parse_args(argv)

    with open(os.path.join(ROOT, args.source)) as f:
        text = f.read()
    # (start, end, what is changed, the replacement): every call removed, then the value mutants.
    sites = [(start, end, call, "(void)0") for start, end, call in call_sites(text)]
    sites += value_mutants(args.source, text)
    chosen = {int(n) for n in args.sites.split(",") if n} or set(range(1, len(sites) + 1))
    if not chosen <= set(range(1, len(sites) + 1)):
        parser.error(f"--sites: {args.source} has mutants 1 to {len(sites)}, got {sorted(chosen)}")

    workdir = args.workdir or tempfile.mkdtemp(prefix="nnrnn_mutants_")
    files = run(["git", "ls-files"], ROOT, 60).stdout.split()
    for f in files:
        os.makedirs(os.path.dirname(os.path.join(workdir, f)) or workdir, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(workdir, f))
    env = dict(os.environ, NNRNN_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    build = [sys.executable, "setup.py", "build_ext", "--inplace"]
    tests = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", args.test_file,
             *shlex.split(args.tests)]

    source_path = os.path.join(workdir, args.source)
    original = open(source_path).read()
    os.utime(source_path)  # newer than any object a mutant left in a reused workdir: it is rebuilt
    print(f"building the unmutated copy in {workdir}", flush=True)
    proc = run(build, workdir, 3600, env)
    if proc.returncode != 0:
        print(proc.stdout[-3000:] + proc.stderr[-3000:])
        return 2
    proc = run(tests, workdir, args.timeout)
    if proc.returncode != 0:
        print("the unmutated copy fails its tests:\n" + proc.stdout[-3000:])
        return 2

    survived = 0
    for n, (start, end, call, replacement) in enumerate(sites, 1):
        if n not in chosen:
            continue
        line = original.count("\n", 0, start) + 1
        with open(source_path, "w") as f:
            f.write(original[:start] + replacement + original[end:])
        proc = run(build, workdir, 3600, env)
        if proc.returncode != 0:
            print(f"[{n}/{len(sites)}] {args.source}:{line} {call}: the mutant does not build")
            survived += 1
            continue
        try:
            proc = run(tests, workdir, args.timeout)
            tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
            killed = proc.returncode != 0
        except subprocess.TimeoutExpired:
            tail, killed = f"tests ran past {args.timeout} s (a hang)", True
        survived += not killed
        print(f"[{n}/{len(sites)}] {args.source}:{line} {call}: {'killed' if killed else 'SURVIVED'} ({tail})",
              flush=True)
    with open(source_path, "w") as f:
        f.write(original)
    print(f"{len(chosen) - survived} of {len(chosen)} mutants killed")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
