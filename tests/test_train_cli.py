"""The training command's guards: option validation, device selection, exit codes and
signals, checkpoint integrity, non-finite parameters, resume rules; the package's layout."""
import ast
import importlib
import os
import re
import signal
import tomllib

import pytest
import torch

from nnrnn_fused import train

from test_train import TINY_COPY, run_cli, train_rows

LOG_P = "rnn.layers.0.recurrent.log_P"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real checkpoint of a 2-step tiny copy run (read only: tests copy it)."""
    out = tmp_path_factory.mktemp("ckpt")
    run_cli(TINY_COPY + ["--steps", "2"], out)
    return out / "checkpoint.pt"


# ---------------------------------------------------------------- devices

@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_cuda_device_gets_an_index(monkeypatch, device):
    """torch.cuda.set_device refuses torch.device("cuda") (no index); a GPU machine is faked."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    selected = []
    monkeypatch.setattr(torch._C, "_cuda_setDevice", selected.append, raising=False)
    cfg = dict(device=device, distributed=False, model="lstm", backend="fused")
    assert train.devices.pick_device(cfg) == torch.device("cuda", 0)
    assert selected == [0]  # through the real torch.cuda.set_device, which checks its argument


# ---------------------------------------------------------------- options

BAD_OPTIONS = [
    ("copy", ["--log-every", "0"]), ("ptb", ["--bptt", "0"]), ("psmnist", ["--eval-batch", "-5"]),
    ("copy", ["--steps", "-1"]), ("psmnist", ["--epochs", "-2"]), ("copy", ["--delta", "-1"]),
    ("copy", ["--t-decay", "-1e-6"]), ("copy", ["--checkpoint-every", "-1"]), ("ptb", ["--max-chars", "-3"]),
    ("copy", ["--clip", "nan"]), ("copy", ["--clip", "-1"]), ("copy", ["--lr", "0"]), ("copy", ["--lr", "inf"]),
    ("copy", ["--lr-orth", "-1e-6"]), ("copy", ["--alpha", "1"]), ("copy", ["--betas", "0.9", "1.5"]),
    ("copy", ["--hidden", "0"]), ("copy", ["--batch", "0"]), ("copy", ["--T", "-3"]), ("ptb", ["--emb", "0"]),
    ("copy", ["--threads", "-1"]), ("copy", ["--seed", "-1"]), ("copy", ["--hidden", "12.5"]),
    ("copy", ["--lr", "fast"]),
]


@pytest.mark.parametrize("task,args", BAD_OPTIONS, ids=[" ".join(a) for _, a in BAD_OPTIONS])
def test_bad_option_values_are_refused_up_front(tmp_path, capsys, task, args):
    with pytest.raises(SystemExit) as e:
        train.main([task] + args + ["--out-dir", str(tmp_path / "out")])
    assert e.value.code == 2  # argparse's status for a bad command line
    err = capsys.readouterr().err
    assert f"argument {args[0]}" in err and ("must be" in err or "expected" in err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [
    (["copy", "--hidden", "7"], "--model nnrnn needs an even --hidden"),
    (["adding", "--T", "1"], "the adding task needs --T >= 2"),
    (["copy", "--device", "tpu"], "--device must be cpu, cuda, cuda:INDEX or auto"),
    (["copy", "--device", "gpu0"], "--device must be cpu, cuda, cuda:INDEX or auto"),
])
def test_inconsistent_options_are_refused_up_front(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        train.main(args + ["--out-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path):
    with pytest.raises(SystemExit, match="CUDA is not available on this machine"):
        train.main(["copy", "--device", "cuda", "--out-dir", str(tmp_path)])


# ---------------------------------------------------------------- signals and exit codes

def test_second_ctrl_c_during_plotting_exits_cleanly(tmp_path, monkeypatch, capsys):
    """The first Ctrl-C (in step 2) stops the loop and saves a checkpoint; a second one during
    the plots stops at once with the interrupted status, no traceback, and the handlers restored."""
    original = signal.getsignal(signal.SIGINT)
    calls = []
    penalty = train.loop.delta_penalty

    def penalty_then_ctrl_c(model, delta):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return penalty(model, delta)

    def plot_then_ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("the second Ctrl-C did not stop the command")

    monkeypatch.setattr(train.loop, "delta_penalty", penalty_then_ctrl_c)
    monkeypatch.setattr(train.loop, "plot_curves", plot_then_ctrl_c)
    status = train.main(TINY_COPY + ["--steps", "100", "--checkpoint-every", "0", "--out-dir", str(tmp_path)])
    assert status == train.cli.EXIT_INTERRUPTED
    captured = capsys.readouterr()
    assert "interrupted at step 2" in captured.out and "stopped at once" in captured.err
    assert train.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2
    assert signal.getsignal(signal.SIGINT) is original


def test_sigterm_in_process_is_handled_like_ctrl_c(tmp_path, monkeypatch):
    original = signal.getsignal(signal.SIGTERM)
    penalty = train.loop.delta_penalty
    calls = []

    def penalty_then_sigterm(model, delta):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return penalty(model, delta)

    monkeypatch.setattr(train.loop, "delta_penalty", penalty_then_sigterm)
    status = train.main(TINY_COPY + ["--steps", "100", "--checkpoint-every", "0", "--out-dir", str(tmp_path)])
    assert status == train.cli.EXIT_INTERRUPTED
    assert train.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3
    assert [r["step"] for r in train_rows(tmp_path)] == [1, 2, 3]
    assert signal.getsignal(signal.SIGTERM) is original
    assert train.main(["--resume", str(tmp_path / "checkpoint.pt"), "--steps", "4"]) == 0


def test_nan_log_p_is_reported_as_a_nan_loss(tmp_path, checkpoint):
    """A non-finite log_P makes the CPU matrix exponential (eigh) fail before any loss exists."""
    payload = train.load_checkpoint(checkpoint)
    payload["model"][LOG_P][0, 1] = float("nan")
    path = str(tmp_path / "checkpoint.pt")
    train.checkpoint.save_checkpoint(path, payload)
    with pytest.raises(SystemExit, match=f"the loss became nan at step 3 .*{LOG_P}.*try a smaller --lr"):
        train.main(["--resume", path, "--steps", "4"])


# ---------------------------------------------------------------- checkpoints

def damaged_copies(src, tmp_path):
    """(name, path, expected message) for every kind of bad checkpoint file."""
    data = src.read_bytes()
    payload = train.load_checkpoint(src)
    tensor = payload["model"][LOG_P].numpy().tobytes()
    at = data.find(tensor)
    assert at > 0
    flipped = bytearray(data)
    for i in range(at, at + 16):
        flipped[i] ^= 0xFF
    cases = {
        "truncated": (data[:len(data) // 2], "truncated: \\d+ of its \\d+ bytes are present"),
        "truncated header": (data[:10], "truncated inside its header"),
        "empty": (b"", "the file is empty"),
        "random bytes": (os.urandom(4096), "not a checkpoint of nnrnn-train"),
        "flipped bytes in a tensor": (bytes(flipped), "corrupted: its SHA-256 checksum does not match"),
        "extra bytes": (data + b"\0" * 5, "5 unexpected bytes follow"),
        "damaged checksum line": (data.replace(b"sha256 ", b"sha257 ", 1), "its checksum line is damaged"),
    }
    out = []
    for name, (content, message) in cases.items():
        path = tmp_path / name.replace(" ", "_")
        path.write_bytes(content)
        out.append((name, path, message))
    plain = tmp_path / "plain_torch_save.pt"  # torch.save without the header: not accepted
    torch.save(payload, plain)
    out.append(("plain torch.save", plain, "not a checkpoint of nnrnn-train"))
    partial = tmp_path / "partial.pt"
    train.checkpoint.save_checkpoint(str(partial), {"config": payload["config"], "step": 1})
    out.append(("lacks entries", partial, "not a training checkpoint: it lacks"))
    out.append(("missing", tmp_path / "no_such_file.pt", "No such file or directory"))
    out.append(("directory", tmp_path, "Is a directory"))
    return out


def test_every_bad_checkpoint_is_refused_in_one_line(tmp_path, checkpoint):
    for name, path, message in damaged_copies(checkpoint, tmp_path):
        with pytest.raises(SystemExit) as e:
            train.main(["--resume", str(path), "--out-dir", str(tmp_path / "out")])
        text = str(e.value.code)
        prefix = f"nnrnn-train: cannot resume from {path}: "
        assert text.startswith(prefix), (name, text)
        assert re.search(message, text), (name, text)
        assert "\n" not in text and "weights_only=False" not in text, (name, text)


def test_checkpoint_of_another_task_or_size_is_refused(tmp_path, checkpoint):
    prefix = f"nnrnn-train: cannot resume from {checkpoint}: "
    with pytest.raises(SystemExit, match="it is a checkpoint of the copy task, not ptb") as e:
        train.main(["ptb", "--resume", str(checkpoint)])
    assert str(e.value.code).startswith(prefix)
    with pytest.raises(SystemExit, match="these options cannot change: hidden"):
        train.main(["--resume", str(checkpoint), "--hidden", "16"])
    # a payload whose model is of another size than its configuration says
    other = tmp_path / "other"
    run_cli(TINY_COPY + ["--steps", "1", "--hidden", "16"], other)
    mixed = train.load_checkpoint(checkpoint)
    mixed["model"] = train.load_checkpoint(other / "checkpoint.pt")["model"]
    path = str(tmp_path / "mixed.pt")
    train.checkpoint.save_checkpoint(path, mixed)
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", path, "--steps", "3", "--out-dir", str(tmp_path / "out")])
    text = str(e.value.code)
    assert text.startswith(f"nnrnn-train: cannot resume from {path}: its stored state does not fit its "
                           "configuration") and "size mismatch" in text and "\n" not in text


def test_resume_before_the_checkpoint_step_is_refused(checkpoint):
    with pytest.raises(SystemExit, match="it is at step 2, past --steps 1"):
        train.main(["--resume", str(checkpoint), "--steps", "1"])


def test_resume_with_other_threads_says_it_is_not_bit_exact(tmp_path, capsys):
    """docs/training.md: --threads may change on resume; the run continues from the same state
    (the losses stay close), but is bit for bit only with the same threads, and says so."""
    full, part = tmp_path / "full", tmp_path / "part"
    run_cli(TINY_COPY + ["--steps", "5", "--threads", "1"], full)
    run_cli(TINY_COPY + ["--steps", "3", "--threads", "1"], part)
    capsys.readouterr()
    assert train.main(["--resume", str(part / "checkpoint.pt"), "--steps", "5", "--threads", "2"]) == 0
    assert "note: CPU threads 1 -> 2 since the checkpoint" in capsys.readouterr().out
    a, b = train_rows(full), train_rows(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4)
    assert train.main(["--resume", str(part / "checkpoint.pt"), "--steps", "6", "--threads", "2"]) == 0
    assert "note:" not in capsys.readouterr().out  # the same threads as when it was written


# ---------------------------------------------------------------- the package's layout

def test_train_modules_import_only_downwards():
    """nnrnn_fused.train: cli -> loop -> the lower modules, so no import cycle can form."""
    layers = ["cli", "loop", "data", "checkpoint", "metrics", "plots", "devices"]
    package = os.path.dirname(train.__file__)
    modules = sorted(f[:-3] for f in os.listdir(package) if f.endswith(".py"))
    assert modules == sorted(layers + ["__init__", "__main__"])
    for index, name in enumerate(layers):
        with open(os.path.join(package, name + ".py")) as f:
            tree = ast.parse(f.read())
        imported = {node.module for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.level == 1}
        assert imported <= set(layers[index + 1:]), f"{name} imports {sorted(imported)}"


def test_console_script_is_the_package_main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        module, name = tomllib.load(f)["project"]["scripts"]["nnrnn-train"].split(":")
    assert getattr(importlib.import_module(module), name) is train.main


@pytest.mark.parametrize("cpus, threads", [(1, 1), (2, 1), (3, 1), (4, 2), (64, 2)])
def test_copy_and_adding_take_two_threads_only_with_cpus_to_spare(monkeypatch, cpus, threads):
    monkeypatch.setattr(train.devices, "usable_cpus", lambda: cpus)
    for task in ("copy", "adding"):
        assert train.cli.resolve_config({"task": task})["threads"] == threads
        assert train.cli.resolve_config({"task": task, "threads": 2})["threads"] == 2  # as given
    assert train.cli.resolve_config({"task": "psmnist"})["threads"] == 0  # torch's default
