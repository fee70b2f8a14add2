"""The operations every kernel backend implements, on a CSR weight (``crow``, ``col``, ``val``).

(The Linear kernels, on the panels of activations that ``panel_width`` sizes, are operators:
``ops.py``.)

- ``conv2d_forward(crow, col, val, x, out_channels, kh, kw, stride, ph, pw, bias=None) -> (y,
  saved)``: direct sparse convolution of an NCHW input padded by ``(ph, pw)`` (an optional bias
  added as the output is written), and what the backward reads, in a layout of the backend's
  (the compiled kernels keep a stride-1 batch of 16 or more as batch panels; the padded input
  otherwise; ``uses_panels(batch, kh, kw, dtype)`` says which); ``conv2d_backward(..., g,
  saved, ...)`` gives the gradients of the input inside the padding and of the non-zeros, each
  when asked, sharing what they both need;
- ``phase_planes(x, stride, ph, pw, hq, wq, count=None) -> planes`` and its adjoint
  ``phase_planes_grad``: the ``stride**2`` phase planes of the padded input, over which a
  strided convolution is a stride-1 one (``accel.layers``), or only the first ``count`` of them
  (the adjoint takes the others' gradient as zero); ``conv2d_forward_phases(crow, col, val, x,
  out_channels, kh, kw, stride, ph, pw, hq, wq, bias=None) -> (y, saved)`` is
  ``conv2d_forward`` of all the planes at stride 1 without padding (the compiled kernels pack
  the planes into batch panels straight from ``x``), its backward ``conv2d_backward`` of the
  planes then ``phase_planes_grad``;
- ``patches(x, kh, kw, stride, ph, pw, oh, ow) -> rows`` (im2col: each output position's input
  patch as a row of ``C * kh * kw``) and its adjoint ``patches_grad``;
- ``dropout(x, keep, seed) -> y``: ``x * (1 / keep)`` where the hash of (``seed``, the element's
  index in ``x`` made contiguous) falls below ``keep * 2**32``, else 0 (:mod:`..accel.dropout`);
  its own adjoint;
- ``max_pool2d(x, k, want_index) -> (y, index)``: the maximum of every non-overlapping k x k
  window (stride k, no padding), and where it lies (in the backend's own form, for
  ``max_pool2d_backward(g, index, h, w, k)``), with PyTorch's choice among equal maxima
  (:mod:`..accel.pooling`).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


def panel_width(batch: int) -> int:
    """Batch rows per panel: 64, or 32/16 for small batches (less padding). (The compiled
    kernels choose their own, ``ops.panel_width``: 32 at most where their vectors are narrower
    than AVX-512's.)"""
    return 64 if batch >= 64 else 32 if batch > 16 else 16


class Ops(Protocol):
    name: str
    kernels: int  # the ``kernels`` argument of the operators of ``ops.py`` for these kernels

    def conv2d_forward(
        self,
        crow: Tensor,
        col: Tensor,
        val: Tensor,
        x: Tensor,
        out_channels: int,
        kh: int,
        kw: int,
        stride: int,
        ph: int,
        pw: int,
        bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]: ...

    def conv2d_backward(
        self,
        crow: Tensor,
        col: Tensor,
        crow_t: Tensor,
        col_t: Tensor,
        val_t: Tensor,
        g: Tensor,
        saved: Tensor,
        kh: int,
        kw: int,
        stride: int,
        ph: int,
        pw: int,
        want_input: bool,
        want_weight: bool,
    ) -> tuple[Tensor | None, Tensor | None]: ...

    def phase_planes(
        self, x: Tensor, stride: int, ph: int, pw: int, hq: int, wq: int, count: int | None = None
    ) -> Tensor: ...

    def conv2d_forward_phases(
        self,
        crow: Tensor,
        col: Tensor,
        val: Tensor,
        x: Tensor,
        out_channels: int,
        kh: int,
        kw: int,
        stride: int,
        ph: int,
        pw: int,
        hq: int,
        wq: int,
        bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]: ...

    def phase_planes_grad(
        self, g: Tensor, stride: int, ph: int, pw: int, h: int, w: int, count: int | None = None
    ) -> Tensor: ...

    def patches(
        self, x: Tensor, kh: int, kw: int, stride: int, ph: int, pw: int, oh: int, ow: int
    ) -> Tensor: ...

    def patches_grad(
        self,
        g: Tensor,
        shape: tuple[int, int, int, int],
        kh: int,
        kw: int,
        stride: int,
        ph: int,
        pw: int,
        oh: int,
        ow: int,
    ) -> Tensor: ...

    def dropout(self, x: Tensor, keep: float, seed: int) -> Tensor: ...

    def uses_panels(self, batch: int, kh: int, kw: int, dtype: torch.dtype) -> bool: ...

    def max_pool2d(self, x: Tensor, k: int, want_index: bool) -> tuple[Tensor, Tensor]: ...

    def max_pool2d_backward(self, g: Tensor, index: Tensor, h: int, w: int, k: int) -> Tensor: ...
