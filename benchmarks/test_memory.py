"""Memory of forward+backward: bytes saved for backward (every device) and the peak
of CUDA's allocator (cuda). Times one round as well, so pytest-benchmark records it.

    pytest benchmarks/test_memory.py --benchmark-only [--grid ...] --benchmark-json=out.json
"""
import torch

from benchmarks.cases import build
from benchmarks.memory import SavedTensorBytes


def test_memory(benchmark, memory_case):
    case = memory_case
    run = build(case)
    run()  # warm up (cuDNN workspaces, allocator caches)
    if case.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with SavedTensorBytes() as saved:
        run()
    benchmark.group = "memory " + case.group
    benchmark.extra_info.update(impl=case.impl, mode="memory", N=case.N, B=case.B, T=case.T, dtype=case.dtype,
                                device=case.device, saved_bytes=saved.total)
    if case.device == "cuda":
        benchmark.extra_info["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    benchmark.pedantic(run, rounds=1, iterations=1)
