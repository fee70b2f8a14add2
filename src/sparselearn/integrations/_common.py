"""What the trainer callbacks share: their arguments checked when they are created, the
optimizer inside a trainer's wrapper, and the log entries of mask updates."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..engine import MaskUpdate
from ..methods import make_config

REFUSED = {
    "total_steps": "it is taken from the trainer (the number of optimizer steps it will run)",
    "state": "the engine state is saved in and restored from the trainer's checkpoints",
}


def check_arguments(
    owner: str, method: str, density: float | None, options: dict[str, Any]
) -> None:
    """Refuse, when the callback is created, what :func:`sparselearn.sparsify` would refuse at
    train start, and the options a callback sets itself."""
    for key, why in REFUSED.items():
        if key in options:
            raise TypeError(f"{owner} does not take {key!r}: {why}")
    make_config(method, density, run_length_known=False, **options)


def with_epoch(options: dict[str, Any], steps_per_epoch: int) -> dict[str, Any]:
    """``update_every="epoch"`` takes the trainer's optimizer steps per epoch, unless
    ``steps_per_epoch`` was given (or the trainer has no epochs to count: 0, and the engine
    asks for it)."""
    if (
        options.get("update_every") == "epoch"
        and "steps_per_epoch" not in options
        and steps_per_epoch > 0
    ):
        return {**options, "steps_per_epoch": steps_per_epoch}
    return options


def inner_optimizer(optimizer: Any, owner: str) -> torch.optim.Optimizer:
    """The torch optimizer inside a trainer's wrapper (accelerate's ``AcceleratedOptimizer``
    keeps it as ``.optimizer``): the engine hooks the optimizer whose ``step`` updates the
    weights."""
    if optimizer is None:
        raise RuntimeError(f"{owner}: the trainer has no optimizer at train start")
    seen = 0
    while hasattr(optimizer, "optimizer") and seen < 8:
        inner = optimizer.optimizer
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer, seen = inner, seen + 1
    return optimizer  # type: ignore[no-any-return]


def update_log(update: MaskUpdate) -> dict[str, float]:
    """The trainer-log entry of one mask update."""
    return {
        "sparsity/density": update.density,
        "sparsity/pruned": float(update.total_pruned),
        "sparsity/regrown": float(update.total_grown),
    }


def check_weights_match(model: nn.Module, masks: Mapping[str, Tensor], source: str) -> None:
    """Weights restored by a trainer must be zero outside the masks they were saved with: a
    non-zero weight there means the engine state belongs to another run or step. (Names and
    shapes that do not match are reported by the engine's own state check.)"""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        param = params.get(name)
        if param is None or not isinstance(mask, Tensor) or mask.shape != param.shape:
            continue
        outside = int(torch.count_nonzero(param.detach()[~mask.to(param.device, torch.bool)]))
        if outside:
            raise ValueError(
                f"{source} does not belong to the restored weights: {name} has {outside} "
                "non-zero weights outside its saved mask (the checkpoint's model and its "
                "sparselearn state come from different runs or steps)"
            )
