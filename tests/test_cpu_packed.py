"""The packed CPU path (csrc/cpu/packed_kernels.h) against the reference loop, the float64
truth and the BLAS path; the same bits for any number of threads; batch slices (of both
paths); the barrier with a slow thread; the path choice (nnrnn_fused.cpu_path and its
environment variables)."""
import pytest
import torch

import nnrnn_fused
from nnrnn_fused import fused_nnrnn
from nnrnn_fused.reference import nnrnn_recurrence

from helpers import random_inputs as inputs, stable_W, tolerances

NONLINEARITIES = ["modrelu", "tanh", "relu"]
ISAS = ["avx512", "avx2", "generic"]


@pytest.fixture
def packed(monkeypatch):
    """Force the packed path; returns a setter for the ISA cap."""
    monkeypatch.setenv("NNRNN_CPU_KERNEL", "packed")
    monkeypatch.delenv("NNRNN_CPU_ISA", raising=False)
    monkeypatch.delenv("NNRNN_CPU_SLOW_MEMBER_US", raising=False)
    monkeypatch.delenv("NNRNN_CPU_TEAM", raising=False)
    monkeypatch.delenv("NNRNN_CPU_SLICES", raising=False)
    return lambda isa: monkeypatch.setenv("NNRNN_CPU_ISA", isa)


@pytest.fixture
def threads():
    """Set torch's thread count for one test and restore it after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def outputs_and_grads(fn, x, W, b, h0, lengths, nonlinearity, seed=1):
    """Output, h_n and the gradients of a fixed random loss w.r.t. x, W, b (and h0)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, W, b, h0) if t is not None]
    args = leaves + [None] * (4 - len(leaves))
    out, h_n = fn(*args, nonlinearity=nonlinearity, lengths=lengths)
    gen = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    gh = torch.randn(h_n.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad((out * go).sum() + (h_n * gh).sum(), leaves, allow_unused=True, materialize_grads=True)
    return [out.detach(), h_n.detach(), *grads]


def assert_all_close(got, want, rtol, atol):
    for i, (g, w) in enumerate(zip(got, want)):
        scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol * scale, msg=lambda m: f"result {i}: {m}")


# (T, B, N): a single step, B=1, N=1, partial panels, more rows than one tile holds
# (9 > 8), several panels per thread, T long enough to compound errors.
SHAPES = [(1, 1, 1), (1, 3, 5), (7, 1, 33), (5, 9, 40), (30, 13, 70), (3, 2, 129)]


@pytest.mark.parametrize("slices", ["default", "1", "3"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
@pytest.mark.parametrize("with_h0,with_lengths", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-B{}-N{}".format(*s))
def test_matches_reference_float64(packed, monkeypatch, slices, isa, nonlinearity, with_h0, with_lengths, shape):
    """By default with two threads B=13 runs in two batch slices and the others in one; 3
    slices are uneven (B=13: 5, 4, 4 rows) or fewer than asked (B < 3)."""
    packed(isa)
    if slices != "default":
        monkeypatch.setenv("NNRNN_CPU_SLICES", slices)
    args = inputs(*shape, torch.float64, with_h0, with_lengths)
    got = outputs_and_grads(fused_nnrnn, *args, nonlinearity)
    want = outputs_and_grads(nnrnn_recurrence, *args, nonlinearity)
    assert_all_close(got, want, *tolerances(torch.float64))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_float32_close_to_float64_truth(packed, isa, nonlinearity):
    """float32 through the packed kernels is as close to the float64 truth as the
    float32 reference loop is (a factor 4 of slack for the different summation order)."""
    packed(isa)
    args64 = inputs(40, 10, 70, torch.float64, True, True)
    args32 = [a.float() if a is not None and a.is_floating_point() else a for a in args64]
    truth = outputs_and_grads(nnrnn_recurrence, *args64, nonlinearity)
    got = outputs_and_grads(fused_nnrnn, *args32, nonlinearity)
    ref = outputs_and_grads(nnrnn_recurrence, *args32, nonlinearity)
    for i, (g, r, t) in enumerate(zip(got, ref, truth)):
        err, ref_err = (g.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
        assert err <= 4 * ref_err + 1e-6 * max(1.0, t.abs().max().item()), (i, err, ref_err)


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_packed_matches_blas_path(monkeypatch, nonlinearity):
    args = inputs(25, 11, 48, torch.float64, True, True)
    results = {}
    for kernel in ("packed", "blas"):
        monkeypatch.setenv("NNRNN_CPU_KERNEL", kernel)
        results[kernel] = outputs_and_grads(fused_nnrnn, *args, nonlinearity)
    assert_all_close(results["packed"], results["blas"], *tolerances(torch.float64))


@pytest.mark.parametrize("slices", ["default", "1", "2", "3"])
@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
@pytest.mark.parametrize("with_h0,with_lengths", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blas_path_slices_match_reference(monkeypatch, threads, slices, nonlinearity, with_h0, with_lengths, dtype):
    """The BLAS path with its batch in slices of consecutive rows (B=13 in 3: 4, 4, 5 rows),
    each running its time loop and single-threaded GEMMs on a thread of its own."""
    threads(2)
    monkeypatch.setenv("NNRNN_CPU_KERNEL", "blas")
    if slices != "default":
        monkeypatch.setenv("NNRNN_CPU_SLICES", slices)
    else:
        monkeypatch.delenv("NNRNN_CPU_SLICES", raising=False)
    want_slices = {"default": "2 batch slices", "1": "1 batch slice"}.get(slices, f"{slices} batch slices")
    assert nnrnn_fused.cpu_path(40, 13, dtype).endswith(", " + want_slices)
    args = inputs(17, 13, 40, dtype, with_h0, with_lengths)
    got = outputs_and_grads(fused_nnrnn, *args, nonlinearity)
    want = outputs_and_grads(nnrnn_recurrence, *args, nonlinearity)
    rtol, atol = tolerances(dtype)
    assert_all_close(got, want, rtol * 10, atol * 10)  # float32: sums over T*B terms


@pytest.mark.parametrize("slices", ["1", "2"])
def test_blas_path_same_bits_run_to_run(monkeypatch, threads, slices):
    """With the same threads and slices the BLAS path gives the same bits every call (across slice
    counts it need not: the BLAS library blocks a product by its number of rows)."""
    threads(2)
    monkeypatch.setenv("NNRNN_CPU_KERNEL", "blas")
    monkeypatch.setenv("NNRNN_CPU_SLICES", slices)
    args = inputs(20, 24, 96, torch.float32, True, True)
    first = outputs_and_grads(fused_nnrnn, *args, "tanh")
    for _ in range(3):
        again = outputs_and_grads(fused_nnrnn, *args, "tanh")
        for i, (a, b) in enumerate(zip(first, again)):
            assert torch.equal(a, b), f"result {i} changed between calls"


@pytest.mark.parametrize("slices", ["1", "2", "4"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("with_lengths", [False, True])
def test_same_bits_for_one_and_two_threads(packed, threads, monkeypatch, slices, isa, with_lengths):
    """A column of a batch slice is computed by one thread in one order (the weight and
    bias gradients too, summed over the slices in order), so for a given slice count the
    results do not depend on how the columns (one slice) or the slices (several) are
    spread over threads."""
    packed(isa)
    monkeypatch.setenv("NNRNN_CPU_TEAM", "fixed")  # two threads even if an earlier call went solo
    monkeypatch.setenv("NNRNN_CPU_SLICES", slices)
    args = inputs(20, 10, 100, torch.float32, True, with_lengths)
    results = []
    for n in (1, 2):
        threads(n)
        assert nnrnn_fused.cpu_path(100, 10).endswith(f", {n} thread" + ("s" if n > 1 else ""))
        results.append(outputs_and_grads(fused_nnrnn, *args, "tanh"))
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b), f"result {i} differs between 1 and 2 threads"


@pytest.mark.parametrize("with_lengths", [False, True])
def test_slices_change_only_the_rounding_of_the_weight_gradients(packed, threads, monkeypatch, with_lengths):
    """Rows are independent: the outputs and the gradients of x and h0 are the same bits
    however the batch is sliced (by default one slice per thread); dW and db are sums over
    the slices, so they agree to rounding."""
    args = inputs(30, 12, 70, torch.float32, True, with_lengths)
    results = {}
    for slices, n in (("1", 1), ("2", 2), ("5", 2)):
        threads(n)
        if slices != "5":  # one slice per thread by default
            assert f", {slices} batch slice" in nnrnn_fused.cpu_path(70, 12)
        else:
            monkeypatch.setenv("NNRNN_CPU_SLICES", slices)
            assert f", {slices} batch slices, 2 threads" in nnrnn_fused.cpu_path(70, 12)
        results[slices] = outputs_and_grads(fused_nnrnn, *args, "modrelu")
    for slices in ("2", "5"):
        for i in (0, 1, 2, 5):  # output, h_n, grad x, grad h0
            assert torch.equal(results[slices][i], results["1"][i]), (slices, i)
        grads_W_b = [results[slices][i] for i in (3, 4)]
        assert_all_close(grads_W_b, [results["1"][i] for i in (3, 4)], rtol=1e-5, atol=1e-5)  # atol x max |value|


def test_barrier_with_a_slow_thread(packed, threads, monkeypatch):
    """The last thread sleeps before every step (as if descheduled): the others wait at
    the barrier, nothing deadlocks, and the results are the same bits."""
    threads(2)
    monkeypatch.setenv("NNRNN_CPU_TEAM", "fixed")
    monkeypatch.setenv("NNRNN_CPU_SLICES", "1")  # the column team, the only one with a barrier
    args = inputs(12, 5, 96, torch.float32, True, True)
    fast = outputs_and_grads(fused_nnrnn, *args, "modrelu")
    monkeypatch.setenv("NNRNN_CPU_SLOW_MEMBER_US", "3000")
    slow = outputs_and_grads(fused_nnrnn, *args, "modrelu")
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


@pytest.mark.parametrize("with_lengths", [False, True])
def test_team_goes_solo_with_the_same_bits(packed, threads, monkeypatch, with_lengths):
    """A member that sleeps 3 ms before every step makes waiting cost more than member 0
    alone would (csrc/cpu/team.h): the team goes solo after a few steps, in the forward and
    in the backward, and later calls start solo. The results are those of one thread."""
    monkeypatch.setenv("NNRNN_CPU_SLICES", "1")  # the column team, the only one with a barrier
    args = inputs(40, 9, 130, torch.float32, True, with_lengths)
    threads(1)
    want = outputs_and_grads(fused_nnrnn, *args, "modrelu")
    threads(2)
    monkeypatch.setenv("NNRNN_CPU_SLOW_MEMBER_US", "3000")
    for _ in range(3):  # the first call switches mid-sequence, the next ones start solo
        got = outputs_and_grads(fused_nnrnn, *args, "modrelu")
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), f"result {i} differs from one thread's"


@pytest.mark.parametrize("shape", [(0, 3, 5), (4, 0, 5), (4, 3, 0), (0, 0, 0)], ids=str)
def test_empty_sizes(packed, shape):
    args = inputs(*shape, torch.float64, True, True)
    got = outputs_and_grads(fused_nnrnn, *args, "tanh")
    want = outputs_and_grads(nnrnn_recurrence, *args, "tanh")
    assert_all_close(got, want, *tolerances(torch.float64))


def test_non_contiguous_inputs(packed):
    T, B, N = 9, 4, 37
    x = torch.randn(B, T, N, dtype=torch.float64).transpose(0, 1)
    W = stable_W(N, torch.float64).contiguous().t()
    b = torch.randn(2 * N, dtype=torch.float64)[::2]
    h0 = torch.randn(N, B, dtype=torch.float64).t()
    assert not any(t.is_contiguous() for t in (x, W, b, h0))
    got = outputs_and_grads(fused_nnrnn, x, W, b, h0, None, "modrelu")
    want = outputs_and_grads(nnrnn_recurrence, x, W, b, h0, None, "modrelu")
    assert_all_close(got, want, *tolerances(torch.float64))


def strided_like(W, layout):
    """W's values in a layout that is not contiguous."""
    if layout == "transposed":
        return W.t().contiguous().t()
    if layout == "sliced":
        big = torch.zeros(2 * W.shape[0], 3 * W.shape[1], dtype=W.dtype)
        big[::2, 1::3] = W
        return big[::2, 1::3]
    return W[:1].expand_as(W)  # "expanded": every row the same, row stride 0


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_W_read_by_its_strides(packed, layout, dtype):
    """The packed kernels pack W from its strides instead of copying it contiguous first:
    any layout gives the same bits as the same values laid out contiguously."""
    x, W, b, h0, lengths = inputs(9, 6, 37, dtype, True, True)
    W_strided = strided_like(W, layout)
    assert not W_strided.is_contiguous()
    go, gh = torch.randn_like(x), torch.randn_like(h0)

    def run(W_):
        out, h_n = torch.ops.nnrnn_fused.recurrence(x, W_, b, h0, lengths, "modrelu")
        grads = torch.ops.nnrnn_fused.recurrence_backward(go, gh, out, W_, h0, lengths, "modrelu")
        return [out, h_n, *grads]

    for i, (got, want) in enumerate(zip(run(W_strided), run(W_strided.contiguous()))):
        assert torch.equal(got, want), f"result {i} differs"


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_in_bias_as_the_reference(packed, nonlinearity, bad):
    x, W, b, h0, _ = inputs(4, 3, 40, torch.float64)
    b[5] = bad
    out, h_n = fused_nnrnn(x, W, b, h0, nonlinearity=nonlinearity)
    out_r, h_n_r = nnrnn_recurrence(x, W, b, h0, nonlinearity=nonlinearity)
    torch.testing.assert_close(out, out_r, equal_nan=True)
    torch.testing.assert_close(h_n, h_n_r, equal_nan=True)


def test_gradcheck(packed):
    x, W, b, h0, lengths = inputs(5, 3, 9, torch.float64, True, True)
    leaves = [t.requires_grad_() for t in (x, W, b, h0)]
    assert torch.autograd.gradcheck(lambda *a: fused_nnrnn(*a, nonlinearity="tanh", lengths=lengths), leaves)


def test_cpu_path_reports_and_forces(monkeypatch, threads):
    monkeypatch.delenv("NNRNN_CPU_KERNEL", raising=False)
    monkeypatch.delenv("NNRNN_CPU_ISA", raising=False)
    monkeypatch.delenv("NNRNN_CPU_SLICES", raising=False)
    monkeypatch.setenv("NNRNN_CPU_CROSSOVER", "intel")  # the table of Intel CPUs (this test's own below)
    threads(2)
    assert nnrnn_fused.cpu_path(128, 10) .startswith("packed: ")  # the small case
    assert nnrnn_fused.cpu_path(128, 10).endswith(", 2 batch slices, 2 threads")  # 5 rows a slice
    assert nnrnn_fused.cpu_path(128, 9).endswith(", 1 batch slice, 2 threads")  # a team over the columns
    assert nnrnn_fused.cpu_path(8, 9).endswith(", 1 batch slice, 1 thread")  # one panel: one thread
    assert nnrnn_fused.cpu_path(8, 10).endswith(", 2 batch slices, 2 threads")
    assert nnrnn_fused.cpu_path(64, 1000).endswith(", 2 batch slices, 2 threads")  # one per thread
    threads(1)
    assert nnrnn_fused.cpu_path(64, 1000).endswith(", 1 batch slice, 1 thread")
    threads(2)
    monkeypatch.setenv("NNRNN_CPU_SLICES", "3")
    assert nnrnn_fused.cpu_path(64, 40).endswith(", 3 batch slices, 2 threads")
    assert nnrnn_fused.cpu_path(64, 2).endswith(", 2 batch slices, 2 threads")  # at most B
    monkeypatch.delenv("NNRNN_CPU_SLICES")
    assert nnrnn_fused.cpu_path(128, 1).startswith("packed: ")  # the crossover table
    assert nnrnn_fused.cpu_path(128, 256).startswith("packed: ")
    assert nnrnn_fused.cpu_path(129, 1).startswith("blas: faster for this shape")
    assert nnrnn_fused.cpu_path(256, 100).startswith("blas: faster for this shape")
    assert nnrnn_fused.cpu_path(512, 100) == "blas: faster for this shape (crossover table of Intel CPUs), 2 batch slices"
    # the BLAS path slices while W takes at most 1 MiB (each slice's thread reads all of it every step)
    assert nnrnn_fused.cpu_path(513, 100).endswith(", 1 batch slice")
    assert nnrnn_fused.cpu_path(362, 100, torch.float64).endswith(", 2 batch slices")
    assert nnrnn_fused.cpu_path(363, 100, torch.float64).endswith(", 1 batch slice")
    assert nnrnn_fused.cpu_path(512, 9).endswith(", 1 batch slice")  # at least 5 rows a slice
    assert nnrnn_fused.cpu_path(5000, 10).startswith("blas: N > ")
    assert nnrnn_fused.cpu_path(0, 10).startswith("blas: empty")
    monkeypatch.setenv("NNRNN_CPU_KERNEL", "blas")
    assert nnrnn_fused.cpu_path(128, 10) == "blas: forced by NNRNN_CPU_KERNEL=blas, 2 batch slices"
    threads(1)
    assert nnrnn_fused.cpu_path(512, 100).endswith(", 1 batch slice")
    threads(2)
    monkeypatch.setenv("NNRNN_CPU_KERNEL", "packed")
    monkeypatch.setenv("NNRNN_CPU_ISA", "generic")
    assert nnrnn_fused.cpu_path(128, 10).startswith("packed: generic, ")


def cpu_vendor():
    """The vendor the kernel names in /proc/cpuinfo (an independent reading of CPUID)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":")[1].strip()
    except OSError:
        pass
    return None


def test_cpu_path_crossover_table_per_vendor(monkeypatch, threads):
    """MKL's GEMMs are slower on AMD CPUs: their table sends every shape up to N=4096 to the packed path."""
    monkeypatch.delenv("NNRNN_CPU_KERNEL", raising=False)
    monkeypatch.delenv("NNRNN_CPU_SLICES", raising=False)
    threads(2)
    monkeypatch.setenv("NNRNN_CPU_CROSSOVER", "amd")
    for N, B in ((128, 10), (129, 1), (512, 100), (1024, 256), (4096, 1)):
        assert nnrnn_fused.cpu_path(N, B).startswith("packed: "), (N, B)
    assert nnrnn_fused.cpu_path(4097, 1).startswith("blas: N > 4096")
    assert nnrnn_fused.cpu_path(0, 10).startswith("blas: empty")
    monkeypatch.setenv("NNRNN_CPU_CROSSOVER", "intel")
    assert nnrnn_fused.cpu_path(512, 100).startswith("blas: faster for this shape (crossover table of Intel CPUs)")
    monkeypatch.setenv("NNRNN_CPU_CROSSOVER", "Intel")
    with pytest.raises(ValueError, match="NNRNN_CPU_CROSSOVER must be intel or amd .* got 'Intel'"):
        nnrnn_fused.cpu_path(512, 100)
    monkeypatch.delenv("NNRNN_CPU_CROSSOVER")
    vendor = cpu_vendor()
    if vendor not in ("AuthenticAMD", "GenuineIntel"):
        pytest.skip(f"the default table is checked on Intel and AMD CPUs (this one: {vendor})")
    if nnrnn_fused.cpu_path(1, 1).startswith("blas: the packed kernels need"):
        pytest.skip("no packed kernels in this build")
    default = nnrnn_fused.cpu_path(512, 100)
    assert default.startswith("packed: ") if vendor == "AuthenticAMD" else "crossover table of Intel CPUs" in default


def test_bad_settings_are_refused(monkeypatch):
    monkeypatch.setenv("NNRNN_CPU_KERNEL", "fast")
    with pytest.raises(ValueError, match="NNRNN_CPU_KERNEL must be auto, packed or blas"):
        nnrnn_fused.cpu_path(128, 10)
    monkeypatch.setenv("NNRNN_CPU_KERNEL", "packed")
    monkeypatch.setenv("NNRNN_CPU_ISA", "avx9000")
    x, W, b, h0, _ = inputs(2, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="NNRNN_CPU_ISA must be avx512, avx2 or generic"):
        fused_nnrnn(x, W, b, h0)
    monkeypatch.delenv("NNRNN_CPU_ISA")
    monkeypatch.setenv("NNRNN_CPU_TEAM", "sometimes")
    with pytest.raises(ValueError, match="NNRNN_CPU_TEAM must be adaptive or fixed"):
        fused_nnrnn(x, W, b, h0)
    monkeypatch.delenv("NNRNN_CPU_TEAM")
    for bad in ("0", "-2", "two", "3x"):
        monkeypatch.setenv("NNRNN_CPU_SLICES", bad)
        with pytest.raises(ValueError, match="NNRNN_CPU_SLICES must be a positive integer"):
            fused_nnrnn(x, W, b, h0)
    with pytest.raises(ValueError, match="N and B must be >= 0"):
        nnrnn_fused.cpu_path(-1, 3)
