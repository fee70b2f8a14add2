"""Layers that compute with sparse weights: forward, input gradient, and the weight gradient at
the active positions only.

The trainable parameter of a sparse layer is ``values``: the active weights in row-major (CSR)
order, so that the weights and their optimizer state take memory proportional to the active
weights. The structure (CSR of W, CSR of W^T and the permutation between their value orders) is
kept in buffers and rebuilt only when the mask changes (:meth:`SparseWeight.restructure`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_weight

from ..kernels import check_threads, kernels_for
from ..kernels import ops as kops
from .live import LiveCheck, no_live_check
from .weight_view import SparseWeightView

# Column indices and the permutation are 32-bit: the kernels stream them once per panel of the
# batch, and half the bytes is a few percent of a product (the row pointers stay 64-bit).
INDEX_DTYPE = torch.int32
_INDEX_LIMIT = 2**31
# a Linear weight of more entries than this gives the engine its dense gradient as factors
# (SparseWeight.arm_dense_grad): 16 MiB of float32
CAPTURE_ABOVE = 1 << 22


def csr_structure(mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """CSR of a weight mask (rows: output units) and of its transpose, plus ``perm`` with
    ``values_of_transpose = values[perm]``. Row pointers are int64; column indices and ``perm``
    are int32 (:data:`INDEX_DTYPE`).

    Linear (out, in): the transpose is the (in, out) matrix. Convolution (out, in, kh, kw): the
    transpose has one row per input channel, and its columns encode (out, ky, kx) as
    ``o * kh * kw + ky * kw + kx``, which is what the input-gradient kernel walks.
    """
    return csr_from_positions(mask.reshape(-1).nonzero().squeeze(1), tuple(mask.shape))


def _check_index_range(shape: tuple[int, ...]) -> None:
    if math.prod(shape) >= _INDEX_LIMIT:
        raise ValueError(
            f"a weight of {math.prod(shape)} entries is too large for the sparse kernels' 32-bit "
            f"indices (at most {_INDEX_LIMIT - 1}); leave this layer dense (sl.accelerate(..., "
            "layers=[...]) chooses which layers are accelerated)"
        )


def csr_from_positions(
    positions: Tensor, shape: tuple[int, ...]
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`csr_structure` of the weight of ``shape`` whose active entries are at the flat
    ``positions`` (int64, ascending), without a tensor of the weight's size."""
    _check_index_range(shape)
    rows = shape[0]
    khw = math.prod(shape[2:]) if len(shape) == 4 else 1
    fan_in = math.prod(shape[1:])
    rows_t = shape[1] if len(shape) == 4 else fan_in
    device = positions.device
    crow_t = torch.zeros(rows_t + 1, dtype=torch.long, device=device)
    if khw == 1:
        # a Linear's, with as few tensors of nnz 64-bit integers alive at once as can be (a
        # layer of a model larger than memory restructures with them): the row pointers by
        # bisection, the transpose's order by column with rows ascending within one (a stable
        # sort keeps them so)
        bounds = torch.arange(rows + 1, device=device).mul_(fan_in)
        crow = torch.searchsorted(positions, bounds)
        col = torch.remainder(positions, fan_in).to(INDEX_DTYPE)
        order = torch.sort(col, stable=True).indices
        crow_t[1:] = torch.bincount(col, minlength=rows_t).cumsum(0)
        col_t = positions[order].floor_divide_(fan_in).to(INDEX_DTYPE)
        return crow, col, crow_t, col_t, order.to(INDEX_DTYPE)
    r, c = positions // fan_in, positions % fan_in  # row-major order = CSR order of W
    crow = torch.zeros(rows + 1, dtype=torch.long, device=device)
    crow[1:] = torch.bincount(r, minlength=rows).cumsum(0)
    row_t = c // khw
    col_t = r * khw + c % khw
    order = torch.argsort(row_t * (rows * khw) + col_t)  # CSR order of the transpose
    crow_t[1:] = torch.bincount(row_t, minlength=rows_t).cumsum(0)
    return (
        crow,
        c.to(INDEX_DTYPE).contiguous(),
        crow_t,
        col_t[order].to(INDEX_DTYPE).contiguous(),
        order.to(INDEX_DTYPE),
    )


def _inverse(perm: Tensor) -> Tensor:
    inv = torch.empty_like(perm)
    inv[perm.long()] = torch.arange(perm.numel(), dtype=perm.dtype, device=perm.device)
    return inv


class CapturedGrad:
    """The dense gradient of a Linear weight (out, in) held as its factors: for each backward
    pass, the output gradient and the input, both in the kernels' panels of the batch
    (``(panels, rows, width)``, zero-padded). Any block of rows of the gradient is one product,
    so a mask update scores a large layer block by block and never holds it whole; a few
    entries of it are a few dot products (:meth:`at`)."""

    def __init__(self, parts: list[tuple[Tensor, Tensor]], shape: tuple[int, ...]) -> None:
        self.parts, self.shape = parts, shape
        self._flat: list[tuple[Tensor, Tensor]] | None = None

    def _matrices(self) -> list[tuple[Tensor, Tensor]]:
        """Each pass's factors as (out, batch) and (in, batch) matrices (the panels' padding
        rows are zero), made once: a block of rows is then one matrix product."""
        if self._flat is None:
            self._flat = [
                (
                    gp.permute(1, 0, 2).reshape(gp.shape[1], -1),
                    xp.permute(1, 0, 2).reshape(xp.shape[1], -1),
                )
                for gp, xp in self.parts
            ]
        return self._flat

    def rows(self, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of the gradient (summed over the passes, in their order)."""
        out: Tensor | None = None
        for g, x in self._matrices():
            block = g[start:stop] @ x.t()
            out = block if out is None else out.add_(block)
        assert out is not None
        return out

    def at(self, rows: Tensor, cols: Tensor, chunk: int = 1 << 16) -> Tensor:
        """The gradient at the entries (``rows``, ``cols``), without any block of it."""
        out = torch.zeros(rows.numel(), dtype=self.parts[0][0].dtype, device=rows.device)
        for g, x in self._matrices():
            for lo in range(0, rows.numel(), chunk):
                r, c = rows[lo : lo + chunk], cols[lo : lo + chunk]
                out[lo : lo + chunk] += (g[r] * x[c]).sum(1)
        return out

    def dense(self) -> Tensor:
        return self.rows(0, self.shape[0])

    def finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for part in self.parts for t in part)


class SparseWeight(nn.Module):
    """A weight of ``shape`` held as CSR over its first dimension (rows: output units).

    ``values`` is the parameter; ``crow``/``col`` the CSR of the weight viewed as
    (out, fan_in); ``crow_t``/``col_t``/``perm`` the CSR of its transpose; ``perm_inv`` the
    inverse permutation (``values = values_of_transpose[perm_inv]``; derived, not saved).
    """

    crow: Tensor
    col: Tensor
    crow_t: Tensor
    col_t: Tensor
    perm: Tensor
    perm_inv: Tensor

    # the saved tensors whose length is the number of active weights (a state_dict of another
    # mask holds another length, which loading adopts)
    SIZED_BY_ACTIVE = ("values", "col", "col_t", "perm")

    def __init__(self, dense: Tensor, mask: Tensor) -> None:
        shape = tuple(dense.shape)
        flat_mask = mask.reshape(shape[0], -1)
        values = dense.detach().reshape(shape[0], -1)[flat_mask].clone()
        self._build(shape, mask.reshape(-1).nonzero().squeeze(1), values)

    @classmethod
    def from_positions(
        cls, shape: tuple[int, ...], positions: Tensor, values: Tensor
    ) -> SparseWeight:
        """The weight of ``shape`` holding ``values`` at the flat ``positions`` (int64,
        ascending) and zeros elsewhere, built without a tensor of the weight's size."""
        weight = cls.__new__(cls)
        weight._build(tuple(shape), positions, values.detach().clone())
        return weight

    def _build(self, shape: tuple[int, ...], positions: Tensor, values: Tensor) -> None:
        super().__init__()
        self.shape = shape
        self.values = nn.Parameter(values)
        crow, col, crow_t, col_t, perm = csr_from_positions(positions, shape)
        self.register_buffer("crow", crow)
        self.register_buffer("col", col)
        self.register_buffer("crow_t", crow_t)
        self.register_buffer("col_t", col_t)
        self.register_buffer("perm", perm)
        self.register_buffer("perm_inv", _inverse(perm), persistent=False)
        # armed by the engine on steps that need the dense gradient (RigL, windows)
        self.dense_grad_probe: Tensor | None = None
        # where armed (a list), the backward passes of the coming steps leave the factors of
        # the dense gradient here instead of the gradient itself (see captured_grad)
        self.capture: list[tuple[Tensor, Tensor]] | None = None
        self.version = 0  # bumped whenever the structure changes (for cached masks)
        self._dense: tuple[tuple[object, ...], Tensor] | None = None  # (key, cached_dense())
        # structures derived from this one (a convolution's phase planes, its patches' matrix),
        # rebuilt with it
        self.derived = nn.ModuleDict()

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def fan_in(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def nnz(self) -> int:
        return self.col.numel()

    def positions(self) -> Tensor:
        """Each value's flat position in the weight (row * fan_in + column), in CSR order."""
        flat = torch.repeat_interleave(
            torch.arange(self.rows, device=self.col.device), self.crow.diff(), output_size=self.nnz
        )
        return flat.mul_(self.fan_in).add_(self.col)  # in place: one tensor of nnz int64

    def arm_dense_grad(self, wanted: bool) -> None:
        """Whether the coming steps produce the dense gradient of the weight: then
        :attr:`dense_grad_probe` is a leaf of the weight's shape that holds one zero (expanded),
        given to the layer's product as one more input, and its ``.grad`` receives the dense
        gradient (summed over the backward passes until it is armed again). A gradient, not a
        callback, so that a compiled graph carries it (a callback in the backward would be a
        side effect that torch.compile cannot trace).

        A 2-D weight (a Linear's) of more than :data:`CAPTURE_ABOVE` entries is armed to
        :attr:`capture` instead: a backward pass run eagerly then leaves the two factors of its
        dense gradient (the output gradient and the input, a few rows each of the batch's size)
        and not the gradient itself, and :meth:`captured_grad` gives any block of rows of their
        product (a compiled backward fills the probe as before). A smaller weight's dense
        gradient is cheap to hold, and the probe gives the values' gradient from it exactly as
        a compiled step does."""
        v = self.values
        self.dense_grad_probe = (
            v.new_zeros((), dtype=compute_dtype(v.dtype))
            .expand(self.shape)
            .detach()
            .requires_grad_()
            if wanted
            else None
        )
        big = len(self.shape) == 2 and math.prod(self.shape) > CAPTURE_ABOVE
        self.capture = [] if wanted and big else None

    def grad_from_factors(self, parts: list[tuple[Tensor, Tensor]]) -> CapturedGrad:
        """A captured gradient from its saved factors (:attr:`CapturedGrad.parts`)."""
        return CapturedGrad(parts, self.shape)

    def captured_grad(self) -> CapturedGrad | None:
        """The dense gradient of the backward passes since the layer was armed, as its factors
        (None: none were captured); the capture starts afresh."""
        parts = self.capture
        if not parts:
            return None
        self.capture = []
        return CapturedGrad(parts, self.shape)

    def mask(self) -> Tensor:
        """Bool mask of the weight's shape (materialised)."""
        m = torch.zeros(self.rows * self.fan_in, dtype=torch.bool, device=self.col.device)
        m[self.positions()] = True
        return m.view(self.shape)

    def dense(self) -> Tensor:
        """The weight as a dense tensor with exact zeros (materialised, no gradient)."""
        return self.dense_from(self.values.detach())

    def dense_from(self, values: Tensor) -> Tensor:
        """The dense weight holding ``values`` (in this structure's CSR order) at the active
        positions and exact zeros elsewhere; differentiable with respect to ``values``."""
        flat = values.new_zeros(self.rows * self.fan_in)
        return flat.index_put((self.positions(),), values).view(self.shape)

    def cached_dense(self) -> Tensor:
        """:meth:`dense`, kept until the structure or the values change (an optimizer step, a
        load): what a layer that infers densely reads, so that it materialises the weight
        once, not at every call."""
        v = self.values
        key = (self.version, v._version, v.data_ptr(), v.dtype, v.device)
        if self._dense is None or self._dense[0] != key:
            self._dense = None  # (the old copy goes before the new one is made)
            self._dense = (key, self.dense())
        return self._dense[1]

    @torch.no_grad()
    def restructure(self, new_mask: Tensor) -> Tensor:
        """Adopt ``new_mask``: kept weights keep their values, new ones start at zero.

        ``values`` becomes a new Parameter (autograd remembers a leaf's shape, so a leaf cannot
        change size in place): whoever holds the old one (the optimizer) must take the new one.
        Returns ``source`` (new nnz,): for each new position the index of its old value, or -1
        for a new position (so that the caller can move optimizer state the same way).
        """
        return self.restructure_positions(new_mask.reshape(-1).nonzero().squeeze(1))

    @torch.no_grad()
    def restructure_positions(self, positions: Tensor, old: Tensor | None = None) -> Tensor:
        """:meth:`restructure` to the active flat ``positions`` (int64, ascending), without a
        tensor of the weight's size (``old``: :meth:`positions`, where the caller has them)."""
        if old is None:
            old = self.positions()  # ascending: CSR order is row-major
        source = torch.searchsorted(old, positions).clamp_(max=max(self.nnz - 1, 0))
        if self.nnz:
            source.masked_fill_(old[source] != positions, -1)
        else:
            source.fill_(-1)
        del old
        crow, col, crow_t, col_t, perm = csr_from_positions(positions, self.shape)
        values = torch.zeros(col.numel(), dtype=self.values.dtype, device=self.values.device)
        kept = source >= 0
        values[kept] = self.values.detach()[source[kept]]
        self.values = nn.Parameter(values, requires_grad=self.values.requires_grad)
        self.version += 1
        self.crow, self.col, self.crow_t, self.col_t, self.perm = crow, col, crow_t, col_t, perm
        self.perm_inv = _inverse(perm)
        self._rebuild_derived()
        return source

    def _rebuild_derived(self) -> None:
        for d in self.derived.values():
            assert isinstance(d, _Derived)
            d.rebuild(self)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # the number of active weights may differ from this module's: take the saved sizes
        # (checkpoints written before the indices became int32 hold int64 ones: the copy into
        # this module's buffers converts them)
        for name in ("values", "crow", "col", "crow_t", "col_t", "perm"):
            key = prefix + name
            if key in state_dict:
                current = getattr(self, name)
                if current.shape != state_dict[key].shape:
                    current.data = torch.empty(
                        state_dict[key].shape, dtype=current.dtype, device=current.device
                    )
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.perm_inv = _inverse(self.perm)
        self.version += 1
        self._rebuild_derived()


class _Derived(nn.Module):
    """A structure derived from a :class:`SparseWeight` (held by it, in ``derived``): its
    tensors are buffers that are not saved (they move with the module, and a state dict holds
    the weight's own only), rebuilt by :meth:`rebuild` whenever the weight's structure changes
    (a mask update, a load). Built eagerly, never while a model is compiled: building reads the
    mask's non-zeros, which no graph can hold, and a compiled graph then finds the buffers up to
    date, with the same shapes while the number of non-zeros stays."""

    def rebuild(self, weight: SparseWeight) -> None:
        raise NotImplementedError

    def _set(self, **tensors: Tensor) -> None:
        for name, t in tensors.items():
            if name in self._buffers:
                self._buffers[name] = t
            else:
                self.register_buffer(name, t, persistent=False)


class _Phases(_Derived):
    """A stride-s convolution as a stride-1 one over the s*s phase planes of its input.

    Output (oy, ox) reads the padded input at (s*oy + ky, s*ox + kx); with ky = s*qy + py and
    kx = s*qx + px that is phase plane (py, px) (the input rows py, py + s, ... and columns px,
    px + s, ...) at (oy + qy, ox + qx): a stride-1 convolution with a ceil(k/s)-wide kernel over
    s*s*C channels (channel (py*s + px)*C + c), with the same non-zeros. ``index`` gives the
    values in this structure's CSR order: ``values[index]``.
    """

    index: Tensor
    crow: Tensor
    col: Tensor
    crow_t: Tensor
    col_t: Tensor
    perm: Tensor

    def __init__(self, weight: SparseWeight, stride: int) -> None:
        super().__init__()
        out_c, in_c, kh, kw = weight.shape
        s = self.stride = stride
        self.shape = (out_c, s * s * in_c, -(-kh // s), -(-kw // s))
        self.dense_grad_probe: Tensor | None = None  # dense steps take the direct path
        self.rebuild(weight)

    def rebuild(self, weight: SparseWeight) -> None:
        s, in_c = self.stride, weight.shape[1]
        o, c, ky, kx = weight.mask().nonzero(as_tuple=True)  # in the order of the values
        c2, qy, qx = ((ky % s) * s + kx % s) * in_c + c, ky // s, kx // s
        mask = torch.zeros(self.shape, dtype=torch.bool, device=weight.col.device)
        mask[o, c2, qy, qx] = True
        position = ((o * self.shape[1] + c2) * self.shape[2] + qy) * self.shape[3] + qx
        crow, col, crow_t, col_t, perm = csr_structure(mask)
        # the values in this structure's row-major order
        self._set(index=torch.argsort(position), crow=crow, col=col, crow_t=crow_t, col_t=col_t,
                  perm=perm)  # fmt: skip

    @property
    def rows(self) -> int:
        return self.shape[0]

    def planes_size(self, out_hw: tuple[int, int]) -> tuple[int, int]:
        """(OH + kh' - 1, OW + kw' - 1): the phase planes' height and width, as large as the
        stride-1 convolution reads (zeros past the padded input)."""
        return out_hw[0] + self.shape[2] - 1, out_hw[1] + self.shape[3] - 1


class _Unfolded(_Derived):
    """A convolution as a matrix product over its input's patches (im2col): the weight as an
    (out, in * kh * kw) matrix, the CSR of a Linear layer's weight (the values in the same
    order as the convolution's), with the transpose a Linear layer's backward walks. For small
    output planes, where the plane kernels have little to vectorise over.
    """

    crow: Tensor
    col: Tensor
    crow_t: Tensor
    col_t: Tensor
    perm: Tensor
    perm_inv: Tensor

    def __init__(self, weight: SparseWeight) -> None:
        super().__init__()
        self.rows, self.fan_in = weight.rows, weight.fan_in
        # the weight it derives from (not a child module: the weight holds this one)
        object.__setattr__(self, "_weight", weight)
        self.rebuild(weight)

    def rebuild(self, weight: SparseWeight) -> None:
        object.__setattr__(self, "_weight", weight)
        # the rows are the weight's own CSR (same column encoding, same order); the transpose
        # is the (in * kh * kw, out) one of a Linear layer
        _, _, crow_t, col_t, perm = csr_structure(weight.mask().reshape(self.rows, self.fan_in))
        self._set(crow=weight.crow, col=weight.col, crow_t=crow_t, col_t=col_t, perm=perm,
                  perm_inv=_inverse(perm))  # fmt: skip

    def positions(self) -> Tensor:
        weight: SparseWeight = self.__dict__["_weight"]
        return weight.positions()  # (out, in * kh * kw) flattens as the weight does

    @property
    def dense_grad_probe(self) -> Tensor | None:
        """The weight's probe (the dense gradient in the weight's own shape)."""
        weight: SparseWeight = self.__dict__["_weight"]
        return weight.dense_grad_probe


class _FirstPhaseFn(torch.autograd.Function):
    """(N, C, H, W) -> (N, C, OH, OW): rows and columns 0, s, 2s, ... (phase plane (0, 0) of
    stride s, unpadded), and back, in one pass each of the backend's kernels."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, stride: int, out_hw: tuple[int, int], kernels: int) -> Tensor:
        ctx.kernels, ctx.stride, ctx.hw = kernels, stride, (x.shape[2], x.shape[3])
        planes: Tensor = kops.phase_planes(x, stride, 0, 0, *out_hw, 1, kernels)
        return planes

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        gx = kops.phase_planes_grad(grad.contiguous(), ctx.stride, 0, 0, *ctx.hw, 1, ctx.kernels)
        return gx, None, None, None


class _PatchesFn(torch.autograd.Function):
    """(N, C, H, W) -> (N * OH * OW, C * kh * kw): each output position's input patch as a
    row (im2col), in one pass of the compiled kernels."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        kernel_size: tuple[int, int],
        stride: int,
        padding: tuple[int, int],
        out_hw: tuple[int, int],
        kernels: int,
    ) -> Tensor:
        ctx.kernels, ctx.shape, ctx.args = (
            kernels,
            tuple(x.shape),
            (*kernel_size, stride, *padding, *out_hw),
        )
        rows: Tensor = kops.patches(x, *ctx.args, kernels)
        return rows

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None, None]:
        gx = kops.patches_grad(grad.contiguous(), *ctx.shape, *ctx.args, ctx.kernels)
        return gx, None, None, None, None, None


_Grads = TypeVar("_Grads")


def _as_in_forward(backward: Callable[[Any, Tensor], _Grads], ctx: Any, grad: Tensor) -> _Grads:
    """``backward(ctx, grad)`` with autocast off where it is on: a backward called under
    autocast computes in the dtype the forward did (:func:`_in_compute_dtype`)."""
    device = grad.device.type
    if torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            return backward(ctx, grad)
    return backward(ctx, grad)


class _SparseLinearFn(torch.autograd.Function):
    """``x @ W.T + bias`` with W sparse; the bias is added as the output is written, and its
    gradient (the output gradient summed over the batch) comes from the pass that packs the
    output gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        values: Tensor,
        bias: Tensor | None,
        weight: SparseWeight | _Unfolded,
        kernels: int,
        probe: Tensor | None,
    ) -> Tensor:
        # y, and x in panels (each non-zero scales one contiguous row of batch values)
        y: Tensor
        y, xp = kops.linear_forward(x, weight.crow, weight.col, values, weight.rows, bias, kernels)
        ctx.save_for_backward(xp, values)
        ctx.weight, ctx.kernels = weight, kernels
        ctx.probe_shape = None if probe is None else probe.shape
        return y

    @staticmethod
    def backward(
        ctx: Any, grad_y: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, Tensor | None]:
        return _as_in_forward(_SparseLinearFn._backward, ctx, grad_y)

    @staticmethod
    def _backward(
        ctx: Any, grad_y: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, Tensor | None]:
        xp, values = ctx.saved_tensors
        w: SparseWeight | _Unfolded = ctx.weight
        kernels = ctx.kernels
        batch = grad_y.shape[0]
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        want_dense = ctx.probe_shape is not None and ctx.needs_input_grad[5]
        capture = getattr(w, "capture", None)
        if want_dense and capture is not None and not torch.compiler.is_compiling():
            # the dense gradient's factors, kept for the engine instead of their product
            want_dense = False
            factors = True
        else:
            factors = False
        if want_x and want_w and not want_dense and not factors:
            # both products in one pass: each row of the gradient's panels is read once for two
            gx, gv, gb = kops.linear_backward(
                w.crow,
                w.col,
                w.crow_t,
                w.col_t,
                w.perm,
                w.perm_inv,
                values,
                grad_y,
                xp,
                want_b,
                kernels,
            )
            return gx, gv, gb if want_b else None, None, None, None
        grad_bias: Tensor | None = None
        if want_b:
            gp, grad_bias = kops.pack_sum(grad_y, kernels)
        else:
            gp = kops.pack(grad_y, kernels)
        if factors:
            assert capture is not None
            capture.append((gp, xp))
        grad_x: Tensor | None = None
        if want_x:
            grad_x = kops.spmm(
                w.crow_t, w.col_t, values, gp, w.fan_in, batch, w.perm, None, kernels
            )
        grad_values: Tensor | None = None
        grad_dense: Tensor | None = None
        if want_dense:
            # the full gradient, only on the steps that ask (padding rows are zero)
            dense = torch.einsum("pow,piw->oi", gp, xp)
            grad_dense = dense.view(ctx.probe_shape)
            if want_w:
                grad_values = dense.view(-1)[w.positions()]
        elif want_w:
            grad_values = kops.sampled(w.crow, w.col, gp, xp, kernels)
        return grad_x, grad_values, grad_bias, None, None, grad_dense


class _SparseConv2dFn(torch.autograd.Function):
    """The convolution with a CSR weight; the bias (if any) is added as the output is written,
    its gradient is the output gradient summed over all but the channels. With ``phases`` (hq,
    wq), ``weight`` is a :class:`_Phases`: the kernels convolve the phase planes of ``x``
    (stride and padding the layer's) at stride 1, and the backward turns the planes' gradient
    into x's."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        values: Tensor,
        bias: Tensor | None,
        weight: SparseWeight | _Phases,
        stride: int,
        padding: tuple[int, int],
        kernels: int,
        phases: tuple[int, int] | None = None,
        probe: Tensor | None = None,
    ) -> Tensor:
        _, kh, kw = weight.shape[1:]
        # ``saved``: what the backward reads, in the kernels' layout (batch panels of the
        # input or of its phase planes, or the padded input or its phase planes; empty where
        # it is x itself)
        y: Tensor
        args = (weight.crow, weight.col, values, x, weight.rows, kh, kw, stride, *padding)
        if phases is None:
            y, saved = kops.conv2d_forward(*args, bias, kernels)
        else:  # ``weight``: the stride-1 convolution over the (hq, wq) phase planes
            y, saved = kops.conv2d_forward_phases(*args, *phases, bias, kernels)
        ctx.save_for_backward(x, values, saved)
        ctx.weight, ctx.kernels, ctx.stride, ctx.padding = weight, kernels, stride, padding
        ctx.phases, ctx.want_dense = phases, probe is not None
        return y

    @staticmethod
    def backward(
        ctx: Any, grad_y: Tensor
    ) -> tuple[
        Tensor | None, Tensor | None, Tensor | None, None, None, None, None, None, Tensor | None
    ]:
        return _as_in_forward(_SparseConv2dFn._backward, ctx, grad_y)

    @staticmethod
    def _backward(
        ctx: Any, grad_y: Tensor
    ) -> tuple[
        Tensor | None, Tensor | None, Tensor | None, None, None, None, None, None, Tensor | None
    ]:
        x, values, saved = ctx.saved_tensors
        w: SparseWeight | _Phases = ctx.weight
        kh, kw = w.shape[2:]
        g = grad_y.contiguous()
        want_x, want_w = ctx.needs_input_grad[:2]
        want_dense = ctx.want_dense and ctx.needs_input_grad[8]
        # the convolution the kernels ran: of the phase planes at stride 1, unpadded, or of x
        stride, padding = (1, (0, 0)) if ctx.phases else (ctx.stride, ctx.padding)
        # its input: x, or the phase planes (as many channels as the weight reads, the planes'
        # size)
        c_in = w.shape[1]
        h, wd = ctx.phases if ctx.phases else x.shape[2:]
        # both gradients in one call (stride 1: they share one copy of the output gradient);
        # on steps that ask for the dense weight gradient, that comes from PyTorch instead
        gx, gv = kops.conv2d_backward(
            w.crow,
            w.col,
            w.crow_t,
            w.col_t,
            values[w.perm],
            g,
            x if saved.numel() == 0 else saved,
            c_in,
            h,
            wd,
            kh,
            kw,
            stride,
            *padding,
            want_x,
            want_w and not want_dense,
            ctx.kernels,
        )
        grad_x: Tensor | None = gx if want_x else None
        grad_values: Tensor | None = gv if want_w and not want_dense else None
        if grad_x is not None and ctx.phases:  # the phase planes' gradient, then x's
            grad_x = kops.phase_planes_grad(
                grad_x, ctx.stride, *ctx.padding, *x.shape[2:], ctx.stride**2, ctx.kernels
            )
        grad_dense = None
        if want_dense:
            assert isinstance(w, SparseWeight)  # steps that want it take the direct path
            grad_dense = conv2d_weight(  # type: ignore[no-untyped-call]
                x, w.shape, g, stride=ctx.stride, padding=ctx.padding
            )
            if want_w:
                grad_values = grad_dense.reshape(-1)[w.positions()]
        grad_bias = g.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        return grad_x, grad_values, grad_bias, None, None, None, None, None, grad_dense


def _split_bias(bias: Tensor | None, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """(the bias the kernels add as they write the output, the bias left to add after): the
    kernels take a bias of the input's dtype and device only."""
    if bias is None or (bias.dtype == x.dtype and bias.device == x.device):
        return bias, None
    return None, bias


def _sparse_linear(
    x: Tensor,
    values: Tensor,
    bias: Tensor | None,
    weight: SparseWeight | _Unfolded,
    kernels: int,
) -> Tensor:
    """``x @ W.T + bias`` for a (batch, in) ``x``, the bias fused where the kernels take it
    (``kernels``: the operators', :func:`~sparselearn.kernels.ops.kernels_for`)."""
    fused, rest = _split_bias(bias, x)
    y: Tensor = _SparseLinearFn.apply(  # type: ignore[no-untyped-call]
        x, values, fused, weight, kernels, weight.dense_grad_probe
    )
    return y if rest is None else y + rest


class _ComputeChoice:
    """How a sparse layer computes: :attr:`steps` where a gradient is recorded, :attr:`inference`
    where none is (``torch.no_grad``, ``torch.inference_mode``), and the :attr:`live` check of
    its steps' choice during the first steps of a run (:mod:`.live`)."""

    weight_sparse: SparseWeight
    threads: int | None
    training: bool
    _inference = "sparse"
    _steps = "sparse"
    # set by ``sl.accelerate`` (mode "auto"); the check drops itself once it has decided
    live: LiveCheck | None = None

    @property
    def inference(self) -> str:
        """``"sparse"``: the layer's kernels, as in training; ``"dense"``: the dense layer's
        product with :meth:`SparseWeight.cached_dense` (``sl.accelerate`` chooses it where that
        times faster). The results agree to rounding."""
        return self._inference

    @inference.setter
    def inference(self, how: str) -> None:
        if how not in ("sparse", "dense"):
            raise ValueError(f"inference must be 'sparse' or 'dense', got {how!r}")
        self._inference = how

    @property
    def steps(self) -> str:
        """``"sparse"``: the layer's kernels; ``"dense"``: the dense layer's product with the
        dense weight built from the values at each call (the gradient reaches the values,
        and the weights keep the memory of the active ones). Where a gradient is recorded;
        the results agree to rounding."""
        return self._steps

    @steps.setter
    def steps(self, how: str) -> None:
        if how not in ("sparse", "dense"):
            raise ValueError(f"steps must be 'sparse' or 'dense', got {how!r}")
        self._steps = how

    def forward(self, x: Tensor) -> Tensor:
        live = self.live
        if live is not None and self.training and not no_live_check():
            live.finish(self)  # decides once the last timed step's backward has run
            if self.live is not None:
                return live.step(self, x)
        return self._compute(x)

    def _compute(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _dense_weight(self) -> Tensor | None:
        """The dense weight to compute this call with (None: the kernels): with a gradient
        where :attr:`steps` is dense (handing the dense gradient to the engine on the steps
        that ask for it), without one where :attr:`inference` is."""
        w = self.weight_sparse
        if not torch.is_grad_enabled():
            return w.cached_dense() if self._inference == "dense" else None
        if self._steps == "sparse":
            return None
        dense = w.dense_from(w.values)
        probe = w.dense_grad_probe
        return dense if probe is None else dense + probe.to(dense.dtype)

    def _choices_repr(self) -> str:
        """The ``extra_repr`` part of a layer that computes densely (none for the defaults)."""
        return ("" if self._steps == "sparse" else f", steps={self._steps}") + (
            "" if self._inference == "sparse" else f", inference={self._inference}"
        )


class _DenseFace:
    """What model code asks of the dense layer that an accelerated one replaced: ``.weight``,
    answered by a :class:`~.weight_view.SparseWeightView` (the dense weight's shape, dtype,
    device and ``requires_grad``, with no dense weight built for asking), never assigned."""

    weight_sparse: SparseWeight
    # the dense layer's weight is the transpose of the stored (out, in) matrix (a Conv1D)
    _weight_transposed = False

    @property
    def weight(self) -> Tensor:
        """The dense weight this layer computes with, as model code reads it."""
        return SparseWeightView(self.weight_sparse, self._weight_transposed, type(self).__name__)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight":
            raise AttributeError(
                f"{type(self).__name__}.weight cannot be assigned: the layer computes with "
                "its sparse values (weight_sparse.values, in CSR order), which change through "
                "the optimizer, mask updates or load_state_dict"
            )
        super().__setattr__(name, value)

    def to_dense_module(self) -> nn.Module:
        """The dense layer this one replaced, holding the same weights (inactive ones zero),
        on the same device and in the same dtype."""
        raise NotImplementedError


_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a layer with weights (or inputs) of ``dtype`` computes in."""
    return torch.float32 if dtype in _HALF else dtype


def _in_compute_dtype(
    x: Tensor, values: Tensor, bias: Tensor | None, layer: str
) -> tuple[Tensor, Tensor, Tensor | None, torch.dtype | None]:
    """``x``, ``values`` and ``bias`` in the dtype the kernels compute in, and the dtype the
    layer returns (None: the computed output as it is, float32 or float64 without autocast).

    The returned dtype is the dense layer's: autocast's where autocast is on for the input's
    device, else the input's. Half-precision inputs or weights compute in float32: the kernels
    compute and accumulate in one dtype, and float32 keeps the dense layer's accuracy (whose
    half-precision products accumulate in float32 too)."""
    device = x.device.type
    autocast = x.is_floating_point() and torch.is_autocast_enabled(device)
    if not autocast and x.dtype == values.dtype and x.dtype not in _HALF:
        return x, values, bias, None
    if autocast:
        out = torch.get_autocast_dtype(device)
    elif x.dtype != values.dtype:
        raise RuntimeError(
            f"{layer}: the input is {x.dtype} but the weights are {values.dtype}; cast the "
            "input (or the model), or compute under torch.autocast, as for the dense layer"
        )
    else:
        out = x.dtype
    half = out in _HALF or x.dtype in _HALF or values.dtype in _HALF
    compute = torch.float32 if half else values.dtype
    return x.to(compute), values.to(compute), None if bias is None else bias.to(compute), out


def _no_autocast(t: Tensor) -> contextlib.AbstractContextManager[Any]:
    """Autocast off for ``t``'s device where it is on: the kernels' PyTorch operations compute
    in the dtype the layer chose (:func:`_in_compute_dtype`), not autocast's."""
    device = t.device.type
    if torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


# Batches of at most this many samples run inference as row products (kernels.ops.linear_rows):
# the panels of the training kernels hold 16 samples or more, and a smaller batch would pay for
# the padding (docs/performance.md, "Structured sparsity", times where they meet).
ROWS_MAX_BATCH = 2


class SparseLinear(_ComputeChoice, _DenseFace, nn.Module):
    """``nn.Linear`` computing with a CSR weight (see :class:`SparseWeight`).

    ``backend``: ``"auto"``, ``"cpp"`` or ``"torch"`` (:func:`sparselearn.kernels.kernels_for`).
    ``threads``: the most threads its compiled kernels use (None: all of
    ``torch.get_num_threads()``); a small layer can run faster on one thread than pay for
    waking the others (``sl.accelerate`` times both). The results do not depend on it.
    :attr:`inference` (set after construction): ``"sparse"`` (the default) or ``"dense"`` where no
    gradient is recorded. Under autocast, and with half-precision inputs or weights, it
    computes in float32 and returns the dtype the dense layer would (:func:`_in_compute_dtype`).
    """

    def __init__(
        self,
        linear: nn.Linear,
        mask: Tensor | SparseWeight,
        backend: str = "auto",
        threads: int | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # (a SparseWeight: the weight already held sparse, e.g. materialised from the meta device)
        self.weight_sparse = (
            mask if isinstance(mask, SparseWeight) else SparseWeight(linear.weight, mask)
        )
        self.bias = linear.bias
        self.backend = backend
        self.threads = check_threads(threads)

    def _compute(self, x: Tensor) -> Tensor:
        w = self.weight_sparse
        dense = self._dense_weight()
        if dense is not None:
            return F.linear(x, dense, self.bias)
        lead = x.shape[:-1]
        x2, values, bias, out = _in_compute_dtype(
            x.reshape(-1, self.in_features), w.values, self.bias, type(self).__name__
        )  # (B, in)
        kernels = kernels_for(x2, self.backend, self.threads)
        wants_grad = torch.is_grad_enabled() and (
            x2.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad)
        )
        y: Tensor
        if x2.shape[0] <= ROWS_MAX_BATCH and not wants_grad:
            # a few samples and no gradient (inference): row products, no panels
            y = kops.linear_rows(x2, w.crow, w.col, values.detach(), w.rows, bias, kernels)
            if out is not None:
                y = y.to(out)
        elif out is None:
            y = _sparse_linear(x2, values, bias, w, kernels)
        else:
            with _no_autocast(x2):
                y = _sparse_linear(x2, values, bias, w, kernels).to(out)
        return y if x.dim() == 2 else y.reshape(*lead, self.out_features)

    def to_dense_module(self) -> nn.Module:
        v = self.weight_sparse.values
        dense = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, v.device, v.dtype
        )
        return _holding_weights(self, dense)

    def extra_repr(self) -> str:
        w = self.weight_sparse
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"density={w.nnz / (w.rows * w.fan_in):.4f}, backend={self.backend}"
            + ("" if self.threads is None else f", threads={self.threads}")
            + self._choices_repr()
        )


class SparseConv1D(SparseLinear):
    """Hugging Face's ``Conv1D`` (GPT-2's Linear layer: ``y = x @ W + b``, ``W`` of shape
    (in, out)) computing with a CSR weight: the transpose of ``W`` is stored, so it is a
    :class:`SparseLinear` of the same result. ``mask`` is in the Conv1D's (in, out) shape."""

    def __init__(
        self, conv1d: nn.Module, mask: Tensor, backend: str = "auto", threads: int | None = None
    ) -> None:
        nn.Module.__init__(self)
        weight = conv1d.weight
        assert isinstance(weight, Tensor)
        self.in_features, self.out_features = int(weight.shape[0]), int(weight.shape[1])
        self.weight_sparse = SparseWeight(weight.t(), mask.t())
        bias = conv1d.bias
        self.bias = bias if isinstance(bias, nn.Parameter) else None  # type: ignore[assignment]
        self.backend = backend
        self.threads = check_threads(threads)
        self._conv1d_type = type(conv1d)  # transformers' class, rebuilt by to_dense_module

    _weight_transposed = True

    def to_dense_module(self) -> nn.Module:
        v = self.weight_sparse.values
        dense = self._conv1d_type(self.out_features, self.in_features)  # Conv1D(nf, nx)
        return _holding_weights(self, dense.to(device=v.device, dtype=v.dtype))


# Output planes of at most this many positions compute as a product over patches (im2col and
# the Linear kernels): on small planes the per-sample plane kernels spend their time on plane
# edges and loop overhead, while the patch matrix gives the Linear kernels long rows; on larger
# planes the patch matrix (kh * kw copies of the input) costs more than it saves. A batch that
# the compiled kernels run on batch panels (one vector of samples per position: no plane edges)
# keeps planes down to PANEL_UNFOLD_MAX_POSITIONS (docs/performance.md, table "Convolutions on
# small outputs", measures where they meet).
UNFOLD_MAX_POSITIONS = 16
PANEL_UNFOLD_MAX_POSITIONS = 4

_ALGORITHMS = ("auto", "planes", "unfold")


class SparseConv2d(_ComputeChoice, _DenseFace, nn.Module):
    """``nn.Conv2d`` (groups 1, dilation 1, zero padding) computing directly with a CSR weight.

    ``algorithm``: ``"planes"`` walks shifted input planes (a stride above 1 runs as a stride-1
    convolution over the input's phase planes, :class:`_Phases`, except on steps that hand the
    dense weight gradient to the engine, which take a direct strided kernel); ``"unfold"``
    multiplies the input's patches (im2col) by the weight with the Linear kernels;
    ``"auto"`` (default) unfolds output planes of at most :data:`UNFOLD_MAX_POSITIONS`
    positions (:data:`PANEL_UNFOLD_MAX_POSITIONS` for a batch that the compiled kernels run on
    batch panels), where planes leave the kernels too little to vectorise over. The choice
    depends on the input's shape and dtype and on the backend only, so a run computes the same
    way every time it is resumed.
    ``backend`` and ``threads`` as for :class:`SparseLinear`.
    """

    # what model code reads of an nn.Conv2d (the settings the kernels compute)
    dilation = (1, 1)
    groups = 1
    padding_mode = "zeros"

    def __init__(
        self,
        conv: nn.Conv2d,
        mask: Tensor | SparseWeight,
        backend: str = "auto",
        algorithm: str = "auto",
        threads: int | None = None,
    ) -> None:
        super().__init__()
        if not supports_conv(conv):
            raise ValueError(f"unsupported convolution for the sparse kernels: {conv}")
        if algorithm not in _ALGORITHMS:
            raise ValueError(f"algorithm must be one of {_ALGORITHMS}, got {algorithm!r}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = conv.kernel_size
        self.stride: tuple[int, int] = conv.stride  # type: ignore[assignment]
        self.padding: tuple[int, int] = conv.padding  # type: ignore[assignment]
        self.weight_sparse = (
            mask if isinstance(mask, SparseWeight) else SparseWeight(conv.weight, mask)
        )
        self.bias = conv.bias
        self.backend = backend
        self.algorithm = algorithm
        self.threads = check_threads(threads)
        # the structures its kernels may need, derived from weight_sparse now (not while a
        # model is compiled) and rebuilt with it: the stride-1 form of a strided convolution
        # (a pointwise unpadded one reads one phase plane as its input instead), and the
        # matrix of a product over patches, for small outputs
        w = self.weight_sparse
        if self.stride[0] > 1 and not self._pointwise_unpadded():
            w.derived["phases"] = _Phases(w, self.stride[0])
        w.derived["unfolded"] = _Unfolded(w)

    def phases(self) -> _Phases:
        """The stride-1 form of this strided convolution (rebuilt when the mask changes)."""
        ph = self.weight_sparse.derived["phases"]
        assert isinstance(ph, _Phases)
        return ph

    def unfolded(self) -> _Unfolded:
        """The weight as the matrix of a product over patches (rebuilt when the mask changes)."""
        u = self.weight_sparse.derived["unfolded"]
        assert isinstance(u, _Unfolded)
        return u

    def _pointwise_unpadded(self) -> bool:
        return self.kernel_size == (1, 1) and self.padding == (0, 0)

    def output_size(self, input_hw: tuple[int, int]) -> tuple[int, int]:
        (h, wd), (pad_h, pad_w), (kh, kw) = input_hw, self.padding, self.kernel_size
        s = self.stride[0]
        return (h + 2 * pad_h - kh) // s + 1, (wd + 2 * pad_w - kw) // s + 1

    def algorithm_for(
        self,
        input_hw: tuple[int, int],
        batch: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> str:
        """``"planes"`` or ``"unfold"``: how an input of this height and width is computed on
        the CPU (with ``batch``: a batch of that many samples, of ``dtype``)."""
        if batch is None:
            return self._algorithm(input_hw, False)
        kernels = kernels_for(torch.empty(0, dtype=dtype), self.backend, self.threads)
        return self._algorithm(input_hw, self._on_panels(batch, dtype, kernels))

    def _on_panels(self, batch: int, dtype: torch.dtype, kernels: int) -> bool:
        """Whether the stride-1 kernels (of a strided convolution: over its phase planes) run a
        batch on batch panels."""
        s = self.stride[0]
        kh, kw = -(-self.kernel_size[0] // s), -(-self.kernel_size[1] // s)
        return kops.uses_panels(batch, kh, kw, dtype, kernels)

    def _algorithm(self, input_hw: tuple[int, int], on_panels: bool) -> str:
        if self.algorithm != "auto":
            return self.algorithm
        oh, ow = self.output_size(input_hw)
        limit = PANEL_UNFOLD_MAX_POSITIONS if on_panels else UNFOLD_MAX_POSITIONS
        return "unfold" if oh * ow <= limit else "planes"

    def _compute(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"SparseConv2d takes a batched (N, C, H, W) input, got shape {tuple(x.shape)}"
            )
        w = self.weight_sparse
        dense = self._dense_weight()
        if dense is not None:
            return F.conv2d(x, dense, self.bias, self.stride, self.padding)
        x, values, bias, out = _in_compute_dtype(x, w.values, self.bias, type(self).__name__)
        if out is None:
            return self._forward_sparse(x, values, bias)
        with _no_autocast(x):
            return self._forward_sparse(x, values, bias).to(out)

    def _forward_sparse(self, x: Tensor, values: Tensor, bias: Tensor | None) -> Tensor:
        """The convolution on the kernels, ``values`` and ``bias`` in ``x``'s dtype."""
        w = self.weight_sparse
        out_hw = self.output_size((x.shape[2], x.shape[3]))
        kernels = kernels_for(x, self.backend, self.threads)
        on_panels = self._on_panels(x.shape[0], x.dtype, kernels)
        if self._algorithm((x.shape[2], x.shape[3]), on_panels) == "unfold":
            return self._forward_unfolded(x, values, bias, out_hw, kernels)
        fused, rest = _split_bias(bias, x)
        stride = self.stride[0]
        if stride > 1 and self._pointwise_unpadded():
            # a pointwise convolution reads every s-th row and column only: phase plane (0, 0),
            # the input of a stride-1 one (all s * s planes would be built, one of them read)
            x, stride = _FirstPhaseFn.apply(x, stride, out_hw, kernels), 1  # type: ignore[no-untyped-call]
        if stride > 1 and w.dense_grad_probe is None:
            # strided: a stride-1 convolution over the phase planes (the stride-1 kernels read
            # contiguous slices, where a strided walk reads every s-th element); steps that
            # need the dense gradient take the direct path below, which computes it in the
            # weight's own shape
            ph = self.phases()
            y: Tensor = _SparseConv2dFn.apply(  # type: ignore[no-untyped-call]
                x,
                values[ph.index],
                fused,
                ph,
                self.stride[0],
                self.padding,
                kernels,
                ph.planes_size(out_hw),
            )
        else:
            y = _SparseConv2dFn.apply(  # type: ignore[no-untyped-call]
                x, values, fused, w, stride, self.padding, kernels, None, w.dense_grad_probe
            )
        return y if rest is None else y + rest.view(1, -1, 1, 1)

    def _forward_unfolded(
        self, x: Tensor, values: Tensor, bias: Tensor | None, out_hw: tuple[int, int], kernels: int
    ) -> Tensor:
        n = x.shape[0]
        rows: Tensor = _PatchesFn.apply(  # type: ignore[no-untyped-call]
            x, self.kernel_size, self.stride[0], self.padding, out_hw, kernels
        )  # (N * OH * OW, C * kh * kw)
        y = _sparse_linear(rows, values, bias, self.unfolded(), kernels)
        y = y.view(n, out_hw[0], out_hw[1], self.out_channels).permute(0, 3, 1, 2)
        return y.contiguous()

    def to_dense_module(self) -> nn.Module:
        v = self.weight_sparse.values
        kh, kw = self.kernel_size
        dense = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            (kh, kw),
            stride=self.stride,
            padding=self.padding,
            bias=self.bias is not None,
            device=v.device,
            dtype=v.dtype,
        )
        return _holding_weights(self, dense)

    def extra_repr(self) -> str:
        w = self.weight_sparse
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, "
            f"density={w.nnz / (w.rows * w.fan_in):.4f}, algorithm={self.algorithm}, "
            f"backend={self.backend}"
            + ("" if self.threads is None else f", threads={self.threads}")
            + self._choices_repr()
        )


def _holding_weights(layer: SparseLinear | SparseConv2d, dense: nn.Module) -> nn.Module:
    """``dense``, a fresh layer of the type ``layer`` replaced, given its weight and bias (zero
    where ``layer`` has none), in its training mode (:meth:`_DenseFace.to_dense_module`)."""
    weight, bias = dense.weight, dense.bias
    assert isinstance(weight, Tensor)
    stored = layer.weight_sparse.dense()
    with torch.no_grad():
        weight.copy_(stored.t() if layer._weight_transposed else stored)
        if isinstance(bias, Tensor):
            bias.copy_(layer.bias if layer.bias is not None else torch.zeros_like(bias))
    return dense.train(layer.training)


def supports_conv(conv: nn.Conv2d) -> bool:
    """Groups 1, dilation 1, square stride, numeric zero padding."""
    return (
        conv.groups == 1
        and conv.dilation == (1, 1)
        and conv.stride[0] == conv.stride[1]
        and not isinstance(conv.padding, str)
        and conv.padding_mode == "zeros"
    )
