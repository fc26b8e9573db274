"""The device of a run, and the helpers of distributed (DDP) runs: a process's part of a global batch and
the whole from the parts."""
from __future__ import annotations

import ctypes
import os
import platform

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


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def small_model_threads() -> int:
    """The copy and adding presets' threads: two where the process may use at least four CPUs, else one.

    Two threads train the copy task 1.4x faster than one on an idle 2-core machine, but with one other
    busy process there they ran a step 4-6x slower than one thread (22-32 ms against 5.1: every parallel
    region waits for a descheduled member). Spare CPUs make that unlikely."""
    return 2 if usable_cpus() >= 4 else 1


# glibc's mallopt parameters and the values keep_freed_memory sets
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_KEEP = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TOP_PAD, 64 << 20), (_M_TRIM_THRESHOLD, 128 << 20))
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """With glibc, let the process reuse the memory it frees instead of handing it back to the kernel.

    A training step of a small model allocates and frees the same few MB each time. glibc's defaults
    map big blocks afresh (mmap) and trim the top of the heap, so the same memory page-faults again
    every step: 50 to 1100 faults a copy-task step here, about 10% of its time. Fixed thresholds (blocks
    up to 32 MiB from the heap, which grows by 64 MiB and gives back only beyond 128 MiB free) bring
    that to about one. Returns whether it changed anything: not on other C libraries, and not when the
    environment sets glibc's malloc (MALLOC_*_ variables or GLIBC_TUNABLES): the user's choice wins.
    """
    if platform.libc_ver()[0] != "glibc" or any(v in os.environ for v in _USER_SETTINGS):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    return mallopt is not None and all(mallopt(param, value) == 1 for param, value in _KEEP)


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
