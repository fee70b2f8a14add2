"""The compiled backend: the extension's functions behind the :class:`~.protocol.Ops` protocol,
with an optional cap on their OpenMP threads."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class _ThreadLimited:
    """The extension's functions, each run with at most ``threads`` OpenMP threads: a limit
    local to the calling thread, set in the extension for the call and restored after it."""

    def __init__(self, ext: Any, threads: int) -> None:
        self._ext, self._threads = ext, threads

    def __getattr__(self, name: str) -> Any:
        fn, set_limit, threads = getattr(self._ext, name), self._ext.set_thread_limit, self._threads

        def run(*args: Any) -> Any:
            previous = set_limit(threads)
            try:
                return fn(*args)
            finally:
                set_limit(previous)

        setattr(self, name, run)  # made once per function: later lookups find the attribute
        return run


class CppOps:
    """The compiled CPU kernels (float32 and float64); ``threads`` caps the OpenMP threads of
    every kernel (None: all of them)."""

    name = "cpp"

    def __init__(self, ext: Any, threads: int | None = None) -> None:
        self.threads, self.extension_module = threads, ext
        self.kernels = threads or 0  # the operators' ``kernels`` (kernels/ops.py)
        self._ext = ext if threads is None else _ThreadLimited(ext, threads)

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
    ) -> tuple[Tensor, Tensor]:
        y, saved = self._ext.conv2d_forward(
            crow, col, val, x, out_channels, kh, kw, stride, ph, pw, bias
        )
        return y, saved

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
    ) -> tuple[Tensor | None, Tensor | None]:
        gx, dval = self._ext.conv2d_backward(
            crow,
            col,
            crow_t,
            col_t,
            val_t,
            g,
            saved,
            kh,
            kw,
            stride,
            ph,
            pw,
            want_input,
            want_weight,
        )
        return gx, dval

    def phase_planes(
        self, x: Tensor, stride: int, ph: int, pw: int, hq: int, wq: int, count: int | None = None
    ) -> Tensor:
        count = stride * stride if count is None else count
        out: Tensor = self._ext.phase_planes(x, stride, ph, pw, hq, wq, count)
        return out

    def phase_planes_grad(
        self, g: Tensor, stride: int, ph: int, pw: int, h: int, w: int, count: int | None = None
    ) -> Tensor:
        count = stride * stride if count is None else count
        out: Tensor = self._ext.phase_planes_grad(g, stride, ph, pw, h, w, count)
        return out

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
    ) -> tuple[Tensor, Tensor]:
        y, saved = self._ext.conv2d_forward_phases(
            crow, col, val, x, out_channels, kh, kw, stride, ph, pw, hq, wq, bias
        )
        return y, saved

    def patches(
        self, x: Tensor, kh: int, kw: int, stride: int, ph: int, pw: int, oh: int, ow: int
    ) -> Tensor:
        out: Tensor = self._ext.patches(x, kh, kw, stride, ph, pw, oh, ow)
        return out

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
    ) -> Tensor:
        out: Tensor = self._ext.patches_grad(g, *shape, kh, kw, stride, ph, pw, oh, ow)
        return out

    def dropout(self, x: Tensor, keep: float, seed: int) -> Tensor:
        out: Tensor = self._ext.dropout(x, keep, seed)
        return out

    def uses_panels(self, batch: int, kh: int, kw: int, dtype: torch.dtype) -> bool:
        return bool(self._ext.uses_panels(batch, kh, kw, dtype == torch.float64))

    def max_pool2d(self, x: Tensor, k: int, want_index: bool) -> tuple[Tensor, Tensor]:
        y, index = self._ext.max_pool2d(x, k, want_index)
        return y, index

    def max_pool2d_backward(self, g: Tensor, index: Tensor, h: int, w: int, k: int) -> Tensor:
        out: Tensor = self._ext.max_pool2d_backward(g, index, h, w, k)
        return out

    # batch normalisation (accel.norm): not part of the Ops protocol, whose other backend is
    # PyTorch's own BatchNorm there
    def batch_norm_forward(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, relu: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        y, mean, var, invstd = self._ext.batch_norm_forward(x, weight, bias, eps, relu)
        return y, mean, var, invstd

    def batch_norm_apply(self, x: Tensor, scale: Tensor, shift: Tensor, relu: bool) -> Tensor:
        out: Tensor = self._ext.batch_norm_apply(x, scale, shift, relu)
        return out

    def batch_norm_backward(
        self,
        g: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        relu: bool,
        want_input: bool,
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        gx, gw, gb = self._ext.batch_norm_backward(
            g, x, mean, invstd, weight, bias, relu, want_input
        )
        return gx, gw, gb
