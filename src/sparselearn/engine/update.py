"""The mask-update mechanics: score the layers with the registered criteria, select exactly
(top-k with seeded tie-breaking, within layers or across them), and commit the new masks, with
the optimizer state moved along. Schedules call :meth:`MaskUpdater.regrow` and
:meth:`MaskUpdater.prune_to`; the engine owns the updater.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..budget import allocate
from ..config import SparsityConfig
from ..criteria import Criterion, LayerView, Redistribution
from ..selection import bottom_k, top_k
from . import distributed
from .calendar import Calendar
from .signals import Signals, _finite, reset_state
from .storage import LayerStorage, count

logger = logging.getLogger("sparselearn")


@dataclass
class MaskUpdate:
    """What one mask update did (``engine.history`` holds them all, ``engine.last_update`` the
    latest)."""

    step: int
    kind: str  # "regrow", "prune" or "skipped"
    prune_rate: float | None
    pruned: dict[str, int] = field(default_factory=dict)
    grown: dict[str, int] = field(default_factory=dict)
    density: float = 0.0
    seconds: float = 0.0
    reason: str = ""

    @property
    def total_pruned(self) -> int:
        return sum(self.pruned.values())

    @property
    def total_grown(self) -> int:
        return sum(self.grown.values())


class _ActiveScores(NamedTuple):
    """Prune scores of the active positions only (flat indices ``idx``, ascending)."""

    idx: Tensor
    scores: Tensor


@dataclass(frozen=True)
class Criteria:
    """The registered parts one engine uses."""

    prune: Criterion | None
    growth: Criterion | None
    redistribution: Redistribution


class MaskUpdater:
    """Mask updates over the engine's layers (see the module docstring).

    ``layers`` is the engine's own list (accelerated layers replace their entries in it);
    ``clock()`` the optimizer step an update follows; ``generator(device)`` the engine's seeded
    generator; ``replaced(old, new)`` is called when a layer's parameter is replaced by a new
    one (CSR storage restructured).
    """

    def __init__(
        self,
        config: SparsityConfig,
        optimizer: torch.optim.Optimizer,
        layers: list[LayerStorage],
        criteria: Criteria,
        needs: frozenset[str],
        signals: Signals,
        calendar: Calendar,
        clock: Callable[[], int],
        generator: Callable[[torch.device], torch.Generator],
        history: list[MaskUpdate],
        replaced: Callable[[nn.Parameter, nn.Parameter], None],
    ) -> None:
        self.config, self.optimizer, self.layers = config, optimizer, layers
        self.criteria, self.needs, self.signals, self.calendar = criteria, needs, signals, calendar
        self.clock, self.generator = clock, generator
        self.history, self.replaced = history, replaced

    @property
    def step(self) -> int:
        return self.clock()

    # ------------------------------------------------------------------ views and scores

    def _views(self) -> list[LayerView]:
        views = []
        for layer in self.layers:
            layer.sync_device()
            signals: dict[str, Callable[[], Tensor]] = {}
            if "momentum" in self.needs:
                signals["momentum"] = functools.partial(self.signals.momentum, layer)
            if "grad" in self.needs:
                signals["grad"] = functools.partial(self.signals.grad, layer)
            views.append(
                LayerView(
                    layer.name,
                    layer.weight(),
                    layer.mask,
                    signals=signals,
                    generator=self.generator(layer.device),
                )
            )
        return views

    def _non_finite_inputs(self, views: list[LayerView]) -> str | None:
        """Name the first non-finite weight, gradient or momentum, or None if all are finite."""
        for view in views:
            for key in ("weight", *sorted(self.needs)):
                value = view.weight if key == "weight" else getattr(view, key)
                if not _finite(value):
                    return f"{key} of {view.name}"
        return None

    def _skip(self, reason: str, rate: float | None) -> MaskUpdate:
        logger.warning("step %d: mask update skipped: %s; masks unchanged", self.step, reason)
        for name in self.signals.restart():
            logger.warning("reset the gradient moving average of %s (non-finite)", name)
        update = MaskUpdate(self.step, "skipped", rate, density=self._density(), reason=reason)
        self.history.append(update)
        return update

    def _density(self) -> float:
        return sum(layer.active for layer in self.layers) / sum(
            layer.numel for layer in self.layers
        )

    def _scores(self, criterion: Criterion, views: list[LayerView]) -> list[Tensor] | str:
        out = []
        for view in views:
            s = criterion.fn(view)
            if not isinstance(s, Tensor) or s.shape != view.weight.shape:
                raise TypeError(
                    f"criterion {criterion.name!r} must return a tensor of shape "
                    f"{tuple(view.weight.shape)} for {view.name}, got "
                    f"{tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__}"
                )
            if not _finite(s):
                return f"criterion {criterion.name!r} gave non-finite scores for {view.name}"
            out.append(s)
        return out

    def _prune_scores(self, views: list[LayerView]) -> list[Tensor | _ActiveScores] | str:
        """Prune scores per layer. An elementwise layer-scope criterion (magnitude) is evaluated
        on the active weights only where they are fewer than half: the scores of those
        positions, with the positions, instead of a pass over the whole layer."""
        crit = self.criteria.prune
        assert crit is not None
        if not (crit.elementwise and crit.scope == "layer"):
            whole = self._scores(crit, views)
            return whole if isinstance(whole, str) else list[Tensor | _ActiveScores](whole)
        out: list[Tensor | _ActiveScores] = []
        for view, layer in zip(views, self.layers, strict=True):
            if 2 * layer.active >= layer.numel:
                full = self._scores(crit, [view])
                if isinstance(full, str):
                    return full
                out.append(full[0])
                continue
            idx = view.mask.reshape(-1).nonzero().squeeze(1)
            s = crit.fn(view.at(idx))
            if not isinstance(s, Tensor) or s.shape != idx.shape:
                raise TypeError(
                    f"elementwise criterion {crit.name!r} must return scores of the shape of "
                    f"its (1-D) inputs, {tuple(idx.shape)} for {view.name}, got "
                    f"{tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__}"
                )
            if not _finite(s):
                return f"criterion {crit.name!r} gave non-finite scores for {view.name}"
            out.append(_ActiveScores(idx, s))
        return out

    # ------------------------------------------------------------------ selection

    def _select_across(
        self, scores: list[Tensor], candidates: list[Tensor], k: int, *, largest: bool = True
    ) -> list[Tensor]:
        """Exact top-k (or bottom-k) over several layers at once; one bool tensor per layer."""
        device = scores[0].device
        flat = torch.cat([s.float().reshape(-1).to(device) for s in scores])
        cand = torch.cat([c.reshape(-1).to(device) for c in candidates])
        chosen = top_k(flat, cand, k, self.generator(device), largest=largest)
        out, offset = [], 0
        for c in candidates:
            out.append(chosen[offset : offset + c.numel()].view_as(c).to(c.device))
            offset += c.numel()
        return out

    def _prune_sets(
        self,
        views: list[LayerView],
        scores: list[Tensor | _ActiveScores],
        remove: list[int],
        total_free: int,
    ) -> list[Tensor]:
        """Bool tensors of the positions to prune. Fixed layers and layer-scope criteria remove
        ``remove[i]`` per layer; a global criterion removes ``total_free`` across the free layers,
        never the best active weight of a layer (no layer is emptied)."""
        prune = self.criteria.prune
        assert prune is not None
        out: list[Tensor | None] = [None] * len(views)
        free = [i for i, layer in enumerate(self.layers) if not layer.fixed]
        glob = prune.scope == "global" and len(free) > 0
        for i, (view, s) in enumerate(zip(views, scores, strict=True)):
            if glob and i in free:
                continue
            if isinstance(s, _ActiveScores):  # scores of the active positions only
                m = s.idx.numel()
                every = torch.ones(m, dtype=torch.bool, device=s.idx.device)
                chosen = bottom_k(s.scores, every, remove[i], self.generator(s.idx.device), count=m)
                pruned = torch.zeros(view.mask.numel(), dtype=torch.bool, device=s.idx.device)
                pruned[s.idx[chosen]] = True
                out[i] = pruned.view_as(view.mask)
                continue
            out[i] = bottom_k(
                s, view.mask, remove[i], self.generator(s.device), count=self.layers[i].active
            )
        if glob:
            full = [s for s in scores if isinstance(s, Tensor)]
            assert len(full) == len(scores)  # global criteria are scored over whole layers
            cands = []
            for i in free:
                mask = views[i].mask
                best = torch.where(mask, full[i].float(), -math.inf).argmax()
                cand = mask.clone()
                cand.view(-1)[best] = False  # protected: every layer keeps at least one weight
                cands.append(cand)
            across = self._select_across([full[i] for i in free], cands, total_free, largest=False)
            for i, c in zip(free, across, strict=True):
                out[i] = c
        return [o for o in out if o is not None]

    # ------------------------------------------------------------------ the two updates

    @torch.no_grad()
    def regrow(self, rate: float) -> MaskUpdate:
        """Prune ``rate`` of the active weights, share the regrowth, regrow: budget unchanged."""
        t0 = time.perf_counter()
        prune, growth, redistribution = (
            self.criteria.prune,
            self.criteria.growth,
            self.criteria.redistribution,
        )
        assert prune is not None
        assert growth is not None
        views = self._views()
        bad = self._non_finite_inputs(views)
        if bad:
            return self._skip(f"non-finite {bad}", rate)
        layers = self.layers
        active = [layer.active for layer in layers]
        numel = [layer.numel for layer in layers]
        room = [n - a for n, a in zip(numel, active, strict=True)]  # inactive before the update
        free = [i for i, layer in enumerate(layers) if not layer.fixed]

        prune_scores = self._prune_scores(views)
        if isinstance(prune_scores, str):
            return self._skip(prune_scores, rate)
        # never empty a layer, and never remove more than can be regrown: a layer that regrows
        # its own loss (fixed layers, redistribution "none") is bounded by its own free room,
        # layers that share their regrowth only by the free room of all of them together
        shares_regrowth = redistribution.fn is not None or growth.scope == "global"
        remove = [
            min(round(rate * a), a - 1, r if layer.fixed or not shares_regrowth else a)
            for a, r, layer in zip(active, room, layers, strict=True)
        ]
        room_free = sum(room[i] for i in free)
        if shares_regrowth and sum(remove[i] for i in free) > room_free:
            for i, k in zip(
                free,
                allocate(room_free, [float(remove[i]) for i in free], [remove[i] for i in free]),
                strict=True,
            ):
                remove[i] = k
        total_free = 0
        if prune.scope == "global" and free:
            a_free = sum(active[i] for i in free)
            total_free = min(round(rate * a_free), a_free - len(free), room_free)
        pruned = self._prune_sets(views, prune_scores, remove, total_free)
        kept = [v.mask & p.logical_not() for v, p in zip(views, pruned, strict=True)]
        # exact counts: top_k selects exactly what it is asked for; only a global criterion
        # leaves the per-layer split to be counted
        global_prune = prune.scope == "global"
        lost = [count(p) if global_prune and i in free else remove[i] for i, p in enumerate(pruned)]

        # how many each layer regrows: fixed layers their own loss, free layers share theirs
        grow = list(lost)
        r_free = sum(lost[i] for i in free)
        growth_views = [v.with_growth(k, None) for v, k in zip(views, kept, strict=True)]
        global_growth = growth.scope == "global"
        if free and not global_growth:
            if redistribution.fn is None:
                weights = [float(lost[i]) for i in free]
            else:
                weights = [redistribution.fn(growth_views[i]) for i in free]
                if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
                    logger.warning(
                        "step %d: redistribution %r gave %s; each layer regrows what it lost",
                        self.step,
                        redistribution.name,
                        weights,
                    )
                    weights = [float(lost[i]) for i in free]
            shares = allocate(r_free, weights, [room[i] for i in free])
            for i, g in zip(free, shares, strict=True):
                grow[i] = g

        # growth: the highest scores among positions that were inactive before this update
        grown: list[Tensor | None] = [None] * len(layers)
        per_layer = [i for i in range(len(layers)) if not (global_growth and i in free)]
        for i in per_layer:
            growth_views[i] = growth_views[i].with_growth(kept[i], grow[i])
        growth_scores = self._scores(growth, growth_views)
        if isinstance(growth_scores, str):
            return self._skip(growth_scores, rate)
        for i in per_layer:
            grown[i] = top_k(
                growth_scores[i],
                ~layers[i].mask,
                grow[i],
                self.generator(layers[i].mask.device),
                count=room[i],
            )
        if global_growth and free:
            chosen = self._select_across(
                [growth_scores[i] for i in free], [~layers[i].mask for i in free], r_free
            )
            for i, c in zip(free, chosen, strict=True):
                grown[i] = c

        update = MaskUpdate(self.step, "regrow", rate)
        for i, layer in enumerate(layers):
            new_positions = grown[i]
            assert new_positions is not None
            n_grown = count(new_positions) if global_growth and i in free else grow[i]
            self._commit(
                layer,
                kept[i] | new_positions,
                pruned[i],
                new_positions,
                active=active[i] - lost[i] + n_grown,
            )
            update.pruned[layer.name] = lost[i]
            update.grown[layer.name] = n_grown
        return self._finish(update, t0)

    @torch.no_grad()
    def prune_to(self, fraction: float) -> MaskUpdate:
        """Prune each layer towards its final count: ``fraction`` 0 is dense, 1 is the target."""
        t0 = time.perf_counter()
        views = self._views()
        bad = self._non_finite_inputs(views)
        if bad:
            return self._skip(f"non-finite {bad}", None)
        layers = self.layers
        active = [layer.active for layer in layers]
        target = [
            round(layer.numel - (layer.numel - layer.final_count) * fraction) for layer in layers
        ]
        remove = [max(a - t, 0) for a, t in zip(active, target, strict=True)]
        free = [i for i, layer in enumerate(layers) if not layer.fixed]
        total_free = max(sum(active[i] for i in free) - sum(target[i] for i in free), 0)
        scores = self._prune_scores(views)
        if isinstance(scores, str):
            return self._skip(scores, None)
        pruned = self._prune_sets(views, scores, remove, total_free)
        update = MaskUpdate(self.step, "prune", None)
        for layer, view, p in zip(layers, views, pruned, strict=True):
            self._commit(layer, view.mask & ~p, p, None)
            update.pruned[layer.name] = count(p)
            update.grown[layer.name] = 0
        if fraction >= 1.0:
            self.calendar.finished = True
        return self._finish(update, t0)

    # ------------------------------------------------------------------ commit

    def _commit(
        self,
        layer: LayerStorage,
        new: Tensor,
        pruned: Tensor,
        grown: Tensor | None,
        *,
        active: int | None = None,
    ) -> None:
        """Install the mask ``new`` (``active``: its count, where known), with the optimizer
        state of the changed positions as the ``optimizer_state`` policy says."""
        policy = self.config.optimizer_state
        window = self.signals.window.get(layer.name)
        self._install(layer, new, active)
        param = layer.param
        layer.zero_inactive_(param)  # pruned weights are zero now; grown ones were zero
        if policy in ("reset_pruned", "reset_both"):
            reset_state(self.optimizer, param, layer.param_positions(pruned))
        if grown is not None and (policy in ("reset_grown", "reset_both") or window is not None):
            reset_state(self.optimizer, param, layer.param_positions(grown))
        if grown is not None and window is not None and policy == "keep":
            self._carry_window_momentum(layer, grown, window)

    def _install(self, layer: LayerStorage, new: Tensor, active: int | None = None) -> None:
        """``layer.install``; where that gives the layer a new parameter, the optimizer and the
        engine's gradient average follow it, their per-weight entries moved to the new layout
        (kept positions carry their values, new ones start at zero)."""
        old = layer.param
        old_numel = old.numel()
        source = layer.install(new, active)
        if source is None:
            return
        kept = source >= 0

        def moved(value: Tensor) -> Tensor:
            out = torch.zeros(source.numel(), dtype=value.dtype, device=value.device)
            out[kept] = value[source[kept]]
            return out

        new_param = layer.param
        for group in self.optimizer.param_groups:
            group["params"] = [new_param if p is old else p for p in group["params"]]
        old_state = self.optimizer.state.pop(old, None)
        if old_state is not None:
            self.optimizer.state[new_param] = {
                key: moved(value)
                if isinstance(value, Tensor) and value.shape == (old_numel,)
                else value
                for key, value in old_state.items()
            }
        ema = self.signals.ema.get(layer.name)
        if ema is not None:
            self.signals.ema[layer.name] = moved(ema)
        self.replaced(old, new_param)

    def _carry_window_momentum(self, layer: LayerStorage, grown: Tensor, window: Tensor) -> None:
        """SGD: a regrown weight starts with the momentum its position gathered in the window
        (the window keeps an average; SGD's buffer is a sum: scale by 1 / (1 - momentum))."""
        state = self.optimizer.state.get(layer.param, {})
        buf = state.get("momentum_buffer")
        if not isinstance(buf, Tensor):
            return
        carried = window / (1.0 - self.signals.momentum_coefficient(layer))
        is_grown = layer.param_positions(grown)
        buf[is_grown] = layer.from_weight_shape(carried)[is_grown].to(buf.dtype)

    def _finish(self, update: MaskUpdate, t0: float) -> MaskUpdate:
        if distributed.is_parallel():
            # every rank computed the same update from the same (all-reduced) signals; copying
            # rank 0's masks guarantees identity even where floating point disagreed
            for layer in self.layers:
                mask = layer.mask.clone()
                distributed.broadcast_(mask)
                if not torch.equal(mask, layer.mask):
                    self._install(layer, mask)
                    layer.zero_inactive_(layer.param)
        if update.kind == "regrow":
            self.signals.window.clear()  # a new window starts before the next update
        for layer in self.layers:
            layer.release()
        update.density = self._density()
        update.seconds = time.perf_counter() - t0
        self.history.append(update)
        logger.info(
            "step %d: %s: pruned %d, grown %d, density %.4f (%.3f s)",
            update.step,
            update.kind,
            update.total_pruned,
            update.total_grown,
            update.density,
            update.seconds,
        )
        return update
