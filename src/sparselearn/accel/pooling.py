"""Max pooling over non-overlapping windows, compiled: the outputs and gradients of
:func:`torch.nn.functional.max_pool2d` with ``stride = kernel_size`` and no padding, bit for
bit (the same maximum, and the gradient at the same input where a window holds equal maxima).

PyTorch's CPU max pooling records a 64-bit index per output and runs at a few GB/s, which in
a small convolutional network costs more than its sparse convolutions (docs/performance.md);
the compiled kernel compares 16 windows at once (along an output row, or on planes whose rows
are narrower, through a gather over several rows and planes) and keeps a one-byte place in the
window, only when a gradient will need it. Float64 outputs narrower than 8 go to PyTorch's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..kernels import kernels_for
from ..kernels import ops as kops

# Float64 outputs narrower than this pool with PyTorch's kernel: the compiled one vectorises
# float64 along output rows only, and on narrow ones its per-row work costs more than PyTorch's
# (float32 narrow planes have a kernel of their own: docs/performance.md)
_MIN_OUTPUT_WIDTH = 8


def _check_kernel_size(kernel_size: object) -> None:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")


class _MaxPoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, k: int, kernels: int) -> Tensor:
        y: Tensor
        y, index = kops.max_pool2d(x, k, ctx.needs_input_grad[0], kernels)
        ctx.save_for_backward(index)
        ctx.k, ctx.kernels, ctx.hw = k, kernels, x.shape[2:]
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (index,) = ctx.saved_tensors
        gx = kops.max_pool2d_backward(grad, index, *ctx.hw, ctx.k, ctx.kernels)
        return gx, None, None


def max_pool2d(x: Tensor, kernel_size: int, backend: str = "auto") -> Tensor:
    """``F.max_pool2d(x, kernel_size)`` (stride ``kernel_size``, no padding) on an (N, C, H, W)
    input; ``backend`` as for the sparse layers (the compiled kernels on CPU float32/float64)."""
    _check_kernel_size(kernel_size)
    if x.dim() != 4:
        raise ValueError(f"max_pool2d takes an (N, C, H, W) input, got shape {tuple(x.shape)}")
    if min(x.shape[2:]) < kernel_size:
        raise ValueError(
            f"the {kernel_size}x{kernel_size} window does not fit the {tuple(x.shape[2:])} input"
        )
    narrow = x.shape[3] // kernel_size < _MIN_OUTPUT_WIDTH
    if kernel_size > 16 or (narrow and x.dtype != torch.float32):
        # a window's place is kept in one byte; on narrow float64 planes PyTorch's is faster
        return nn.functional.max_pool2d(x, kernel_size)
    kernels = kernels_for(x, backend)
    y: Tensor = _MaxPoolFn.apply(x, kernel_size, kernels)  # type: ignore[no-untyped-call]
    return y


class MaxPool2d(nn.Module):
    """``nn.MaxPool2d(kernel_size)`` (stride ``kernel_size``, no padding) on the compiled kernel
    (:func:`max_pool2d`)."""

    def __init__(self, kernel_size: int, backend: str = "auto") -> None:
        super().__init__()
        _check_kernel_size(kernel_size)
        self.kernel_size, self.backend = kernel_size, backend

    def forward(self, x: Tensor) -> Tensor:
        return max_pool2d(x, self.kernel_size, self.backend)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, backend={self.backend}"
