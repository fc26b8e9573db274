"""The paper's training recipe (SPEC section 3): parameter groups, the separate
optimizer for log_P, T decay and the delta penalty on the gammas."""
from __future__ import annotations

import torch
from torch import nn

from .optim import RMSprop
from .parametrization import OrthogonalRecurrence, SchurRecurrence


def split_parameters(model: nn.Module):
    """(log_P parameters, T parameters, all other trainable parameters)."""
    orthogonal, schur_T = [], []
    for module in model.modules():
        if isinstance(module, (SchurRecurrence, OrthogonalRecurrence)):
            orthogonal.append(module.log_P)
        if isinstance(module, SchurRecurrence):
            schur_T.append(module.T)
    special = {id(p) for p in orthogonal + schur_T}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in special]
    return orthogonal, schur_T, rest


def parameter_groups(model: nn.Module, lr: float, t_decay: float):
    """Groups for the main optimizer: (a) everything but log_P and T at lr;
    (b) T at lr with weight decay t_decay. log_P goes to its own optimizer."""
    _, schur_T, rest = split_parameters(model)
    groups = [{"params": rest, "lr": lr, "weight_decay": 0.0}]
    if schur_T:
        groups.append({"params": schur_T, "lr": lr, "weight_decay": t_decay})
    return groups


def make_optimizers(model: nn.Module, *, lr: float, lr_orth: float, t_decay: float = 0.0,
                    optimizer: str = "rmsprop", alpha: float = 0.99, betas=(0.9, 0.999)):
    """The two optimizers of the recipe: (main, orthogonal or None).

    optimizer "rmsprop" (with `alpha`; nnrnn_fused.optim.RMSprop, torch's with a fused CPU step) or
    "adam" (with `betas`); the log_P optimizer is of the same kind at lr_orth, None when the model
    has no log_P.
    """
    if optimizer not in ("rmsprop", "adam"):
        raise ValueError(f"optimizer must be 'rmsprop' or 'adam', got {optimizer!r}")

    def build(groups, rate):
        if optimizer == "rmsprop":
            return RMSprop(groups, lr=rate, alpha=alpha)
        return torch.optim.Adam(groups, lr=rate, betas=betas)

    orthogonal, _, _ = split_parameters(model)
    main = build(parameter_groups(model, lr, t_decay), lr)
    orth = build([{"params": orthogonal}], lr_orth) if orthogonal else None
    return main, orth


def delta_penalty(model: nn.Module, delta: float) -> torch.Tensor:
    """delta * sum_i (gamma_i - 1)^2 over every nnRNN layer of the model."""
    terms = [((m.gammas - 1) ** 2).sum() for m in model.modules() if isinstance(m, SchurRecurrence)]
    if not terms:
        return torch.zeros(())
    return delta * torch.stack(terms).sum()
