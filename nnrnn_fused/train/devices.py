"""The device of a run, and the helpers of distributed (DDP) runs: a process's part of a global batch and
the whole from the parts."""
from __future__ import annotations

import os

import torch

from .. import _extension


def pick_device(cfg) -> torch.device:
    """The device of the run, with an index for CUDA, made the current CUDA device."""
    name = cfg["device"]
    if cfg["distributed"] and torch.cuda.is_available() and name in ("auto", "cuda"):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    elif name == "auto":
        usable = torch.cuda.is_available() and (cfg["model"] == "lstm" or _extension.WITH_CUDA
                                                or cfg["backend"] != "fused")  # the references run anywhere
        device = torch.device("cuda" if usable else "cpu")
    else:
        device = torch.device(name)
    if device.type == "cuda":
        if device.index is None:  # torch.cuda.set_device needs an index; "cuda" means the current device
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def map_state(state, fn):
    """Apply fn to every tensor of a carried state (a tensor or an LSTM (h, c) pair)."""
    if state is None:
        return None
    return tuple(fn(s) for s in state) if isinstance(state, (tuple, list)) else fn(state)


def shard(t, dim, rank, world):
    """This rank's equal part of a global batch along dim."""
    if world == 1:
        return t
    size = t.shape[dim]
    if size % world:
        raise SystemExit(f"nnrnn-train: the global batch ({size}) must be divisible by the number of "
                         f"processes ({world})")
    return t.narrow(dim, rank * (size // world), size // world)


def gather(t, dim, world):
    """The global tensor from every rank's part along dim (inverse of shard)."""
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim)
