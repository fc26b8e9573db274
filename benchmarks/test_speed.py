"""Time per call of each implementation, forward and forward+backward.

    pytest benchmarks/ --benchmark-only [--grid quick|targets|full|gpu] --benchmark-json=out.json
    python -m benchmarks.report out.json
"""
import pytest

from benchmarks.cases import build


def default_rounds(case, grid):
    if grid == "quick":
        return 3
    if case.device == "cuda":
        return 5 if case.impl == "reference" else 20  # the loop launches kernels per step: slow, steady
    return 3 if case.impl == "reference" and case.N * case.B >= 512 * 100 else 7


def warmup_rounds(case, grid):
    """Untimed calls first. On the CPU 3: the first calls of a case run slower than the steady
    state a training loop sees (N=128 B=10 T=220 forward+backward, fresh process: calls 2-4 at
    10-18 µs/step, later ones 8-9; glibc's mmap threshold is not the cause, setting it high
    changed nothing). The same for every implementation."""
    if grid == "quick":
        return 1
    return 3 if case.device == "cpu" else 1


def test_speed(benchmark, case, request):
    grid = request.config.getoption("--grid")
    run = build(case)
    benchmark.group = case.group
    benchmark.extra_info.update(impl=case.impl, mode=case.mode, N=case.N, B=case.B, T=case.T,
                                dtype=case.dtype, device=case.device)
    rounds = request.config.getoption("--rounds") or default_rounds(case, grid)
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup_rounds(case, grid), iterations=1)
