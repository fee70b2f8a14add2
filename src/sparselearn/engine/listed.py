"""Mask updates in index form, for layers that never hold a tensor of their weight's size.

An accelerated Linear keeps its active weights as CSR values (:class:`~.storage.CSRStorage`);
the regrowth of :meth:`~.update.MaskUpdater.regrow` would still build, for each layer, its
dense mask, dense gradient or window momentum, and dense scores. Here the same update is
computed with:

- the active positions as a list (ascending): pruning scores the active values, as a 1-D view;
- growth scored block by block of rows (at most :data:`BLOCK` entries each): the block's mask
  and weight rebuilt from the CSR rows, its dense gradient or window momentum from the factors
  the layer's backward passes left (:class:`~.storage.RowsGrad`,
  :class:`~.signals.FactoredWindow`), and the candidates' scores fed to
  :func:`~sparselearn.selection.streamed.streamed_top_k`, which selects what ``top_k`` selects
  on the whole layer;
- the new structure installed from the positions.

It applies where every layer can be handled so and the criteria allow it: a prune criterion
that scores the active weights from the active weights alone (``active_only``: elementwise
ones, SET's rank), a per-layer elementwise growth criterion and an elementwise redistribution
(each position's score depends on that position only, so a block's scores are the whole
layer's at those positions). A layer that fits in one block is scored exactly as the whole
layer is; a larger one differs from the whole-tensor computation only in how its gradient's
products are rounded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn

from ..config import SparsityConfig
from ..criteria import Criterion, LayerView, Redistribution
from ..schedules import MaskUpdate
from ..selection import bottom_k
from ..selection.streamed import streamed_top_k
from . import distributed
from .scoring import checked
from .signals import FactoredWindow, Signals, _finite, rows_of
from .storage import CSRStorage, LayerStorage, RowsGrad


class MaskUpdater(Protocol):
    """What the listed update uses of :class:`~.update.MaskUpdater` (whose regrowth it is)."""

    config: SparsityConfig
    optimizer: torch.optim.Optimizer
    layers: list[LayerStorage]
    needs: frozenset[str]
    signals: Signals
    generator: Callable[[torch.device], torch.Generator]
    after_step: bool

    @property
    def criteria(self) -> Criteria: ...

    @property
    def step(self) -> int: ...

    def _skip(self, reason: str, rate: float | None) -> MaskUpdate: ...

    def _removals(
        self, rate: float, active: list[int], room: list[int], free: list[int]
    ) -> tuple[list[int], int]: ...

    def _regrowth(
        self, lost: list[int], room: list[int], free: list[int], views: list[LayerView]
    ) -> list[int]: ...

    def _adopt(self, layer: LayerStorage, old: nn.Parameter, source: Tensor) -> None: ...

    def _finish(self, update: MaskUpdate, t0: float) -> MaskUpdate: ...


class Criteria(Protocol):
    @property
    def prune(self) -> Criterion | None: ...

    @property
    def growth(self) -> Criterion | None: ...

    @property
    def redistribution(self) -> Redistribution: ...


BLOCK = 1 << 20
"""The most entries of a weight that a block of rows holds while growth is scored (a dense
float32 block is 4 MiB; a block's tensors together take a few times that)."""


def applies(updater: MaskUpdater) -> bool:
    """Whether :func:`regrow` can compute ``updater``'s regrowth (see the module docstring)."""
    prune, growth = updater.criteria.prune, updater.criteria.growth
    redistribution = updater.criteria.redistribution
    return (
        bool(updater.layers)
        and all(isinstance(layer, CSRStorage) and layer.listed for layer in updater.layers)
        and prune is not None
        and prune.active_only
        and growth is not None
        and growth.elementwise
        and growth.scope == "layer"
        and (redistribution.fn is None or redistribution.elementwise)
        and not distributed.is_parallel()
    )


def _rows_per_block(fan_in: int) -> int:
    return max(1, BLOCK // max(fan_in, 1))


class _Layer:
    """One layer during a listed update: its storage, active positions and 1-D view."""

    def __init__(self, updater: MaskUpdater, layer: CSRStorage) -> None:
        self.updater, self.layer = updater, layer
        self.values = layer.param.detach()
        signals = updater.signals
        reads = {}
        if "momentum" in updater.needs:
            reads["momentum"] = lambda: signals.active_momentum(layer)
        if "grad" in updater.needs:
            reads["grad"] = self._active_grad
        every = torch.ones(1, dtype=torch.bool, device=self.values.device)
        self.view = LayerView(
            layer.name,
            self.values,
            every.expand(self.values.numel()),  # (one byte, however many are active)
            signals=reads,
            generator=updater.generator(layer.device),
        )

    def _active_grad(self) -> Tensor:
        """The dense gradient at the active positions, gathered block by block."""
        held = self.updater.signals.grad_held(self.layer)
        crow = self.layer.storage.crow
        fan_in = self.layer.storage.shape[1]
        positions = self.layer.positions()
        parts = []
        for start, stop in self.blocks():
            lo, hi = int(crow[start]), int(crow[stop])
            block = rows_of(held, start, stop).reshape(-1)
            parts.append(block[positions[lo:hi] - start * fan_in])
        return torch.cat(parts)

    def blocks(self) -> list[tuple[int, int]]:
        rows, fan_in = self.layer.storage.shape[0], self.layer.storage.shape[1]
        step = _rows_per_block(fan_in)
        return [(start, min(start + step, rows)) for start in range(0, rows, step)]

    def growth_view(self, start: int, stop: int, kept: Tensor, n_grow: int) -> LayerView:
        """The growth criterion's view of rows ``start:stop``."""
        layer, signals = self.layer, self.updater.signals
        kept_rows, mask = layer.rows_of(kept, start, stop)
        reads = {}
        if "momentum" in self.updater.needs:

            def momentum() -> Tensor:
                m, _ = layer.rows_of(signals.active_momentum(layer), start, stop)
                window = signals.window.get(layer.name)
                if window is None:
                    return m
                return torch.where(mask, m, rows_of(window, start, stop).to(m.dtype))

            reads["momentum"] = momentum
        if "grad" in self.updater.needs:
            held = signals.grad_held(layer)
            reads["grad"] = lambda: rows_of(held, start, stop)
        return LayerView(
            layer.name,
            lambda: layer.rows_of(self.values, start, stop)[0],  # built where a criterion reads it
            mask,
            signals=reads,
            generator=self.updater.generator(layer.device),
            kept=kept_rows,
            n_grow=n_grow,
            noise=layer.placement.noise,
        )


@torch.no_grad()
def regrow(updater: MaskUpdater, rate: float) -> MaskUpdate:
    """:meth:`MaskUpdater.regrow` in index form (where :func:`applies`)."""
    t0 = time.perf_counter()
    prune, growth = updater.criteria.prune, updater.criteria.growth
    assert prune is not None
    assert growth is not None
    storages = updater.layers
    layers = [_Layer(updater, layer) for layer in storages]  # type: ignore[arg-type]
    bad = _non_finite(updater, layers)
    if bad:
        return updater._skip(f"non-finite {bad}", rate)
    active = [layer.active for layer in storages]
    room = [layer.numel - a for layer, a in zip(storages, active, strict=True)]
    free = [i for i, layer in enumerate(storages) if not layer.fixed]

    remove, total_free = updater._removals(rate, active, room, free)
    glob = prune.scope == "global" and len(free) > 0
    # per-layer pruning is settled layer by layer; a global criterion keeps its scores
    pruned: list[Tensor | None] = [None] * len(layers)
    held: dict[int, Tensor] = {}
    for i, entry in enumerate(layers):
        s = checked(prune, prune.fn(entry.view), entry.values.shape, entry.layer.name)
        if not _finite(s):
            return updater._skip(
                f"criterion {prune.name!r} gave non-finite scores for {entry.layer.name}", rate
            )
        if glob and i in free:
            held[i] = s
        else:
            every = torch.ones(1, dtype=torch.bool, device=s.device).expand(s.numel())
            pruned[i] = bottom_k(s, every, remove[i], updater.generator(s.device), count=s.numel())
    if glob:
        for i, chosen in zip(free, _pruned_across(updater, layers, held, total_free), strict=True):
            pruned[i] = chosen
        held.clear()
    kept = [p.logical_not() for p in pruned if p is not None]
    lost = [int(torch.count_nonzero(p)) for p in pruned if p is not None]
    del pruned

    growth_views = [
        LayerView(
            e.layer.name,
            e.values,
            e.view.mask,
            signals=e.view._signals,
            generator=e.view._generator,
            kept=k,
        )
        for e, k in zip(layers, kept, strict=True)
    ]
    grow = updater._regrowth(lost, room, free, growth_views)
    for view in growth_views:
        view.release()
    del growth_views

    # every layer's growth is selected before any is installed: an update that is skipped
    # leaves every mask as it was
    grown = []
    for i, entry in enumerate(layers):
        picked = _grow(entry, kept[i], grow[i], room[i])
        if isinstance(picked, str):
            return updater._skip(picked, rate)
        grown.append(picked.to(torch.int32))  # (an accelerated weight has < 2**31 entries)
        updater.signals.dense_grads.pop(entry.layer.name, None)
        if updater.after_step:
            entry.layer.want_dense_grad(False)
        release_freed_memory()

    update = MaskUpdate(updater.step, "regrow", rate)
    for i, storage in enumerate(storages):
        assert isinstance(storage, CSRStorage)
        entry = layers[i]
        carried = _window_momentum_at(updater, entry, grown[i])
        layers[i] = None  # type: ignore[call-overload]  # its view of the old values goes
        del entry
        before = storage.positions()
        grown[i] = grown[i].long()
        new = _merged(before[kept[i]], grown[i])
        old = storage.param
        source = storage.install_positions(new, before)
        del before
        updater._adopt(storage, old, source)
        del source, old
        if carried is not None:
            _carry(updater, storage, new, grown[i], carried)
        del new
        kept[i] = grown[i] = torch.empty(0)  # freed layer by layer
        release_freed_memory()
        update.pruned[storage.name] = lost[i]
        update.grown[storage.name] = grow[i]
    return updater._finish(update, t0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere
    nothing). A restructured layer frees as much as it allocates, but in pieces of a few MiB
    scattered in the heap among the new structure's, which the allocator keeps: over the layers
    of one update they added up to a gigabyte of resident memory that nothing used."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _merged(kept: Tensor, grown: Tensor) -> Tensor:
    """The union of two ascending, disjoint lists of positions, ascending (without sorting)."""
    out = torch.empty(kept.numel() + grown.numel(), dtype=kept.dtype, device=kept.device)
    is_grown = torch.zeros(out.numel(), dtype=torch.bool, device=kept.device)
    at = torch.searchsorted(kept, grown)
    at += torch.arange(grown.numel(), device=grown.device)  # grown ones before it, too
    is_grown[at] = True
    out[is_grown] = grown
    out[is_grown.logical_not_()] = kept
    return out


def _non_finite(updater: MaskUpdater, layers: list[_Layer]) -> str | None:
    """As :func:`~.scoring.non_finite_inputs`: the first non-finite weight or signal."""
    signals = updater.signals
    for entry in layers:
        layer = entry.layer
        if not _finite(entry.values):
            return f"weight of {layer.name}"
        for key in sorted(updater.needs):
            if key == "grad":
                held = signals.grad_held(layer)
                ok = _finite_signal(held)
            else:
                window = signals.window.get(layer.name)
                ok = _finite(signals.active_momentum(layer)) and (
                    window is None or _finite_signal(window)
                )
            if not ok:
                return f"{key} of {layer.name}"
    return None


def _finite_signal(signal: Tensor | RowsGrad | FactoredWindow) -> bool:
    """Every entry of a signal finite, however it is held (factors: theirs)."""
    return _finite(signal) if isinstance(signal, Tensor) else signal.finite()


def _pruned_across(
    updater: MaskUpdater, layers: list[_Layer], scores: dict[int, Tensor], total: int
) -> list[Tensor]:
    """A global prune criterion: bool over the active positions of each free layer (in the
    order of ``scores``), ``total`` of them across the layers, never a layer's best weight
    (as ``scoring.prune_sets``)."""
    cands = []
    for s in scores.values():
        cand = torch.ones(s.numel(), dtype=torch.bool, device=s.device)
        if s.numel():
            cand[int(s.float().argmax())] = False  # no layer is emptied
        cands.append(cand)
    first = layers[next(iter(scores))].layer.placement
    return first.select_across(
        list(scores.values()),
        cands,
        [layers[i].layer.placement for i in scores],
        total,
        updater.generator,
        largest=False,
    )


def _grow(entry: _Layer, kept: Tensor, n_grow: int, room: int) -> Tensor | str:
    """The positions ``entry`` grows (int64, ascending): the ``n_grow`` best growth scores
    among its positions inactive before this update, selected block by block."""
    updater = entry.updater
    growth = updater.criteria.growth
    assert growth is not None
    fan_in = entry.layer.storage.shape[1]
    reason: list[str] = []

    def blocks():  # type: ignore[no-untyped-def]
        for start, stop in entry.blocks():
            view = entry.growth_view(start, stop, kept, n_grow)
            s = checked(growth, growth.fn(view), view.shape, view.name)
            if not _finite(s):
                reason.append(f"criterion {growth.name!r} gave non-finite scores for {view.name}")
                s = torch.zeros_like(s)
            yield s.reshape(-1), view.mask.logical_not().reshape(-1), start * fan_in

    chosen = streamed_top_k(blocks, n_grow, room, updater.generator(entry.layer.device))
    return reason[0] if reason else chosen


def _window_momentum_at(updater: MaskUpdater, entry: _Layer, grown: Tensor) -> Tensor | None:
    """SGD keeping its state across updates: the window momentum at the ``grown`` positions,
    which their momentum starts from (see ``MaskUpdater._carry_window_momentum``)."""
    layer = entry.layer
    window = updater.signals.window.get(layer.name)
    if window is None or updater.config.optimizer_state != "keep":
        return None
    state = updater.optimizer.state.get(layer.param, {})
    if not isinstance(state.get("momentum_buffer"), Tensor):
        return None
    fan_in = layer.storage.shape[1]
    if isinstance(window, FactoredWindow):  # a few dot products per grown position
        carried = window.at(grown // fan_in, grown % fan_in)
    else:
        carried = window.reshape(-1)[grown.long()]
    return carried / (1.0 - updater.signals.momentum_coefficient(layer))


def _carry(
    updater: MaskUpdater, layer: CSRStorage, new: Tensor, grown: Tensor, carried: Tensor
) -> None:
    buf = updater.optimizer.state[layer.param]["momentum_buffer"]
    at = torch.searchsorted(new, grown)
    buf[at] = carried.to(buf.dtype)
