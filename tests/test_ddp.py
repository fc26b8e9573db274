"""DistributedDataParallel: 2 CPU processes (gloo) each on half of the batch take
the same step as one process on the whole batch."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnrnn_fused import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def config(out_dir, steps, model="nnrnn", **kw):
    args = {"task": "copy", "model": model, "T": 6, "hidden": 16, "batch": 8, "steps": steps, "lr": 1e-2,
            "lr_orth": 1e-3, "progress": False, "threads": 1, "dtype": "float64", "out_dir": str(out_dir), **kw}
    return train.cli.resolve_config(args)


def _worker(rank, world, store_file, cfg):
    # A file rendezvous (no TCP port to race for); run() uses the group it finds.
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    try:
        train.loop.run(cfg)
    finally:
        dist.destroy_process_group()


def final_model(out_dir):
    return train.load_checkpoint(os.path.join(out_dir, "checkpoint.pt"))["model"]


def assert_same_step(a, b):
    # float64: RMSprop's first step is ~ lr * sign(grad), so gradients that are zero up to
    # rounding (e.g. log_P along a rotation that commutes with Lambda) need the extra precision.
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-9), (k, (a[k] - b[k]).abs().max().item())


@pytest.mark.parametrize("model", ["nnrnn", "lstm"])
def test_ddp_step_equals_single_process_step(tmp_path, model):
    single = config(tmp_path / "single", 1, model)
    train.loop.run(single)
    start = train.load_checkpoint(os.path.join(tmp_path / "single", "checkpoint.pt"))
    zero = config(tmp_path / "zero", 0, model)  # the initial parameters, from the same seed
    train.loop.run(zero)
    initial = final_model(tmp_path / "zero")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), config(tmp_path / "ddp", 1, model, distributed=True)), nprocs=2)
    ddp = train.load_checkpoint(os.path.join(tmp_path / "ddp", "checkpoint.pt"))
    assert ddp["step"] == 1
    assert any(not torch.equal(initial[k], start["model"][k]) for k in initial)  # the step moved something
    assert_same_step(ddp["model"], start["model"])
    assert ddp["rows"][0]["loss"] == pytest.approx(start["rows"][0]["loss"], rel=1e-12)  # mean over both halves


def test_torchrun_distributed_flag(tmp_path):
    args = ["copy", "--T", "6", "--hidden", "16", "--batch", "8", "--steps", "2", "--lr", "1e-2", "--threads", "1",
            "--no-progress", "--dtype", "float64"]
    train.main(args + ["--out-dir", str(tmp_path / "single")])
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "nnrnn_fused.train"] + args + ["--distributed", "--out-dir", str(tmp_path / "ddp")]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 processes" in result.stdout
    a, b = final_model(tmp_path / "ddp"), final_model(tmp_path / "single")
    assert_same_step(a, b)
