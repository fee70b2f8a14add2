"""``add_relu_(x, other)``: ``F.relu(x.add_(other), inplace=True)``, the end of a residual block,
whose backward reads the float output.

The same numbers as the two operations, eagerly. Compiled, it keeps a graph from saving the
ReLU's mask for the backward as a bool tensor: the gradient comes from an operator
(:func:`~sparselearn.kernels.ops.relu_grad`) that reads the output, and inductor's CPU code
stores bool tensors slowly (docs/performance.md, "Compiled": a compiled ResNet-18 step spent
more time storing its masks than its additions and ReLUs took eagerly).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..kernels import REFERENCE
from ..kernels import ops as kops


class _AddReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, other: Tensor) -> Tensor:
        ctx.mark_dirty(x)
        x.add_(other).relu_()
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        (out,) = ctx.saved_tensors
        g: Tensor = kops.relu_grad(grad, out, REFERENCE)
        return g, g


def add_relu_(x: Tensor, other: Tensor) -> Tensor:
    """``F.relu(x.add_(other), inplace=True)`` (``other`` of ``x``'s shape), ``x`` modified in
    place and returned, with the same gradients (see the module's docstring)."""
    if other.shape != x.shape:
        raise ValueError(
            f"add_relu_ adds a tensor of x's shape {tuple(x.shape)}, got {tuple(other.shape)}"
        )
    y: Tensor = _AddReLU.apply(x, other)  # type: ignore[no-untyped-call]
    return y
