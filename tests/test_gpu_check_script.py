"""benchmarks/gpu_check.sh, the one script a lent GPU runs, runs to the end on a
CPU machine too (GPU parts skipped), so that it cannot rot between GPU sessions."""
import json
import os
import subprocess
import sys

import pytest
import torch

from nnrnn_fused import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script is run as it is, not from the tests")
@pytest.mark.skipif(not _extension.LOADED, reason="the script is run here without its build step")
def test_gpu_check_script_runs_on_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), NNRNN_SKIP_BUILD="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip())  # the table is printed last
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["env"]["card"] == "none (CPU machine)"
    assert results["steps"]["build"] == "skipped (NNRNN_SKIP_BUILD=1)"
    assert results["steps"]["timings"] == "skipped (no GPU)"
    assert results["steps"]["benchmarks"] == "skipped (no GPU)"
    assert results["steps"]["GPU tests"].startswith("passed"), results["steps"]
    tests = results["tests"]
    assert tests["tests"] > 0 and tests["skipped"] == tests["tests"]  # collected, and skipped for want of a GPU
    assert "| GPU tests |" in summary


def test_gpu_check_report_includes_benchmark_tables(tmp_path):
    """The summary's benchmark part, fed with a quick CPU run of the suites (on a GPU
    the same code reads the CUDA cases)."""
    bench = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_speed.py", "--benchmark-only", "--grid",
                            "quick", "-q", "-p", "no:cacheprovider", "-k", "N64",
                            f"--benchmark-json={tmp_path / 'benchmarks.json'}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bench.returncode == 0, bench.stdout[-2000:]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "report", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "| cpu | float32 | fwdbwd | 64 | 10 | 50 |" in summary
    assert (tmp_path / "speed_cpu_float32_fwd.png").exists()
