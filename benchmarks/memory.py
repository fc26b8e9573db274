"""Memory kept for the backward pass."""
from __future__ import annotations

import torch


class SavedTensorBytes:
    """Counts the bytes of the distinct storages autograd saves for backward while active
    (CPU and CUDA alike): what a forward pass keeps alive until its backward."""

    def __init__(self):
        self.storages = {}

    def _pack(self, t):
        s = t.untyped_storage()
        self.storages[(s.device, s.data_ptr())] = s.nbytes()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())
