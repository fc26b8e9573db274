"""orthogonal_from: an older parametrization.py (package at $OLD) against this checkout's, alternated."""
import importlib.util
import os
import sys
import time

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.environ["OLD"])
import nnrnn_fused.parametrization as old  # noqa: E402

sys.path.pop(0)
spec = importlib.util.spec_from_file_location("new_parametrization", "nnrnn_fused/parametrization.py")
new = importlib.util.module_from_spec(spec)
spec.loader.exec_module(new)


def median_ms(f, k):
    f()
    times = []
    for _ in range(k):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


for n, k in ((128, 41), (256, 21), (512, 9), (1024, 3)):
    L = old.init_log_P(n, "henaff").float().requires_grad_()
    G = torch.randn(n, n)
    res = []
    for _ in range(2):
        for name, m in (("old", old), ("new", new)):
            fwd = median_ms(lambda: m.orthogonal_from(L), k)
            fwdbwd = median_ms(lambda: torch.autograd.grad((m.orthogonal_from(L) * G).sum(), L), k)
            res.append(f"{name} {fwd:.2f}/{fwdbwd:.2f}")
    print(n, "  ".join(res), flush=True)
