""":class:`BatchNorm2d`: ``nn.BatchNorm2d``, optionally with the ReLU that follows it, in the
compiled kernels' few passes over memory.

PyTorch's CPU BatchNorm and a ReLU after it take about ten passes over an activation for a
training step, many over freshly allocated memory; once a network's convolutions are sparse
they cost a fifth of its step (docs/performance.md). The compiled kernel
(``kernels/csrc/norm.cpp``) normalises each channel from its statistics in two passes, applies
the ReLU as it writes, and in the backward recomputes the ReLU's mask from the input instead of
keeping the output. Where the kernels do not apply (CUDA, dtypes other than float32/float64,
inputs that are not contiguous NCHW, parameters of another dtype than the input, eval mode
with gradients wanted) the module is ``nn.BatchNorm2d`` followed by ``torch.relu``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..kernels import BACKENDS, REFERENCE, kernels_for
from ..kernels import ops as kops


class _BatchNormFn(torch.autograd.Function):
    """Training-mode batch normalisation (+ ReLU): y and, not differentiable, the batch's mean
    and biased variance per channel."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        relu: bool,
        kernels: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, mean, var, invstd = kops.batch_norm_forward(x, weight, bias, eps, relu, kernels)
        ctx.save_for_backward(x, mean, invstd, weight, bias)
        ctx.relu, ctx.kernels = relu, kernels
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_y: Tensor, _grad_mean: Tensor | None, _grad_var: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None]:
        x, mean, invstd, weight, bias = ctx.saved_tensors
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        gx, gw, gb = kops.batch_norm_backward(
            grad_y, x, mean, invstd, weight, bias, ctx.relu, want_x, ctx.kernels
        )
        return (
            gx if want_x else None,
            gw if want_w else None,
            gb if want_b else None,
            None,
            None,
            None,
        )


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same arguments, parameters, buffers and state-dict keys), followed by
    a ReLU when ``relu=True``, on the compiled kernels where they apply (see the module's
    docstring; elsewhere PyTorch's own BatchNorm).

    Results equal ``nn.BatchNorm2d`` (then ``torch.relu``) to rounding: the statistics are
    summed in double per channel, the output is ``x * scale + shift`` per channel as in
    PyTorch's CPU kernel, and the running statistics are updated as PyTorch does (the unbiased
    variance, ``momentum=None`` for a cumulative average). ``backend``: ``"auto"``, ``"cpp"`` or
    ``"torch"``, as for the sparse layers.

    With ``relu=True`` the module is more than a BatchNorm, and code that replaces BatchNorm
    layers by type drops the ReLU: ``nn.SyncBatchNorm.convert_sync_batchnorm`` makes a
    SyncBatchNorm without it. Keep ``relu=False`` (and a ReLU after) where BatchNorm will be
    synchronised.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        relu: bool = False,
        backend: str = "auto",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto', 'cpp' or 'torch', got {backend!r}")
        if not isinstance(relu, bool):
            raise ValueError(f"relu must be True or False, got {relu!r}")
        self.relu, self.backend = relu, backend

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        kernels = kernels_for(x, self.backend)
        if kernels == REFERENCE or not self._kernels_take(x):
            y = super().forward(x)
            # in place: BatchNorm's backward reads its input and statistics, not its output
            return torch.relu_(y) if self.relu else y
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative average
                factor = 1.0 / float(self.num_batches_tracked)
        if self._batch_statistics():
            y, mean, var = _BatchNormFn.apply(  # type: ignore[no-untyped-call]
                x, self.weight, self.bias, self.eps, self.relu, kernels
            )
            if self.training and self.running_mean is not None and self.running_var is not None:
                n = x.numel() // x.shape[1]
                with torch.no_grad():
                    self.running_mean.mul_(1.0 - factor).add_(mean, alpha=factor)
                    self.running_var.mul_(1.0 - factor).add_(var, alpha=factor * n / (n - 1))
            out: Tensor = y
            return out
        # eval: the running statistics (present: _batch_statistics() is False) as one affine map
        assert self.running_mean is not None
        assert self.running_var is not None
        with torch.no_grad():
            scale = torch.rsqrt(self.running_var + self.eps)
            if self.weight is not None:
                scale = scale * self.weight
            shift = -self.running_mean * scale
            if self.bias is not None:
                shift = shift + self.bias
        applied: Tensor = kops.batch_norm_apply(x, scale, shift, self.relu, kernels)
        return applied

    def _batch_statistics(self) -> bool:
        """Whether this call normalises with the batch's statistics (as nn.BatchNorm2d: in
        training, and without running statistics), else with the running ones."""
        return self.training or self.running_mean is None or self.running_var is None

    def _kernels_take(self, x: Tensor) -> bool:
        """Whether the compiled kernels compute this call (else PyTorch's BatchNorm does)."""
        if not x.is_contiguous() or x.numel() == 0:
            return False
        tensors = [self.weight, self.bias, self.running_mean, self.running_var]
        if any(t is not None and t.dtype != x.dtype for t in tensors):
            return False
        if self._batch_statistics():
            # one value per channel: PyTorch's error for it
            return x.numel() // x.shape[1] > 1
        # eval: the kernel has no backward through running statistics
        wanted = x.requires_grad or any(
            t is not None and t.requires_grad for t in (self.weight, self.bias)
        )
        return not (torch.is_grad_enabled() and wanted)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
            f"relu={self.relu}, backend={self.backend}"
        )
