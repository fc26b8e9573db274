"""The training loop of nnrnn-train: run() trains a resolved configuration, from the start or from a
checkpoint, logging, evaluating, checkpointing and plotting as it goes; stop_on_signals() turns Ctrl-C and
SIGTERM into a stop after the current step."""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import signal
import time

import torch
from torch import nn

from ..layer import count_free_parameters
from ..models import SequenceModel
from ..recipe import delta_penalty, make_optimizers
from .checkpoint import CheckpointError, save_checkpoint
from .data import DATA
from .devices import gather, keep_freed_memory, map_state, pick_device, shard, usable_cpus
from .metrics import write_metrics
from .plots import plot_curves, plot_eigenvalues


# ----------------------------------------------------------------------------- helpers

def build_model(cfg, data) -> SequenceModel:
    return SequenceModel(cfg["model"], data.input_size, cfg["hidden"], data.output_size, readout=data.readout,
                         vocab_size=getattr(data, "vocab_size", None), nonlinearity=cfg["nonlinearity"],
                         init=cfg["init"], input_init=cfg["input_init"], exact_spectrum=cfg["exact_spectrum"],
                         backend=cfg["backend"], readout_init=cfg.get("readout_init", "xavier"))


def halve_lr_on_plateau(optimizers, best_valid, valid_loss) -> bool:
    """PTB schedule: halve every learning rate after an epoch whose validation loss
    did not improve on the best so far. Returns whether it did."""
    if best_valid is None or valid_loss < best_valid:
        return False
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] /= 2
    return True


def eigenvalues(model):
    with torch.no_grad():
        W = model.recurrent_matrix()
        return None if W is None else torch.view_as_real(torch.linalg.eigvals(W.detach().double().cpu()))


# ----------------------------------------------------------------------------- training

def run(cfg: dict, resume: dict | None = None, stop: list | None = None) -> dict:
    """Train with a resolved configuration (optionally from a checkpoint); returns the summary.
    The loop stops after the step in which `stop` (see stop_on_signals) became non-empty."""
    rank, world, own_group = 0, 1, False
    if cfg["distributed"]:
        import torch.distributed as dist
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and cfg["device"] in ("auto", "cuda") else "gloo"
            dist.init_process_group(backend)
            own_group = True
        rank, world = dist.get_rank(), dist.get_world_size()
    device = pick_device(cfg)
    if cfg["threads"]:  # more threads than the process may use only slow the step's barriers down
        torch.set_num_threads(min(cfg["threads"], usable_cpus()))
    if device.type == "cpu":
        keep_freed_memory()
    main_process = rank == 0
    out_dir = cfg["out_dir"]
    if main_process:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)

    torch.manual_seed(cfg["seed"])
    try:
        data = DATA[cfg["task"]](cfg)
    except (OSError, ValueError) as e:
        raise SystemExit(f"nnrnn-train: {e}") from None
    model = build_model(cfg, data).to(device, getattr(torch, cfg["dtype"]))
    main_opt, orth_opt = make_optimizers(
        model, lr=cfg["lr"], lr_orth=cfg["lr"] if cfg["model"] == "orthrnn" else cfg["lr_orth"],
        t_decay=cfg["t_decay"], optimizer=cfg["optimizer"], alpha=cfg["alpha"], betas=cfg["betas"])
    optimizers = [o for o in (main_opt, orth_opt) if o is not None]
    spe = data.steps_per_epoch
    total_steps = cfg["steps"] if "steps" in cfg else cfg["epochs"] * spe

    step, rows, state, best_valid, elapsed = 0, [], None, None, 0.0
    eig_before = eigenvalues(model)
    if resume is not None:
        try:
            model.load_state_dict(resume["model"])
            main_opt.load_state_dict(resume["main_opt"])
            if orth_opt is not None:
                orth_opt.load_state_dict(resume["orth_opt"])
            torch.set_rng_state(resume["rng"])
            step, rows, best_valid = resume["step"], resume["rows"], resume["best_valid"]
            eig_before, elapsed = resume["eig_before"], resume["elapsed"]
            state = map_state(resume["state"], lambda s: shard(s, 1, rank, world).to(device))
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CheckpointError("its stored state does not fit its configuration: "
                                  + " ".join(str(e).split())[:300]) from None
        if main_process:
            print_resume_note(resume, device)

    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    ckpt_path = os.path.join(out_dir, "checkpoint.pt")

    def checkpoint():
        full_state = map_state(state, lambda s: gather(s, 1, world).cpu())
        if main_process:
            save_checkpoint(ckpt_path, {
                "config": cfg, "step": step, "model": model.state_dict(), "main_opt": main_opt.state_dict(),
                "orth_opt": orth_opt.state_dict() if orth_opt is not None else None,
                "rng": torch.get_rng_state(), "state": full_state, "rows": rows, "best_valid": best_valid,
                "eig_before": eig_before, "elapsed": elapsed + time.perf_counter() - start,
                "device": str(device), "threads_used": torch.get_num_threads()})

    requested = stop if stop is not None else []

    if main_process:
        print(f"nnrnn-train {cfg['task']} --model {cfg['model']}: N={cfg['hidden']}, "
              f"{count_free_parameters(model):,} parameters, {total_steps} steps"
              f"{f' ({spe} per epoch)' if spe else ''}, device {device}"
              f"{f', {world} processes' if world > 1 else ''}, out {out_dir}", flush=True)
    progress = None
    if cfg["progress"] and main_process:
        from tqdm import tqdm
        progress = tqdm(total=total_steps, initial=step, desc=f"{cfg['task']}/{cfg['model']}",
                        dynamic_ncols=True)

    # Gradients that vanish over hundreds of steps (the LSTM's above all) reach float32's
    # denormal range, where x86 arithmetic is ~100x slower: flush them to zero while training.
    flush_denormal = device.type == "cpu" and torch.set_flush_denormal(True)
    start = time.perf_counter()
    stop = False
    try:
        while step < total_steps:
            epoch, i = divmod(step, spe) if spe else (0, step)
            if data.carries_state and i == 0:
                state = None
            x, y = data.train_batch(step)
            x = data.prepare(shard(x, 1, rank, world), device)
            y = data.prepare(shard(y, y.dim() - 1, rank, world), device)
            net.train()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            try:
                logits, new_state = net(x, state) if data.carries_state else net(x)
                loss, acc = data.loss(logits, y)
                (loss + delta_penalty(model, cfg["delta"]).to(device)).backward()
            except torch.linalg.LinAlgError:  # eigh of a non-finite log_P fails before any loss exists
                check_finite_parameters(model, step + 1)
                raise
            if cfg["clip"] > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
            for opt in optimizers:
                opt.step()
            if data.carries_state:
                state = map_state(new_state, torch.Tensor.detach)
            step += 1

            stats = torch.stack([loss.detach(), acc.detach()]).double()
            if world > 1:
                torch.distributed.all_reduce(stats)
                stats /= world
            loss_v, acc_v = stats.tolist()
            if not math.isfinite(loss_v):
                raise FloatingPointError(f"nnrnn-train: the loss became {loss_v} at step {step}; "
                                         "try a smaller --lr or --clip")
            lr_now = main_opt.param_groups[0]["lr"]
            if step % cfg["log_every"] == 0 or step == total_steps:
                row = {"step": step, "epoch": epoch, "split": "train", "loss": loss_v, "accuracy": acc_v,
                       "lr": lr_now, "elapsed_s": round(elapsed + time.perf_counter() - start, 3)}
                if cfg["task"] == "ptb":
                    row["bpc"] = loss_v / math.log(2)
                rows.append(row)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss_v:.4f}", acc=f"{acc_v:.3f}", refresh=False)

            epoch_end = bool(spe) and step % spe == 0
            if epoch_end or (spe and step == total_steps):
                model.eval()
                result = data.evaluate(model, "valid", device)
                rows.append({"step": step, "epoch": epoch, "split": "valid", "lr": lr_now,
                             "elapsed_s": round(elapsed + time.perf_counter() - start, 3), **result})
                if epoch_end:  # the schedule looks at whole epochs only
                    if cfg["task"] == "ptb":
                        halve_lr_on_plateau(optimizers, best_valid, result["loss"])
                    best_valid = result["loss"] if best_valid is None else min(best_valid, result["loss"])
                if progress is not None:
                    progress.write(f"epoch {epoch + 1}: valid "
                                   + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))

            stop = bool(requested)
            if world > 1:
                flag = torch.tensor([float(stop)], device=device)
                torch.distributed.all_reduce(flag)
                stop = flag.item() > 0
            if stop or (cfg["checkpoint_every"] and step % cfg["checkpoint_every"] == 0):
                checkpoint()
                if main_process:
                    write_metrics(rows, out_dir, cfg["metrics_format"])
            if stop:
                if main_process:
                    print(f"\ninterrupted at step {step}: saved {ckpt_path}; continue with "
                          f"nnrnn-train --resume {ckpt_path}", flush=True)
                break
    finally:
        if flush_denormal:
            torch.set_flush_denormal(False)
        if progress is not None:
            progress.close()
    interrupted = stop  # the same on every process (all-reduced)

    summary = {"task": cfg["task"], "model": cfg["model"], "step": step, "total_steps": total_steps,
               "parameters": count_free_parameters(model), "device": str(device), "processes": world,
               "train_seconds": round(elapsed + time.perf_counter() - start, 2),
               "interrupted": bool(interrupted)}
    if not interrupted:
        if spe:
            model.eval()
            summary["test"] = data.evaluate(model, "test", device)
            summary["valid"] = next((r for r in reversed(rows) if r["split"] == "valid"), None)
            rows.append({"step": step, "split": "test", "lr": main_opt.param_groups[0]["lr"],
                         **summary["test"]})
        train_rows = [r for r in rows if r["split"] == "train"][-10:]
        summary["final_train_loss"] = train_rows[-1]["loss"] if train_rows else None
        summary["final_train_loss_mean10"] = sum(r["loss"] for r in train_rows) / max(len(train_rows), 1)
        summary["final_train_accuracy"] = train_rows[-1]["accuracy"] if train_rows else None
        if data.baseline is not None:
            summary["baseline"] = data.baseline
        checkpoint()
    if main_process:
        write_metrics(rows, out_dir, cfg["metrics_format"])
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        label = f"{cfg['task']} {cfg['model']} N={cfg['hidden']}"
        plot_curves({cfg["model"]: rows}, os.path.join(out_dir, "curves.png"), data.baseline, label)
        eig_after = eigenvalues(model)
        if eig_after is not None:
            plot_eigenvalues(eig_before, eig_after, os.path.join(out_dir, "eigenvalues.png"), f"W of {label}")
        if not interrupted:
            print(report(summary), flush=True)
    if cfg["distributed"]:
        # Free DDP (its reducer holds the process group) while the interpreter is fully
        # alive, and leave together: a gloo group still alive at interpreter exit was
        # seen to abort the process (std::terminate) after training had finished.
        net = None
        gc.collect()
        torch.distributed.barrier()
    if own_group:
        torch.distributed.destroy_process_group()
    return summary


def check_finite_parameters(model, step):
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"nnrnn-train: the loss became nan at step {step} (parameters that are not "
                                 f"finite: {', '.join(bad)}); try a smaller --lr or --clip")


def print_resume_note(resume, device):
    """Say when a resumed run cannot continue bit for bit (docs/training.md, "Resuming")."""
    changes = []
    if resume.get("device") not in (None, str(device)):
        changes.append(f"device {resume['device']} -> {device}")
    if device.type == "cpu" and resume.get("threads_used") not in (None, torch.get_num_threads()):
        changes.append(f"CPU threads {resume['threads_used']} -> {torch.get_num_threads()}")
    if changes:
        print(f"note: {', '.join(changes)} since the checkpoint: the run continues from the same state, but "
              "its rounding (and so its trajectory) can differ from an uninterrupted run's", flush=True)


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT (Ctrl-C) and SIGTERM ask the training loop to stop after the current step (it then
    saves a checkpoint); a second signal raises KeyboardInterrupt at once. Yields the request list."""
    requested = []

    def handler(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signal.Signals(signum).name)

    previous = {}
    if threading_main():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def report(summary) -> str:
    lines = [f"done: {summary['step']} steps in {summary['train_seconds']:.1f} s"]
    if "baseline" in summary and summary.get("final_train_loss") is not None:
        lines.append(f"final loss {summary['final_train_loss']:.4f} (mean of the last 10 logged steps "
                     f"{summary['final_train_loss_mean10']:.4f}); "
                     f"memoryless baseline {summary['baseline']:.4f}")
    if "test" in summary:
        lines.append("test: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["test"].items()))
    return "\n".join(lines)
