"""How the engine holds one sparsified weight tensor: behind one protocol, as a masked dense
weight or as CSR values in an accelerated layer. The engine and its mask updates never ask
which one they hold.

Two layouts meet here. The *weight's shape* is the tensor the model computes with (masks,
scores, dense gradients are in it). The *parameter's layout* is what the optimizer holds and
keeps state for: the whole weight for :class:`MaskedDense`, the active values only (in CSR
order) for :class:`CSRStorage`. ``to_weight_shape``, ``from_weight_shape`` and
``param_positions`` translate between them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from .placement import WHOLE, Placement

if TYPE_CHECKING:
    from ..targets import Target


class RowsGrad(Protocol):
    """A dense gradient held in a form that gives any block of its rows (an accelerated
    Linear's captured factors, ``parts``): a mask update reads a large layer block by block."""

    shape: tuple[int, ...]
    parts: list[tuple[Tensor, Tensor]]

    def rows(self, start: int, stop: int) -> Tensor: ...

    def at(self, rows: Tensor, cols: Tensor) -> Tensor: ...

    def dense(self) -> Tensor: ...

    def finite(self) -> bool: ...


class CSRWeight(Protocol):
    """What :class:`CSRStorage` uses of a weight held as CSR (an accelerated layer's
    :class:`~sparselearn.accel.SparseWeight`)."""

    values: nn.Parameter  # the active values, in CSR order
    shape: tuple[int, ...]  # the stored (out, in, ...) shape
    crow: Tensor  # row pointers (int64, rows + 1)
    col: Tensor  # column of each value, in CSR order
    version: int  # bumped whenever the structure changes
    dense_grad_probe: Tensor | None

    @property
    def nnz(self) -> int: ...

    def positions(self) -> Tensor: ...

    def mask(self) -> Tensor: ...

    def dense(self) -> Tensor: ...

    def restructure(self, new_mask: Tensor) -> Tensor: ...

    def restructure_positions(self, positions: Tensor, old: Tensor | None = None) -> Tensor: ...

    def arm_dense_grad(self, wanted: bool) -> None: ...

    def captured_grad(self) -> RowsGrad | None: ...

    def grad_from_factors(self, parts: list[tuple[Tensor, Tensor]]) -> RowsGrad: ...


class LayerStorage(Protocol):
    """One sparsified weight tensor as the engine holds it."""

    name: str  # fully qualified, as in model.named_parameters()
    fixed: bool  # a layer_density override: its own count, never shared with other layers
    final_count: int  # active weights at the target density
    kind: str  # "masked" (dense weight, masked) or "csr" (active values only)
    placement: Placement  # where the weight lives: the part of it this process holds

    @property
    def param(self) -> nn.Parameter:
        """The parameter the optimizer holds for this weight."""
        ...

    @property
    def mask(self) -> Tensor:
        """Bool, the weight's shape: the active positions (the truth)."""
        ...

    @property
    def active(self) -> int: ...

    @property
    def numel(self) -> int: ...

    @property
    def shape(self) -> torch.Size: ...

    @property
    def device(self) -> torch.device: ...

    def weight(self) -> Tensor:
        """The weight in its shape, detached (materialised for CSR)."""
        ...

    def weight_at(self, positions: Tensor) -> Tensor:
        """The weight's values at flat ``positions`` (ascending), without materialising the
        weight where the layout holds them (CSR: its values at the active positions)."""
        ...

    def install(self, new: Tensor, active: int | None = None) -> Tensor | None:
        """Adopt the mask ``new`` (``active``: its count, where the caller knows it); kept
        weights keep their values, new ones are zero. Returns None where the parameter keeps
        its layout, else the parameter is a new one and, for each of its entries, the index of
        its value in the old parameter (-1: a new position)."""
        ...

    def zero_inactive_(self, tensor: Tensor) -> None:
        """Exact zeros at the inactive positions of ``tensor`` (the parameter or its gradient,
        in the parameter's layout)."""
        ...

    def to_weight_shape(self, values: Tensor) -> Tensor:
        """A per-weight tensor in the parameter's layout, in the weight's shape (zeros where
        the layout holds nothing)."""
        ...

    def local(self, tensor: Tensor) -> Tensor:
        """A tensor of the parameter's layout (the parameter, its gradient, optimizer state) as
        this process holds it: the same storage, in-place changes reach it."""
        ...

    def from_weight_shape(self, tensor: Tensor) -> Tensor:
        """A tensor of the weight's shape in the parameter's layout."""
        ...

    def param_positions(self, positions: Tensor) -> Tensor:
        """Bool positions of the weight's shape as bool entries of the parameter's layout
        (positions the layout does not hold are dropped)."""
        ...

    def snapshot_grad(self) -> Tensor | RowsGrad:
        """This step's dense gradient in the weight's shape (or as blocks of its rows)."""
        ...

    def want_dense_grad(self, wanted: bool) -> None:
        """Whether the coming step must produce the dense gradient (storage whose gradient
        is not dense computes it on those steps only)."""
        ...

    def check_loadable(self, mask: Tensor) -> str | None:
        """Why ``mask`` (of a saved state) cannot be loaded here, or None."""
        ...

    def load_mask(self, mask: Tensor) -> None:
        """Adopt a saved mask (checked with :meth:`check_loadable` first)."""
        ...

    def sync_device(self) -> None:
        """Follow the parameter if the model was moved or cast after ``sparsify``; raise if
        the mask was changed in place behind the engine's back."""
        ...

    def release(self) -> None:
        """Drop what was materialised for a mask update."""
        ...

    def count(self, positions: Tensor) -> int:
        """True entries of a bool tensor of this layer's mask layout, over the whole weight
        (summed over the ranks where each holds a block of it)."""
        ...

    def public_mask(self) -> Tensor:
        """The mask as ``engine.masks`` shows it (a DTensor for a sharded weight)."""
        ...

    def saved_structure(self) -> Tensor:
        """The mask as a state saves it: bool, of the mask's shape, or for a layer held in
        index form its active flat positions (int64, ascending), never a tensor of the
        weight's size."""
        ...


class MaskedDense:
    """A weight kept dense, with its mask: the optimizer holds the weight. Where the process
    holds a part of the weight only (``placement``: e.g. FSDP2's block of rows), ``mask``,
    ``weight()``, gradients and every per-weight tensor the engine handles are the part's;
    ``active``, ``numel`` and ``shape`` are the whole weight's."""

    kind = "masked"

    __slots__ = (
        "_seen",
        "_zero",
        "_zeroed",
        "active",
        "final_count",
        "fixed",
        "mask",
        "name",
        "param",
        "placement",
    )

    def __init__(
        self, target: Target, mask: Tensor, final_count: int, placement: Placement = WHOLE
    ) -> None:
        self.name = target.name
        self.param = target.param
        self.placement = placement
        self.fixed = target.density is not None
        self.final_count = final_count
        self.mask = mask  # bool, the truth
        # what zero_inactive_ applies, built on its second use: a weight accelerated right
        # after sparsify (its masks applied once) never holds it, all layers' at once
        self._zero: Tensor | None = None
        self._zeroed = 0
        self.active = placement.count(mask)  # kept in step with the mask
        self._seen = mask._version  # in-place changes the engine did not make show up here

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def shape(self) -> torch.Size:
        return self.placement.whole_shape(self.mask.shape)

    @property
    def device(self) -> torch.device:
        return self.param.device

    def weight(self) -> Tensor:
        return self.placement.local(self.param).detach()

    def weight_at(self, positions: Tensor) -> Tensor:
        return self.weight().reshape(-1)[positions]

    def install(self, new: Tensor, active: int | None = None) -> Tensor | None:
        self.mask.copy_(new)
        if self._zero is None:
            pass
        elif self._zero.dtype == torch.bool:
            torch.logical_not(new, out=self._zero)
        else:
            self._zero.copy_(new).neg_()
        self.active = self.placement.count(new) if active is None else active
        self._seen = self.mask._version
        return None

    def zero_inactive_(self, tensor: Tensor) -> None:
        # exact zeros even over inf and NaN (a product with a 0/1 mask would keep NaN)
        tensor = self.placement.local(tensor)
        z = self._zero
        if z is None:
            self._zeroed += 1
            if self._zeroed < 2:
                tensor.masked_fill_(~self.mask, 0)
                return
            z = self._zero = _zeroing_mask(self.mask, self.param.dtype)
        if z.dtype == torch.bool:
            tensor.masked_fill_(z, 0)
        elif (
            tensor.dtype.itemsize == z.dtype.itemsize
            and tensor.shape == z.shape
            and tensor.device == z.device
        ):
            # elementwise by index: any memory format (e.g. channels_last) gives the same result
            tensor.view(z.dtype).bitwise_and_(z)
        else:  # e.g. a gradient in another dtype than the weight
            tensor.masked_fill_(~self.mask, 0)

    def to_weight_shape(self, values: Tensor) -> Tensor:
        return self.placement.local(values)

    def from_weight_shape(self, tensor: Tensor) -> Tensor:
        return self.placement.local(tensor)

    def local(self, tensor: Tensor) -> Tensor:
        return self.placement.local(tensor)

    def param_positions(self, positions: Tensor) -> Tensor:
        return positions

    def snapshot_grad(self) -> Tensor:
        g = self.param.grad
        if g is None:
            return torch.zeros_like(self.mask, dtype=self.param.dtype)
        return self.placement.local(g).detach().clone()

    def want_dense_grad(self, wanted: bool) -> None:
        pass  # the gradient of a dense weight is dense already

    def check_loadable(self, mask: Tensor) -> str | None:
        return None

    def load_mask(self, mask: Tensor) -> None:
        self.sync_device()
        self.install(as_mask(mask, self.mask.shape).to(self.mask.device))

    def sync_device(self) -> None:
        if self.mask._version != self._seen:
            raise_edited(self.name)
        if self.mask.device != self.param.device:
            self.mask = self.mask.to(self.param.device)
            self._seen = self.mask._version
        z = self._zero
        if z is not None and (
            z.device != self.param.device
            or (z.dtype != torch.bool and z.dtype.itemsize != self.param.dtype.itemsize)
        ):
            self._zero = _zeroing_mask(self.mask, self.param.dtype)

    def release(self) -> None:
        pass  # nothing is materialised

    def count(self, positions: Tensor) -> int:
        return self.placement.count(positions)

    def public_mask(self) -> Tensor:
        return self.placement.public(self.mask)

    def saved_structure(self) -> Tensor:
        return self.mask.clone()


class Planned:
    """A weight of a model built on the meta device (shapes without values): its active
    positions only, drawn by ``sparsify`` as a list, until ``sl.accelerate`` materialises the
    values at those positions in a layer that holds only them (:class:`CSRStorage`). Nothing
    of the weight's size exists before or after."""

    kind = "planned"
    placement: Placement = WHOLE

    def __init__(self, target: Target, positions: Tensor, final_count: int) -> None:
        self.name = target.name
        self.param = target.param
        self.fixed = target.density is not None
        self.final_count = final_count
        self.positions = positions  # int64, ascending, on the CPU

    @property
    def mask(self) -> Tensor:
        m = torch.zeros(self.numel, dtype=torch.bool)
        m[self.positions] = True
        return m.view(self.shape)

    @property
    def active(self) -> int:
        return self.positions.numel()

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def _unmaterialised(self) -> RuntimeError:
        return RuntimeError(
            f"{self.name} is on the meta device (no values yet): call sl.accelerate(model, "
            "engine) first, which materialises its active weights"
        )

    def weight(self) -> Tensor:
        raise self._unmaterialised()

    def weight_at(self, positions: Tensor) -> Tensor:
        raise self._unmaterialised()

    def install(self, new: Tensor, active: int | None = None) -> Tensor | None:
        raise self._unmaterialised()

    def zero_inactive_(self, tensor: Tensor) -> None:
        pass  # nothing is held

    def to_weight_shape(self, values: Tensor) -> Tensor:
        raise self._unmaterialised()

    def from_weight_shape(self, tensor: Tensor) -> Tensor:
        raise self._unmaterialised()

    def local(self, tensor: Tensor) -> Tensor:
        return tensor

    def param_positions(self, positions: Tensor) -> Tensor:
        raise self._unmaterialised()

    def snapshot_grad(self) -> Tensor:
        raise self._unmaterialised()

    def want_dense_grad(self, wanted: bool) -> None:
        pass

    def check_loadable(self, mask: Tensor) -> str | None:
        return None

    def load_mask(self, mask: Tensor) -> None:
        self.positions = as_positions(mask).cpu()

    def sync_device(self) -> None:
        pass

    def release(self) -> None:
        pass

    def count(self, positions: Tensor) -> int:
        return count(positions)

    def public_mask(self) -> Tensor:
        return self.mask

    def saved_structure(self) -> Tensor:
        return self.positions.clone()


class CSRStorage:
    """A weight stored as CSR in an accelerated module (:class:`~sparselearn.accel.SparseWeight`):
    the optimizer holds only the active values. Masks, dense weights and gradients are
    materialised for mask updates only.

    ``transposed``: the module's parameter is the transpose of the stored (out, in) matrix
    (Hugging Face's ``Conv1D`` keeps its weight as (in, out)); masks, weights and gradients are
    then given in the parameter's (in, out) shape, and the values stay in the stored CSR order.
    """

    kind = "csr"
    placement: Placement = WHOLE  # accelerated layers compute with whole CSR weights

    def __init__(self, old: LayerStorage, storage: CSRWeight, *, transposed: bool = False) -> None:
        self.name = old.name
        self.fixed = old.fixed
        self.final_count = old.final_count
        self.storage = storage
        self.transposed = transposed
        self._mask: Tensor | None = None
        self._mask_version = -1
        self._mask_seen = 0

    @property
    def param(self) -> nn.Parameter:
        return self.storage.values

    @property
    def mask(self) -> Tensor:
        if self._mask is None or self._mask_version != self.storage.version:
            self._mask = self._shaped(self.storage.mask())
            self._mask_version = self.storage.version
            self._mask_seen = self._mask._version
        return self._mask

    def _shaped(self, stored: Tensor) -> Tensor:
        """A tensor of the stored (out, in, ...) shape in the parameter's shape."""
        return stored.t().contiguous() if self.transposed else stored

    def _stored(self, shaped: Tensor) -> Tensor:
        """The inverse of :meth:`_shaped` (a view where it can be)."""
        return shaped.t() if self.transposed else shaped

    @property
    def active(self) -> int:
        return int(self.storage.nnz)

    @property
    def numel(self) -> int:
        return math.prod(self.storage.shape)

    @property
    def shape(self) -> torch.Size:
        shape = tuple(self.storage.shape)
        return torch.Size(shape[::-1] if self.transposed else shape)

    @property
    def device(self) -> torch.device:
        return self.param.device

    def weight(self) -> Tensor:
        return self._shaped(self.storage.dense())

    def weight_at(self, positions: Tensor) -> Tensor:
        # the values are in the stored matrix's row-major order: the active positions in
        # ascending order where the stored matrix is the weight itself
        values = self.param.detach()
        if (
            not self.transposed
            and positions.numel() == values.numel()
            and torch.equal(positions, self.storage.positions().to(positions.device))
        ):
            return values
        return self.weight().reshape(-1)[positions]

    @property
    def listed(self) -> bool:
        """Whether mask updates may handle this layer in index form (:mod:`.listed`): its
        active positions as a list, its signals and scores block by block of rows. A Linear's
        (out, in) weight stored as itself."""
        return not self.transposed and len(self.storage.shape) == 2

    def positions(self) -> Tensor:
        """The active flat positions (int64, ascending: the values' CSR order)."""
        return self.storage.positions()

    def rows_of(self, values: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Rows ``start:stop`` of the weight: (the dense block holding ``values``, of the
        parameter's layout, at the active positions, and the block's bool mask)."""
        crow, col = self.storage.crow, self.storage.col
        lo, hi = int(crow[start]), int(crow[stop])
        fan_in = self.storage.shape[1]
        rows = torch.repeat_interleave(
            torch.arange(stop - start, device=col.device),
            crow[start : stop + 1].diff(),
            output_size=hi - lo,
        )
        flat = rows * fan_in + col[lo:hi].long()
        dense = torch.zeros((stop - start) * fan_in, dtype=values.dtype, device=values.device)
        dense[flat] = values[lo:hi]
        mask = torch.zeros((stop - start) * fan_in, dtype=torch.bool, device=col.device)
        mask[flat] = True
        return dense.view(stop - start, fan_in), mask.view(stop - start, fan_in)

    def install_positions(self, positions: Tensor, old: Tensor | None = None) -> Tensor:
        """Adopt the active flat ``positions`` (ascending): as :meth:`install`, without a
        tensor of the weight's size (``old``: :meth:`positions` before, where known)."""
        self._mask = None
        return self.storage.restructure_positions(positions, old)

    def install(self, new: Tensor, active: int | None = None) -> Tensor | None:
        # kept values carried over, new ones zero
        source = self.storage.restructure(self._stored(new).contiguous())
        self._mask, self._mask_version = new.clone(), self.storage.version
        self._mask_seen = self._mask._version
        return source

    def zero_inactive_(self, tensor: Tensor) -> None:
        pass  # structurally sparse: nothing to zero

    def to_weight_shape(self, values: Tensor) -> Tensor:
        stored = self._stored(self.mask)
        dense = torch.zeros(stored.shape, dtype=values.dtype, device=values.device)
        dense[stored] = values  # the values are in the stored matrix's row-major order
        return self._shaped(dense)

    def from_weight_shape(self, tensor: Tensor) -> Tensor:
        return self._stored(tensor)[self._stored(self.mask)]

    def local(self, tensor: Tensor) -> Tensor:
        return tensor

    def param_positions(self, positions: Tensor) -> Tensor:
        return self._stored(positions)[self._stored(self.mask)]

    def snapshot_grad(self) -> Tensor | RowsGrad:
        # the factors the layer's backward passes left since it was armed (a Linear run
        # eagerly), else the gradient of the module's probe (summed over those passes); none:
        # no gradient reached the layer
        captured = self.storage.captured_grad()
        if captured is not None:
            return captured if not self.transposed else self._shaped(captured.dense())
        probe = self.storage.dense_grad_probe
        grad = None if probe is None else probe.grad
        if grad is None:
            return torch.zeros(self.shape, device=self.device)
        return self._shaped(grad.detach())

    def want_dense_grad(self, wanted: bool) -> None:
        self.storage.arm_dense_grad(wanted)

    def check_loadable(self, mask: Tensor) -> str | None:
        if mask.dtype != torch.bool and not self.transposed:  # saved as positions
            if torch.equal(mask.to(self.device), self.positions()):
                return None
        elif torch.equal(as_mask(mask, self.shape).to(self.device), self.mask):
            return None
        return (
            f"{self.name} is accelerated and its structure differs from the saved mask: load "
            "the model's state_dict (which holds the sparse weights) first"
        )

    def load_mask(self, mask: Tensor) -> None:
        pass  # the structure came with the model's state_dict (check_loadable made sure)

    def sync_device(self) -> None:
        # the CSR buffers move with their module; the mask is a view made from them
        if self._mask is not None and self._mask._version != self._mask_seen:
            raise_edited(self.name)

    def release(self) -> None:
        self._mask = None

    def count(self, positions: Tensor) -> int:
        return count(positions)

    def public_mask(self) -> Tensor:
        return self.mask

    def saved_structure(self) -> Tensor:
        return self.positions() if self.listed else self.mask.clone()


def as_positions(saved: Tensor) -> Tensor:
    """A saved structure (a bool mask, or positions) as active flat positions."""
    return saved if saved.dtype != torch.bool else saved.reshape(-1).nonzero().squeeze(1)


def as_mask(saved: Tensor, shape: torch.Size) -> Tensor:
    """A saved structure (a bool mask, or positions) as a bool mask of ``shape``."""
    if saved.dtype == torch.bool:
        return saved
    mask = torch.zeros(math.prod(shape), dtype=torch.bool, device=saved.device)
    mask[saved] = True
    return mask.view(shape)


def raise_edited(name: str) -> None:
    raise RuntimeError(
        f"the mask of {name} was changed in place (engine.masks[{name!r}]); the engine keeps "
        "each mask, its zeroing and the budget together, so masks change only through "
        "engine.update_masks() or engine.load_state_dict()"
    )


_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def _zeroing_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """What :meth:`MaskedDense.zero_inactive_` applies. On CPU: an integer word per weight of
    the weight's width, all one bits where active, zero where not; AND-ing the weight's bits
    with it zeroes the inactive entries exactly and vectorises (``masked_fill_`` with a bool
    mask branches per element and mispredicts; docs/performance.md has the timings). It costs
    the weight's width in memory instead of one byte: elsewhere (GPUs, where ``masked_fill_``
    runs at memory speed) the bool complement is kept instead."""
    if mask.device.type != "cpu" or dtype.itemsize not in _BITS:
        return ~mask
    return mask.to(_BITS[dtype.itemsize]).neg_()


def count(mask: Tensor) -> int:
    """True entries of a bool tensor (``count_nonzero`` is far faster than a bool ``sum()``)."""
    return int(torch.count_nonzero(mask))
