"""Signals read from the optimizer: the momentum of the dense gradient, and state resets."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def _group_of(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> dict[str, Any]:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise KeyError("parameter not held by the optimizer")


def keeps_momentum(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> bool:
    """Whether the optimizer keeps a momentum-like state for ``param`` (else the engine keeps an
    exponential moving average of the gradient itself)."""
    group = _group_of(optimizer, param)
    if "betas" in group:  # Adam, AdamW, NAdam, RAdam, Adamax
        return True
    momentum = group.get("momentum", 0)
    return isinstance(momentum, (int, float)) and momentum > 0  # SGD, RMSprop with momentum


def optimizer_momentum(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> Tensor | None:
    """The optimizer's momentum of the dense gradient for ``param``, or ``None`` if it has none.

    Adam family: ``exp_avg / (sqrt(exp_avg_sq) + eps)`` (Adamax: ``exp_avg / (exp_inf + eps)``);
    SGD and RMSprop: ``momentum_buffer``.
    """
    state: dict[str, Any] = optimizer.state.get(param, {})
    if "exp_avg" in state:
        eps = float(_group_of(optimizer, param).get("eps", 1e-8))
        exp_avg: Tensor = state["exp_avg"]
        if "exp_avg_sq" in state:
            exp_avg_sq: Tensor = state["exp_avg_sq"]
            return exp_avg / (exp_avg_sq.sqrt() + eps)
        if "exp_inf" in state:
            exp_inf: Tensor = state["exp_inf"]
            return exp_avg / (exp_inf + eps)
    buf = state.get("momentum_buffer")
    if isinstance(buf, Tensor):
        return buf
    return None


@torch.no_grad()
def reset_state(optimizer: torch.optim.Optimizer, param: nn.Parameter, positions: Tensor) -> None:
    """Zero every per-weight optimizer state tensor of ``param`` at the ``positions`` (bool)."""
    for value in optimizer.state.get(param, {}).values():
        if isinstance(value, Tensor) and value.shape == param.shape:
            value.masked_fill_(positions.to(value.device), 0)
