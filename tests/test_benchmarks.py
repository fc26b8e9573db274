"""The benchmark suites and the report run (a quick CPU subset: it proves the code
works; it is not a speed gate), and the fused op keeps only O(T*B*N) for backward."""
import json
import os
import subprocess
import sys

import pytest
import torch

import nnrnn_fused

from helpers import count_W_builds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_benchmarks_and_report(tmp_path):
    results = tmp_path / "quick.json"
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "--grid", "quick", "-q", "-p",
           "no:cacheprovider", f"--benchmark-json={results}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(results.read_text())
    impls = {b["extra_info"]["impl"] for b in data["benchmarks"]}
    assert impls == {"fused", "fused_blas", "reference", "torch_rnn", "torch_lstm", "nnrnn_layer"}
    assert all(b["stats"]["median"] > 0 for b in data["benchmarks"])

    report = subprocess.run([sys.executable, "-m", "benchmarks.report", str(results), "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    md = (tmp_path / "report.md").read_text()
    assert "| cpu | float32 | fwdbwd | 128 | 10 | 50 |" in md
    assert "fused_nnrnn vs nn.RNN(tanh)" in md and "fused_nnrnn vs previous (BLAS per step)" in md
    assert "Memory of forward+backward" in md
    assert (tmp_path / "speed_cpu_float32_fwdbwd.png").stat().st_size > 1000


def test_step_grid_runs_the_reused_layer(tmp_path):
    """The inference-step grid (W rebuilt per call, or reused inside reuse_recurrent_matrices)."""
    results = tmp_path / "step.json"
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "--grid", "step", "-k", "speed and N128",
           "-q", "-p", "no:cacheprovider", "--rounds", "2", f"--benchmark-json={results}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    benchmarks = json.loads(results.read_text())["benchmarks"]
    assert {(b["extra_info"]["impl"], b["extra_info"]["mode"]) for b in benchmarks} == {
        ("nnrnn_layer", "fwd"), ("nnrnn_layer_reused", "fwd"), ("torch_rnn", "fwd")}


def test_reused_case_builds_W_once(monkeypatch):
    """The benchmark's reused layer really reuses W, call after call (a context manager left
    unreferenced would be closed by the garbage collector, and W rebuilt at every call)."""
    import gc

    from benchmarks.cases import Case, build

    builds = count_W_builds(monkeypatch)
    run = build(Case("nnrnn_layer_reused", "fwd", 8, 1, 1, "float32", "cpu"))
    gc.collect()
    for _ in range(3):
        run()
    assert len(builds) == 1


@pytest.mark.parametrize("impl", ["fused", "fused_packed", "torch_rnn", "nnrnn_layer"])
def test_each_forward_backward_starts_without_gradients(impl):
    """Every timed forward+backward starts from .grad = None, as a training step does after
    optimizer.zero_grad(): the gradients after two calls are those of one."""
    from benchmarks.cases import Case, build

    run = build(Case(impl, "fwdbwd", 8, 3, 5, "float32", "cpu"))
    assert len(run.leaves) >= 3  # x and the weights
    run()
    once = [leaf.grad.clone() for leaf in run.leaves]
    run()
    for leaf, want in zip(run.leaves, once):
        torch.testing.assert_close(leaf.grad, want, rtol=1e-5, atol=1e-6)


def test_fused_op_saves_output_and_weights_only():
    """Saved for backward: the output (T*B*N), W and h0, nothing else."""
    from benchmarks.memory import SavedTensorBytes

    T, B, N = 40, 3, 16
    x = torch.randn(T, B, N, requires_grad=True)
    W = torch.randn(N, N, requires_grad=True)
    b = torch.randn(N, requires_grad=True)
    h0 = torch.randn(B, N, requires_grad=True)
    with SavedTensorBytes() as saved:
        out, _ = nnrnn_fused.fused_nnrnn(x, W, b, h0, lengths=torch.full((B,), T))
    expected = (T * B * N + N * N + B * N) * 4 + B * 8  # output, W, h0 (float32) and lengths (int64)
    assert saved.total == expected
    with SavedTensorBytes() as saved_ref:
        nnrnn_fused.reference.nnrnn_recurrence(x, W, b, h0)
    assert saved_ref.total > 2 * saved.total  # the autograd loop keeps several tensors per step
