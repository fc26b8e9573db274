"""The checkpoint files of nnrnn-train: written atomically, checked (size, SHA-256, contents) when loaded."""
from __future__ import annotations

import hashlib
import io
import os

import torch

# A checkpoint file: the header line, a line "sha256 HEX bytes SIZE", then SIZE bytes written by
# torch.save. The checksum catches corruption that torch.load would not notice (it reads flipped
# bytes inside a tensor without complaint).
CHECKPOINT_HEADER = b"nnrnn-train checkpoint v1\n"
CHECKPOINT_KEYS = {"config", "step", "model", "main_opt", "orth_opt", "rng", "state", "rows", "best_valid",
                   "eig_before", "elapsed"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why."""


def save_checkpoint(path, payload):
    """Write atomically (a temporary file, then a rename): a crash leaves the previous checkpoint."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(CHECKPOINT_HEADER + f"sha256 {hashlib.sha256(body).hexdigest()} bytes {len(body)}\n".encode())
        f.write(body)
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    """The payload of a checkpoint written by save_checkpoint, after checking its size and checksum.
    Loads with weights_only=True (no code runs). Raises CheckpointError saying what is wrong."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(e.strerror or str(e)) from None
    if not data:
        raise CheckpointError("the file is empty")
    if not data.startswith(CHECKPOINT_HEADER):
        if CHECKPOINT_HEADER.startswith(data):
            raise CheckpointError(f"truncated inside its header ({len(data)} bytes)")
        raise CheckpointError("not a checkpoint of nnrnn-train (it does not start with "
                              f"{CHECKPOINT_HEADER.decode().strip()!r})")
    end = data.find(b"\n", len(CHECKPOINT_HEADER))
    if end < 0:
        raise CheckpointError(f"truncated inside its header ({len(data)} bytes)")
    try:
        label, digest, unit, size = data[len(CHECKPOINT_HEADER):end].decode("ascii").split()
        size = int(size)
        if (label, unit) != ("sha256", "bytes") or len(digest) != 64:
            raise ValueError
    except ValueError:  # UnicodeDecodeError is a ValueError
        raise CheckpointError("its checksum line is damaged") from None
    body = data[end + 1:]
    if len(body) < size:
        raise CheckpointError(f"truncated: {len(body)} of its {size} bytes are present")
    if len(body) > size:
        raise CheckpointError(f"{len(body) - size} unexpected bytes follow its {size} bytes")
    if hashlib.sha256(body).hexdigest() != digest:
        raise CheckpointError("corrupted: its SHA-256 checksum does not match the one written with it")
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as e:  # intact but unreadable, e.g. written by an incompatible torch
        raise CheckpointError(f"torch.load (weights_only) cannot read it: {type(e).__name__}") from None
    missing = CHECKPOINT_KEYS - set(payload) if isinstance(payload, dict) else CHECKPOINT_KEYS
    if missing:
        raise CheckpointError(f"not a training checkpoint: it lacks {', '.join(sorted(missing))}")
    return payload
