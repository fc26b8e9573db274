"""The cache of big CPU blocks behind fused_nnrnn's outputs (csrc/cpu/block_cache.cpp):
a reused block, whatever it held, gives the same bits as fresh memory on both CPU paths;
repeated calls are served from the cache and stop faulting pages in; the cap, the
emptying, and the outputs behaving as ordinary tensors."""
import io
import os
import resource
import subprocess
import sys
import threading

import pytest
import torch

import nnrnn_fused
from nnrnn_fused import fused_nnrnn

from helpers import random_inputs, stable_W

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# T * B * N float32 = 1 MiB, the smallest output the cache takes.
T, B, N = 64, 8, 512


@pytest.fixture(autouse=True)
def default_cache(monkeypatch):
    monkeypatch.delenv("NNRNN_CPU_CACHE_MB", raising=False)
    nnrnn_fused.empty_cpu_cache()
    yield
    nnrnn_fused.empty_cpu_cache()


def hits():
    return nnrnn_fused.cpu_cache_info()["hits"]


def forward_backward(x, W, b, h0, lengths, nonlinearity):
    """The two ops called directly: (output, h_n, grad_x, grad_W, grad_b, grad_h0)."""
    out, h_n = torch.ops.nnrnn_fused.recurrence(x, W, b, h0, lengths, nonlinearity)
    gen = torch.Generator().manual_seed(3)
    go = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    gh = torch.randn(h_n.shape, generator=gen, dtype=out.dtype)
    grads = torch.ops.nnrnn_fused.recurrence_backward(go, gh, out, W, h0, lengths, nonlinearity)
    return [out, h_n, *grads]


@pytest.mark.parametrize("kernel", ["packed", "blas"])
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_reused_block_gives_the_bits_of_fresh_memory(monkeypatch, kernel, with_lengths, dtype):
    # Fresh memory from the system is zeros, so a kernel that skipped an element
    # would pass with it; reused blocks are filled with NaN first.
    monkeypatch.setenv("NNRNN_CPU_KERNEL", kernel)
    x, W, b, h0, lengths = random_inputs(T, B, N, dtype, with_h0=True, with_lengths=with_lengths)
    if with_lengths:
        lengths[0], lengths[1] = 0, T  # a row that never runs, one that runs all steps
    args = (x, W, b, h0, lengths, "modrelu")

    monkeypatch.setenv("NNRNN_CPU_CACHE_MB", "0")
    fresh = forward_backward(*args)
    monkeypatch.delenv("NNRNN_CPU_CACHE_MB")

    for _ in range(2):  # leave two NaN blocks of this size in the cache: the output's and grad_x's
        poisoned = forward_backward(*args)
        poisoned[0].fill_(float("nan"))
        poisoned[2].fill_(float("nan"))
        del poisoned
    before = hits()
    reused = forward_backward(*args)
    assert hits() - before == 2  # the output and grad_x both came from the cache
    for i, (got, want) in enumerate(zip(reused, fresh)):
        assert torch.equal(got, want), f"result {i} differs"


def test_repeated_calls_are_served_from_the_cache():
    x = torch.randn(T + 16, B, N)
    W = stable_W(N, torch.float32)
    fused_nnrnn(x, W)
    info = nnrnn_fused.cpu_cache_info()
    assert info["unused_blocks"] == 1 and info["unused_bytes"] >= x.numel() * 4
    for _ in range(3):
        fused_nnrnn(x, W)
    after = nnrnn_fused.cpu_cache_info()
    assert after["hits"] - info["hits"] == 3 and after["misses"] == info["misses"]
    # A slightly shorter sequence falls in the same size class.
    fused_nnrnn(x[:-3], W)
    assert nnrnn_fused.cpu_cache_info()["hits"] - after["hits"] == 1
    # Small outputs never reach the cache.
    small = nnrnn_fused.cpu_cache_info()
    fused_nnrnn(torch.randn(5, 2, 8), stable_W(8, torch.float32))
    assert nnrnn_fused.cpu_cache_info() == small


def test_autograd_training_steps_reuse_the_blocks():
    x = torch.randn(T, B, N, requires_grad=True)
    W = stable_W(N, torch.float32).requires_grad_()
    for _ in range(2):
        fused_nnrnn(x, W)[0].sum().backward()
    before = nnrnn_fused.cpu_cache_info()
    for _ in range(3):
        fused_nnrnn(x, W)[0].sum().backward()
    after = nnrnn_fused.cpu_cache_info()
    assert after["misses"] == before["misses"] and after["hits"] - before["hits"] == 6


def test_reuse_stops_the_page_faults():
    # 40 MB: above glibc's largest mmap threshold, so fresh memory is mapped and
    # faulted in at every call (about 10,000 faults of 4 KiB pages).
    x = torch.randn(400, 100, 256)
    W = stable_W(256, torch.float32)

    def faults_of_a_call():
        fused_nnrnn(x, W)  # the previous call's output is freed: its block is kept, or unmapped
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fused_nnrnn(x, W)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    cached = faults_of_a_call()
    with pytest.MonkeyPatch.context() as m:
        m.setenv("NNRNN_CPU_CACHE_MB", "0")
        uncached = faults_of_a_call()
    assert cached < 200 < uncached / 5, (cached, uncached)


def test_the_cap_and_emptying(monkeypatch):
    x = torch.randn(T, B, N)
    W = stable_W(N, torch.float32)
    fused_nnrnn(x, W)
    assert nnrnn_fused.cpu_cache_info()["unused_bytes"] > 0
    nnrnn_fused.empty_cpu_cache()
    assert nnrnn_fused.cpu_cache_info()["unused_bytes"] == 0

    monkeypatch.setenv("NNRNN_CPU_CACHE_MB", "0")  # off: nothing kept, nothing counted
    before = nnrnn_fused.cpu_cache_info()
    fused_nnrnn(x, W)
    assert nnrnn_fused.cpu_cache_info() == before

    monkeypatch.setenv("NNRNN_CPU_CACHE_MB", "3")  # room for one 2 MiB block, not two
    outs = [fused_nnrnn(x, W)[0] for _ in range(2)]
    del outs
    info = nnrnn_fused.cpu_cache_info()
    assert info["unused_blocks"] == 1 and info["unused_bytes"] <= 3 << 20


def test_outputs_are_ordinary_tensors():
    x = torch.randn(T, B, N)
    W = stable_W(N, torch.float32)
    out = fused_nnrnn(x, W)[0]
    want = out.clone()
    buffer = io.BytesIO()
    torch.save(out, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer), want)
    out.resize_(2 * T, B, N)  # a bigger storage: through the cache's allocator
    assert torch.equal(out[:T], want)
    assert torch.equal(torch.from_numpy(out.numpy())[:T], want)
    out.share_memory_()
    assert out.is_shared() and torch.equal(out[:T], want)


def test_threads_calling_at_once_get_their_own_blocks():
    W = stable_W(N, torch.float32)
    xs = [torch.randn(T, B, N, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    want = [fused_nnrnn(x, W)[0] for x in xs]
    got = [[] for _ in xs]

    def work(i):
        for _ in range(5):
            got[i].append(fused_nnrnn(xs[i], W)[0])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, outs in enumerate(got):
        assert len(outs) == 5 and all(torch.equal(o, want[i]) for o in outs)



def _child_run(queue):
    torch.set_num_threads(1)  # GNU OpenMP's thread pool does not survive a fork (as in DataLoader workers)
    x = torch.randn(T, B, N, generator=torch.Generator().manual_seed(5))
    out = fused_nnrnn(x, stable_W(N, torch.float32, generator=torch.Generator().manual_seed(6)))[0]
    queue.put((out.sum().item(), nnrnn_fused.cpu_cache_info()["hits"]))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_child_uses_its_inherited_cache():
    import multiprocessing

    x = torch.randn(T, B, N, generator=torch.Generator().manual_seed(5))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child: the same bits
    try:
        want = fused_nnrnn(x, stable_W(N, torch.float32, generator=torch.Generator().manual_seed(6)))[0].sum().item()
    finally:
        torch.set_num_threads(threads)
    hits_before = hits()  # the output above is freed: its block is kept, and the child inherits it
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_run, args=(queue,))
    child.start()
    got, child_hits = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert got == want and child_hits == hits_before + 1


@pytest.mark.parametrize("value", ["-1", "1.5", "lots", "99999999999"])
def test_a_malformed_cap_is_named(monkeypatch, value):
    x = torch.randn(T, B, N)
    W = stable_W(N, torch.float32)
    monkeypatch.setenv("NNRNN_CPU_CACHE_MB", value)
    with pytest.raises(ValueError, match=f"NNRNN_CPU_CACHE_MB must be a whole number.*'{value}'"):
        fused_nnrnn(x, W)
    with pytest.raises(ValueError, match="NNRNN_CPU_CACHE_MB"):
        torch.ops.nnrnn_fused.recurrence_backward(x, x[0], x, W, None, None, "modrelu")
    fused_nnrnn(x[:, :1, :8], W[:8, :8])  # small outputs never read it


OUT_OF_MEMORY = """
import resource, sys, torch
import nnrnn_fused
from nnrnn_fused import fused_nnrnn
torch.set_num_threads(1)
MB = 1 << 20
def address_space():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
W = torch.eye(16) * 0.5
x = torch.zeros(1000, 4800, 16)  # 300 MiB
room = int(sys.argv[1]) * MB  # address space left beyond x
resource.setrlimit(resource.RLIMIT_AS, (address_space() + room, resource.RLIM_INFINITY))
try:
    fused_nnrnn(x, W)  # its 300 MiB output is freed and kept unused
    assert nnrnn_fused.cpu_cache_info()["unused_bytes"] >= 300 * MB
    out = fused_nnrnn(x[:500], W)[0]  # another size class: 150 MiB more only if the kept block is freed
except torch.OutOfMemoryError as e:
    print("OOM", str(e).splitlines()[0])
else:
    print("OK", nnrnn_fused.cpu_cache_info()["unused_bytes"], out.shape[0])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="an address-space limit (RLIMIT_AS)")
@pytest.mark.parametrize("room_mb, outcome", [(400, "OK 0 500"), (100, "OOM")])
def test_out_of_memory_frees_the_unused_blocks_first(room_mb, outcome):
    # 400 MiB of room: the first output (300) fits, the second (150) only once the
    # kept 300 are freed. 100: not the first, and the error names the problem.
    env = {k: v for k, v in os.environ.items() if k != "NNRNN_CPU_CACHE_MB"}
    env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY, str(room_mb)], env=env, capture_output=True,
                         text=True, timeout=300)
    lines = out.stdout.strip().splitlines()
    if outcome == "OOM" and out.returncode != 0 and not lines:
        pytest.fail(f"the process failed instead of raising: {out.stderr[-2000:]}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert lines[-1].startswith(outcome), lines
    if outcome == "OOM":
        assert "out of CPU memory allocating" in lines[-1] and "its cache" in lines[-1]


def test_the_profiler_counts_the_blocks():
    # torch.profiler(profile_memory=True) sees the output's block allocated by the op
    # (as it sees torch's own CPU allocations), whether fresh or from the cache.
    x = torch.randn(T, B, N)
    W = stable_W(N, torch.float32)
    for cached in (False, True):
        if not cached:
            nnrnn_fused.empty_cpu_cache()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fused_nnrnn(x, W)[0]
        op = next(e for e in prof.key_averages() if e.key == "nnrnn_fused::recurrence")
        assert op.cpu_memory_usage >= out.numel() * 4, (cached, op.cpu_memory_usage)
        del out
