"""Models built on the meta device (shapes without values), materialised sparse: each
sparsified layer gets its active weights only, drawn from the layer's own initialisation, and
the model's other tensors are initialised as their modules do. No tensor of a sparsified
weight's size is ever made."""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from .layers import SparseWeight

BLOCK = 1 << 22
"""The most entries of a weight drawn at once (a block of its rows)."""


@torch.no_grad()
def draw_active(
    module: nn.Module, positions: Tensor, device: torch.device, dtype: torch.dtype
) -> tuple[SparseWeight, Tensor | None]:
    """The weight of ``module`` (a Linear or Conv2d on the meta device) held sparse with values
    at the flat ``positions`` (ascending), and its bias: both drawn by the module's own
    ``reset_parameters`` on copies of it that hold a block of its rows at a time.

    A block of rows has the layer's fan-in, so an initialisation that depends on the fan-in
    (PyTorch's Linear and Conv2d, normal(0, s)) draws each value as the whole layer's would;
    one that reads the fan-out (Xavier/Glorot) would see the block's."""
    weight = module.weight
    assert isinstance(weight, Tensor)
    shape = tuple(weight.shape)
    rows, fan_in = shape[0], math.prod(shape[1:])
    step = max(1, BLOCK // fan_in)
    block = copy.copy(module)  # its own parameter dict: the module keeps its meta tensors
    block._parameters = dict(module._parameters)
    has_bias = getattr(module, "bias", None) is not None
    values = torch.empty(positions.numel(), dtype=dtype, device=device)
    bias = torch.empty(rows, dtype=dtype, device=device) if has_bias else None
    bounds = torch.arange(0, rows + step, step).clamp_(max=rows) * fan_in
    cuts = torch.searchsorted(positions, bounds.to(positions.device)).tolist()
    for b, start in enumerate(range(0, rows, step)):
        stop = min(start + step, rows)
        block.weight = nn.Parameter(
            torch.empty((stop - start, *shape[1:]), dtype=dtype, device=device)
        )
        if has_bias:
            block.bias = nn.Parameter(torch.empty(stop - start, dtype=dtype, device=device))
        block.reset_parameters()  # type: ignore[operator]
        lo, hi = cuts[b], cuts[b + 1]
        at = (positions[lo:hi] - start * fan_in).to(device)
        values[lo:hi] = block.weight.reshape(-1)[at]
        if bias is not None:
            assert isinstance(block.bias, Tensor)
            bias[start:stop] = block.bias
    return SparseWeight.from_positions(shape, positions.to(device), values), bias


def check_initialisable(model: nn.Module) -> None:
    """Every module holding a meta tensor that sparsification does not replace can initialise
    itself (``reset_parameters``), so that materialising the rest of the model cannot leave
    a tensor with garbage in it."""
    missing = [
        name or type(module).__name__
        for name, module in model.named_modules()
        if _meta_tensors(module) and not callable(getattr(module, "reset_parameters", None))
    ]
    if missing:
        raise ValueError(
            f"{', '.join(missing[:5])} hold{'s' if len(missing) == 1 else ''} tensors on the "
            "meta device and no reset_parameters() to initialise them: give the module one, or "
            "build the model on a real device"
        )


def materialise_rest(
    model: nn.Module, device: torch.device, optimizer: torch.optim.Optimizer
) -> None:
    """Give every module that still holds meta tensors real ones on ``device``, initialised by
    its ``reset_parameters``; the optimizer holds the new parameters in place of the old."""
    for module in model.modules():
        if not _meta_tensors(module):
            continue
        old = dict(module.named_parameters(recurse=False))
        module.to_empty(device=device, recurse=False)
        with torch.no_grad():
            module.reset_parameters()  # type: ignore[operator]
        for name, new in module.named_parameters(recurse=False):
            replace_in_optimizer(optimizer, old[name], new)


def _meta_tensors(module: nn.Module) -> bool:
    return any(
        t.is_meta for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    )


def replace_in_optimizer(
    optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter
) -> None:
    """The optimizer holds ``new`` where it held ``old``; the old one's state is dropped (a
    caller that keeps it takes it first)."""
    if old is new:
        return
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    optimizer.state.pop(old, None)
