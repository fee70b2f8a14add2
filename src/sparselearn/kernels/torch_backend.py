"""The PyTorch implementations of the kernel operators (``ops.py``): torch's CSR matmul and
sampled matmul, dense convolution routines. They compute what the compiled kernels compute,
wherever those cannot run (CUDA, other dtypes, no compiler), in layouts of their own."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.grad import conv2d_input, conv2d_weight


def panel_width(batch: int) -> int:
    """Batch rows per panel of the PyTorch implementation: 64, or 32/16 for small batches (less
    padding). (The compiled kernels choose their own, ``ops.panel_width``: 32 at most where
    their vectors are narrower than AVX-512's.)"""
    return 64 if batch >= 64 else 32 if batch > 16 else 16


class TorchOps:
    """The fallback: torch's CSR matmul and sampled matmul; dense convolution routines."""

    name = "torch"
    kernels = -1  # the operators' ``kernels`` (kernels/ops.py): this implementation

    @staticmethod
    def _csr(crow: Tensor, col: Tensor, val: Tensor, shape: tuple[int, int]) -> Tensor:
        with warnings.catch_warnings():  # torch's "CSR support is in beta" note, once per user
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            # torch wants the row pointers and column indices of one dtype
            return torch.sparse_csr_tensor(
                crow.to(col.dtype), col, val, shape, check_invariants=False
            )

    def pack(self, x: Tensor) -> Tensor:
        b, f = x.shape
        w = panel_width(b)
        nb = -(-b // w)
        padded = F.pad(x, (0, 0, 0, nb * w - b))
        return padded.view(nb, w, f).transpose(1, 2).contiguous()

    def pack_sum(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.pack(x), x.sum(0)

    @staticmethod
    def _unpanel(xp: Tensor) -> Tensor:
        """Panels (nb, F, W) -> (F, nb * W): the transposed, padded activations."""
        return xp.permute(1, 0, 2).reshape(xp.shape[1], -1)

    def spmm(
        self,
        crow: Tensor,
        col: Tensor,
        val: Tensor,
        xp: Tensor,
        rows: int,
        batch: int,
        perm: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> Tensor:
        values = val if perm is None else val[perm]
        xt = self._unpanel(xp)
        y = (self._csr(crow, col, values, (rows, xt.shape[0])) @ xt)[:, :batch].t()
        return y if bias is None else y + bias

    def sampled(self, crow: Tensor, col: Tensor, gp: Tensor, xp: Tensor) -> Tensor:
        gt, xt = self._unpanel(gp), self._unpanel(xp)
        pattern = self._csr(
            crow, col, torch.zeros_like(col, dtype=gt.dtype), (gt.shape[0], xt.shape[0])
        )
        out: Tensor = torch.sparse.sampled_addmm(pattern, gt, xt.T, beta=0.0)
        return out.values()

    def linear_forward(
        self,
        x: Tensor,
        crow: Tensor,
        col: Tensor,
        val: Tensor,
        rows: int,
        bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        xp = self.pack(x)
        return self.spmm(crow, col, val, xp, rows, x.shape[0], bias=bias), xp

    def linear_rows(
        self,
        x: Tensor,
        crow: Tensor,
        col: Tensor,
        val: Tensor,
        rows: int,
        bias: Tensor | None = None,
    ) -> Tensor:
        y = (self._csr(crow, col, val, (rows, x.shape[1])) @ x.t()).t()
        return y if bias is None else y + bias

    def linear_backward(
        self,
        crow: Tensor,
        col: Tensor,
        crow_t: Tensor,
        col_t: Tensor,
        perm: Tensor,
        perm_inv: Tensor,
        val: Tensor,
        grad_y: Tensor,
        xp: Tensor,
        want_bias: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        batch = grad_y.shape[0]
        gp = self.pack(grad_y)
        grad_x = self.spmm(crow_t, col_t, val, gp, crow_t.numel() - 1, batch, perm)
        return grad_x, self.sampled(crow, col, gp, xp), grad_y.sum(0) if want_bias else None

    def _dense(self, crow: Tensor, col: Tensor, val: Tensor, shape: tuple[int, ...]) -> Tensor:
        rows = shape[0]
        return self._csr(crow, col, val, (rows, math.prod(shape[1:]))).to_dense().view(shape)

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
        xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x  # what the backward reads
        w = self._dense(crow, col, val, (out_channels, x.shape[1], kh, kw))
        return F.conv2d(xp, w, bias, stride=stride), xp

    def _grad_input(
        self,
        crow_t: Tensor,
        col_t: Tensor,
        val_t: Tensor,
        g: Tensor,
        in_channels: int,
        hp: int,
        wp: int,
        kh: int,
        kw: int,
        stride: int,
    ) -> Tensor:
        wt = self._dense(crow_t, col_t, val_t, (in_channels, g.shape[1], kh, kw))
        w = wt.transpose(0, 1)  # back to (out, in, kh, kw)
        shape = (g.shape[0], in_channels, hp, wp)
        gx: Tensor = conv2d_input(shape, w, g, stride=stride)  # type: ignore[no-untyped-call]
        return gx

    def _grad_weight(
        self, crow: Tensor, col: Tensor, g: Tensor, xp: Tensor, kh: int, kw: int, stride: int
    ) -> Tensor:
        shape = (g.shape[1], xp.shape[1], kh, kw)
        dw: Tensor = conv2d_weight(xp, shape, g, stride=stride)  # type: ignore[no-untyped-call]
        rows = torch.repeat_interleave(torch.arange(g.shape[1], device=crow.device), crow.diff())
        return dw.reshape(g.shape[1], -1)[rows, col]

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
        xp = saved  # the padded input
        c_in, hp, wp = xp.shape[1:]
        gx = None
        if want_input:
            gxp = self._grad_input(crow_t, col_t, val_t, g, c_in, hp, wp, kh, kw, stride)
            gx = gxp[:, :, ph : hp - ph, pw : wp - pw]
        dval = self._grad_weight(crow, col, g, xp, kh, kw, stride) if want_weight else None
        return gx, dval

    def phase_planes(
        self, x: Tensor, stride: int, ph: int, pw: int, hq: int, wq: int, count: int | None = None
    ) -> Tensor:
        s, (n, c, h, w) = stride, x.shape
        count = _phase_count(s, count)
        # pad to s*hq x s*wq; what lies past that is never read: crop it
        xp = F.pad(x, (pw, max(0, s * wq - w - pw), ph, max(0, s * hq - h - ph)))
        xp = xp[:, :, : s * hq, : s * wq]
        planes = xp.reshape(n, c, hq, s, wq, s).permute(0, 3, 5, 1, 2, 4)
        return planes.reshape(n, s * s * c, hq, wq)[:, : count * c].contiguous()

    def phase_planes_grad(
        self, g: Tensor, stride: int, ph: int, pw: int, h: int, w: int, count: int | None = None
    ) -> Tensor:
        s, (n, _, hq, wq) = stride, g.shape
        count = _phase_count(s, count)
        if g.shape[1] % count:
            raise ValueError(f"the gradient's {g.shape[1]} channels are not {count} planes' worth")
        c = g.shape[1] // count
        g = F.pad(g, (0, 0, 0, 0, 0, (s * s - count) * c))  # the planes not built: zero
        grid = g.reshape(n, s, s, c, hq, wq).permute(0, 3, 4, 1, 5, 2)
        grid = grid.reshape(n, c, s * hq, s * wq)
        # the padded input's gradient: zero past the planes (rows and columns never read)
        full = F.pad(grid, (0, max(0, w + pw - s * wq), 0, max(0, h + ph - s * hq)))
        return full[:, :, ph : ph + h, pw : pw + w].contiguous()

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
        planes = self.phase_planes(x, stride, ph, pw, hq, wq)
        return self.conv2d_forward(crow, col, val, planes, out_channels, kh, kw, 1, 0, 0, bias)

    def patches(
        self, x: Tensor, kh: int, kw: int, stride: int, ph: int, pw: int, oh: int, ow: int
    ) -> Tensor:
        cols = F.unfold(x, (kh, kw), padding=(ph, pw), stride=stride)  # (N, C*kh*kw, oh*ow)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

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
        cols = g.reshape(shape[0], oh * ow, -1).transpose(1, 2)
        return F.fold(cols, shape[2:], (kh, kw), padding=(ph, pw), stride=stride)

    def dropout(self, x: Tensor, keep: float, seed: int) -> Tensor:
        if not 0.0 < keep < 1.0:
            raise ValueError(f"dropout: the keep probability must be in (0, 1), got {keep}")
        x = x.contiguous()
        flat = x.view(-1)
        threshold = min(max(round(keep * 2**32), 1), 2**32 - 1)
        keep_mask = torch.empty(flat.shape, dtype=torch.bool, device=x.device)
        block = 2**32  # the indices that share one pair of keys
        for start in range(0, flat.numel(), block):
            k1, k2 = _block_keys(seed, start // block)
            index = torch.arange(
                start, min(start + block, flat.numel()), dtype=torch.int64, device=x.device
            )
            h = _mix32(_mix32((index & _M32) ^ k1) ^ k2)
            keep_mask[start : start + index.numel()] = h < threshold
        scale = torch.tensor(1.0 / keep, dtype=x.dtype, device=x.device)
        return torch.where(keep_mask, flat * scale, flat.new_zeros(())).view(x.shape)

    def uses_panels(self, batch: int, kh: int, kw: int, dtype: torch.dtype) -> bool:
        return False  # PyTorch's convolutions take any layout

    def max_pool2d(self, x: Tensor, k: int, want_index: bool) -> tuple[Tensor, Tensor]:
        y, index = F.max_pool2d(x, k, return_indices=True)  # index: the place in the plane
        return y, index

    def max_pool2d_backward(self, g: Tensor, index: Tensor, h: int, w: int, k: int) -> Tensor:
        # Each window's gradient goes to its own place in the plane (windows do not overlap), so a
        # scatter gives F.max_pool2d's gradient; unlike F.max_unpool2d it is allowed under
        # torch.use_deterministic_algorithms(True).
        n, c = g.shape[:2]
        out = g.new_zeros(n, c, h * w)
        return out.scatter_(2, index.reshape(n, c, -1), g.reshape(n, c, -1)).view(n, c, h, w)


# The hash of csrc/dropout.cpp on int64 tensors holding 32-bit words: every product is split so
# that it stays below 2**63 (no signed overflow), and every result is reduced modulo 2**32.
_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c`` modulo 2**32 for words ``x`` and a constant word ``c``."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _block_keys(seed: int, block: int) -> tuple[int, int]:
    """The two keys of the indices ``block * 2**32 ..``, as dropout.cpp's ``block_keys``."""
    k1 = _mix32_int((seed & _M32) ^ _mix32_int((block + 0x9E3779B9) & _M32))
    k2 = _mix32_int(((seed >> 32) & _M32) ^ k1)
    return k1, k2


def _phase_count(stride: int, count: int | None) -> int:
    """How many of the ``stride**2`` phase planes to build (``None``: all)."""
    if count is None:
        return stride * stride
    if not 1 <= count <= stride * stride:
        raise ValueError(f"count must be between 1 and stride**2 = {stride * stride}, got {count}")
    return count
