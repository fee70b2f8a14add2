"""Dropout with a hashed mask: the same distribution as :func:`torch.nn.functional.dropout`,
made many times faster on the CPU.

PyTorch's CPU dropout draws its mask from one sequential random stream (``bernoulli_``), and in
a wide network that costs more than the layers it sits between once they are sparse. Here
element ``i`` of a call is kept when a hash of (a seed, ``i``) falls below ``(1 - p) * 2**32``:
the mask needs no state, so the compiled kernel makes it in parallel, vectorised, and the
backward makes it again instead of keeping it. The seed is drawn from PyTorch's default
generator, so ``torch.manual_seed`` fixes the masks; both kernel backends give the same bits, on
any number of threads. The masks differ from those of ``F.dropout`` with the same seed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..kernels import kernels_for
from ..kernels import ops as kops


class _DropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, keep: float, seed: Tensor, kernels: int) -> Tensor:
        ctx.keep, ctx.kernels = keep, kernels
        ctx.save_for_backward(seed)
        y: Tensor = kops.dropout(x, keep, seed, kernels)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        # the same mask and scale: dropout is its own adjoint
        (seed,) = ctx.saved_tensors
        return kops.dropout(grad, ctx.keep, seed, ctx.kernels), None, None, None


def dropout(x: Tensor, p: float = 0.5, training: bool = True, backend: str = "auto") -> Tensor:
    """``F.dropout(x, p, training)`` with a hashed mask (see the module's docstring).

    ``backend``: ``"auto"`` (the compiled kernels on CPU float32/float64, PyTorch operations
    elsewhere), ``"cpp"`` or ``"torch"``, as for the sparse layers.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be a number in [0, 1], got {p!r}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    # a tensor: a compiled graph draws it as it runs (an int would be fixed when it is traced)
    seed = torch.randint(0, 2**63 - 1, (), dtype=torch.int64)
    kernels = kernels_for(x, backend)
    y: Tensor = _DropoutFn.apply(x, 1.0 - float(p), seed, kernels)  # type: ignore[no-untyped-call]
    return y


class Dropout(nn.Module):
    """``nn.Dropout`` with a hashed mask (:func:`dropout`)."""

    def __init__(self, p: float = 0.5, backend: str = "auto") -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be a number in [0, 1], got {p!r}")
        self.p, self.backend = float(p), backend

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training, self.backend)

    def extra_repr(self) -> str:
        return f"p={self.p}, backend={self.backend}"
