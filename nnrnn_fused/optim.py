"""RMSprop, the paper's optimizer, with its CPU step fused into one C++ call per parameter group.

`RMSprop` is `torch.optim.RMSprop` (same arguments, state and state_dict, so checkpoints move
freely between the two); only `step()` differs. Where every parameter with a gradient is a dense,
contiguous float32 or float64 CPU tensor, the group is neither `capturable` nor `differentiable`
and has a float lr, and the extension is built, each group is updated by one call of the
`nnrnn_fused::rmsprop_step_` op, with torch's arithmetic in torch's order (to about an ulp a step:
tests/test_optim.py). Anywhere else (CUDA, half precision, sparse or non-contiguous gradients, a
tensor lr) the step is torch's own, as fast as it is in torch.

Why: an nnRNN has few, small parameters besides W (eight tensors, 35K numbers in the copy task), and
torch's RMSprop spends five to eight tensor operations and some Python on each of them. The copy
task's two steps: 240-330 -> 70-100 µs by themselves, about 0.3 ms of a 6.5 ms training iteration
(one thread; docs/cpu.md).
"""
from __future__ import annotations

import torch

from . import _extension


if _extension.LOADED:
    @torch.library.register_fake("nnrnn_fused::rmsprop_step_")
    def _(params, grads, square_avgs, grad_avgs, momentum_buffers, steps, lr, alpha, eps, weight_decay, momentum,
          centered, maximize):
        return None


class RMSprop(torch.optim.RMSprop):
    """torch.optim.RMSprop, the same arguments and state; its CPU step is one C++ call per parameter
    group (see the module's docstring for where it applies)."""

    @torch.no_grad()
    def step(self, closure=None):
        if not (_extension.LOADED and all(self._fusable(group) for group in self.param_groups)):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # torch's own bookkeeping: the parameters with gradients, their state (created as torch creates
            # it), and the lists in the order the op takes them; momentum buffers and gradient averages
            # only where the group has momentum or is centered, as the op expects
            params, grads, square_avgs, momentum_buffers, grad_avgs, steps = [], [], [], [], [], []
            self._init_group(group, params, grads, square_avgs, momentum_buffers, grad_avgs, steps)
            if params:
                torch.ops.nnrnn_fused.rmsprop_step_(
                    params, grads, square_avgs, grad_avgs, momentum_buffers, steps, float(group["lr"]),
                    group["alpha"], group["eps"], group["weight_decay"], group["momentum"], group["centered"],
                    group["maximize"])
        return loss

    def _fusable(self, group: dict) -> bool:
        if group["capturable"] or group["differentiable"] or isinstance(group["lr"], torch.Tensor):
            return False
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if not (p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) and p.is_contiguous()
                    and not grad.is_sparse and grad.dtype == p.dtype and grad.is_contiguous()
                    and all(t.is_contiguous() for t in self.state[p].values())):
                return False
        return True
