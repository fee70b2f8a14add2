"""The mask-update mechanics: score the layers with the registered criteria, select exactly
(top-k with seeded tie-breaking, within layers or across them), and commit the new masks, with
the optimizer state moved along. Schedules call :meth:`MaskUpdater.regrow` and
:meth:`MaskUpdater.prune_to`; the engine owns the updater.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..budget import allocate
from ..config import SparsityConfig
from ..criteria import Criterion, LayerView, Redistribution
from ..schedules import MaskUpdate
from ..structure import Groups
from . import distributed, listed, scoring, structured
from .calendar import Calendar
from .signals import FactoredWindow, Signals, dense_of, reset_state
from .storage import LayerStorage

logger = logging.getLogger("sparselearn")


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
        on_disagreement: Callable[[list[str]], None] = lambda names: None,
        groups: list[Groups] | None = None,
    ) -> None:
        self.config, self.optimizer, self.layers = config, optimizer, layers
        self.criteria, self.needs, self.signals, self.calendar = criteria, needs, signals, calendar
        self.clock, self.generator = clock, generator
        self.history, self.replaced = history, replaced
        self.on_disagreement = on_disagreement
        # each layer's groups where the masks keep a structure (structure="fan_in", "N:M")
        self.groups = groups
        # set by the engine around the updates of its step hook: the step's gradients are spent
        self.after_step = False

    @property
    def step(self) -> int:
        return self.clock()

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

    # ------------------------------------------------------------------ the two updates

    def _views(self) -> list[LayerView]:
        return scoring.layer_views(self.layers, self.needs, self.signals, self.generator)

    @torch.no_grad()
    def regrow(self, rate: float) -> MaskUpdate:
        """Prune ``rate`` of the active weights, share the regrowth, regrow: budget unchanged."""
        if self.groups is not None:
            return structured.regrow(self, rate)
        if listed.applies(self):
            return listed.regrow(self, rate)
        t0 = time.perf_counter()
        prune, growth = self.criteria.prune, self.criteria.growth
        assert prune is not None
        assert growth is not None
        views = self._views()
        bad = scoring.non_finite_inputs(views, self.needs, self.layers)
        if bad:
            return self._skip(f"non-finite {bad}", rate)
        layers = self.layers
        active = [layer.active for layer in layers]
        room = [layer.numel - a for layer, a in zip(layers, active, strict=True)]  # inactive
        free = [i for i, layer in enumerate(layers) if not layer.fixed]

        prune_scores = scoring.prune_scores(prune, views, layers)
        if isinstance(prune_scores, str):
            return self._skip(prune_scores, rate)
        remove, total_free = self._removals(rate, active, room, free)
        pruned = scoring.prune_sets(
            prune, layers, views, prune_scores, remove, total_free, self.generator
        )
        kept = [v.mask & p.logical_not() for v, p in zip(views, pruned, strict=True)]
        # exact counts: top_k selects exactly what it is asked for; only a global criterion
        # leaves the per-layer split to be counted
        global_prune = prune.scope == "global"
        lost = [
            layers[i].count(p) if global_prune and i in free else remove[i]
            for i, p in enumerate(pruned)
        ]

        growth_views = [v.with_growth(k, None) for v, k in zip(views, kept, strict=True)]
        grow = self._regrowth(lost, room, free, growth_views)
        grown = self._grow(growth_views, kept, grow, room, free, sum(lost[i] for i in free))
        if isinstance(grown, str):
            return self._skip(grown, rate)

        update = MaskUpdate(self.step, "regrow", rate)
        global_growth = growth.scope == "global"
        for i, layer in enumerate(layers):
            n_grown = layer.count(grown[i]) if global_growth and i in free else grow[i]
            self._commit(
                layer, kept[i] | grown[i], pruned[i], grown[i], active=active[i] - lost[i] + n_grown
            )
            update.pruned[layer.name] = lost[i]
            update.grown[layer.name] = n_grown
        return self._finish(update, t0)

    def _removals(
        self, rate: float, active: list[int], room: list[int], free: list[int]
    ) -> tuple[list[int], int]:
        """How many each layer loses (per-layer criteria), and across the free layers (a
        global criterion): never a layer's last weight, never more than can be regrown. A layer
        that regrows its own loss (fixed layers, redistribution "none") is bounded by its own
        free room, layers that share their regrowth only by the free room of all of them."""
        prune, growth = self.criteria.prune, self.criteria.growth
        assert prune is not None
        assert growth is not None
        shares_regrowth = self.criteria.redistribution.fn is not None or growth.scope == "global"
        remove = [
            min(round(rate * a), a - 1, r if layer.fixed or not shares_regrowth else a)
            for a, r, layer in zip(active, room, self.layers, strict=True)
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
        return remove, total_free

    def _regrowth(
        self, lost: list[int], room: list[int], free: list[int], views: list[LayerView]
    ) -> list[int]:
        """How many each layer regrows: fixed layers their own loss, free layers share theirs
        in proportion to the redistribution (a global growth criterion shares it itself)."""
        growth, redistribution = self.criteria.growth, self.criteria.redistribution
        assert growth is not None
        grow = list(lost)
        if not free or growth.scope == "global":
            return grow
        if redistribution.fn is None:
            weights = [float(lost[i]) for i in free]
        else:
            weights = [self.layers[i].placement.statistic(redistribution, views[i]) for i in free]
            if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
                logger.warning(
                    "step %d: redistribution %r gave %s; each layer regrows what it lost",
                    self.step,
                    redistribution.name,
                    weights,
                )
                weights = [float(lost[i]) for i in free]
        shares = allocate(sum(lost[i] for i in free), weights, [room[i] for i in free])
        for i, g in zip(free, shares, strict=True):
            grow[i] = g
        return grow

    def _grow(
        self,
        views: list[LayerView],
        kept: list[Tensor],
        grow: list[int],
        room: list[int],
        free: list[int],
        total: int,
    ) -> list[Tensor] | str:
        """The positions each layer grows: the highest growth scores among positions that were
        inactive before this update (a global criterion: ``total`` across the free layers).
        A string (the reason) where the scores were not finite."""
        growth = self.criteria.growth
        assert growth is not None
        layers = self.layers
        global_growth = growth.scope == "global"
        per_layer = [i for i in range(len(layers)) if not (global_growth and i in free)]
        for i in per_layer:
            views[i] = views[i].with_growth(kept[i], grow[i])
        # no criterion reads a layer's signals after its growth scores: each layer's are freed
        # as soon as it is scored, not all of them at the end
        growth_scores = scoring.scores(
            growth, views, layers, done=lambda i: self._release(views[i], layers[i])
        )
        if isinstance(growth_scores, str):
            return growth_scores
        grown: list[Tensor | None] = [None] * len(layers)
        for i in per_layer:
            grown[i] = layers[i].placement.select(
                growth_scores[i],
                ~layers[i].mask,
                grow[i],
                self.generator(layers[i].mask.device),
                largest=True,
                count=room[i],
            )
        if global_growth and free:
            chosen = layers[free[0]].placement.select_across(
                [growth_scores[i] for i in free],
                [~layers[i].mask for i in free],
                [layers[i].placement for i in free],
                total,
                self.generator,
                largest=True,
            )
            for i, c in zip(free, chosen, strict=True):
                grown[i] = c
        out = [g for g in grown if g is not None]
        assert len(out) == len(layers)
        return out

    def _release(self, view: LayerView, layer: LayerStorage) -> None:
        """Free what was computed for ``view``'s criteria: its signals, and the dense gradient
        its ``layer`` produced for this update."""
        view.release()
        self.signals.dense_grads.pop(layer.name, None)
        if self.after_step:  # (an update asked for between backward and step keeps them)
            layer.want_dense_grad(False)  # the engine arms the layers again after the step

    @torch.no_grad()
    def prune_to(self, fraction: float) -> MaskUpdate:
        """Prune each layer towards its final count: ``fraction`` 0 is dense, 1 is the target."""
        if self.groups is not None:
            return structured.prune_to(self, fraction)
        t0 = time.perf_counter()
        prune = self.criteria.prune
        assert prune is not None
        views = self._views()
        bad = scoring.non_finite_inputs(views, self.needs, self.layers)
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
        scores = scoring.prune_scores(prune, views, layers)
        if isinstance(scores, str):
            return self._skip(scores, None)
        pruned = scoring.prune_sets(
            prune, layers, views, scores, remove, total_free, self.generator
        )
        update = MaskUpdate(self.step, "prune", None)
        for layer, view, p in zip(layers, views, pruned, strict=True):
            self._commit(layer, view.mask & ~p, p, None)
            update.pruned[layer.name] = layer.count(p)
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
        if not self._install(layer, new, active):
            # the same layout: pruned weights are zeroed now (grown ones were zero), and their
            # optimizer state is reset as the policy says (a new layout holds no pruned
            # position, and its grown positions start with zero state)
            param = layer.param
            layer.zero_inactive_(param)
            if policy in ("reset_pruned", "reset_both"):
                reset_state(self.optimizer, layer, pruned)
            if grown is not None and (
                policy in ("reset_grown", "reset_both") or window is not None
            ):
                reset_state(self.optimizer, layer, grown)
        if grown is not None and window is not None and policy == "keep":
            self._carry_window_momentum(layer, grown, window)

    def _install(self, layer: LayerStorage, new: Tensor, active: int | None = None) -> bool:
        """``layer.install``; where that gives the layer a new parameter, the optimizer and the
        engine's gradient average follow it, their per-weight entries moved to the new layout
        (kept positions carry their values, new ones start at zero). Returns whether it did."""
        old = layer.param
        source = layer.install(new, active)
        if source is None:
            return False
        self._adopt(layer, old, source)
        return True

    def _adopt(self, layer: LayerStorage, old: nn.Parameter, source: Tensor) -> None:
        """``layer`` holds a new parameter in place of ``old``, with ``source`` (for each new
        entry, the index of its value in ``old``, -1: a new position): the optimizer and the
        engine's gradient average follow it."""
        old_numel = old.numel()
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

    def _carry_window_momentum(
        self, layer: LayerStorage, grown: Tensor, window: Tensor | FactoredWindow
    ) -> None:
        """SGD: a regrown weight starts with the momentum its position gathered in the window
        (the window keeps an average; SGD's buffer is a sum: scale by 1 / (1 - momentum))."""
        state = self.optimizer.state.get(layer.param, {})
        buf = state.get("momentum_buffer")
        if not isinstance(buf, Tensor):
            return
        buf = layer.local(buf)
        is_grown = layer.param_positions(grown)
        # scaled at the grown positions only (no second tensor of the weight's size)
        carried = layer.from_weight_shape(dense_of(window))[is_grown]
        carried = carried / (1.0 - self.signals.momentum_coefficient(layer))
        buf[is_grown] = carried.to(buf.dtype)

    def agree(self) -> list[str]:
        """Check that every rank holds the same masks (a checksum per layer, all-gathered);
        layers that differ get rank 0's mask. Returns their names (the same on every rank).

        Where each rank holds only a part of every weight, the layers' placement checks that
        the parts add up to each layer's count instead, and nothing can be copied from rank 0
        (a layer that fails names a broken invariant, not a rank that drifted)."""
        if not self.layers:
            return []
        bad, repairable = self.layers[0].placement.disagreeing(
            [layer.mask for layer in self.layers], [layer.active for layer in self.layers]
        )
        for i in bad if repairable else ():
            layer = self.layers[i]
            mask = layer.mask.clone()
            distributed.broadcast_(mask)
            if not torch.equal(mask, layer.mask) and not self._install(layer, mask):
                layer.zero_inactive_(layer.param)
        return [self.layers[i].name for i in bad]

    def _finish(self, update: MaskUpdate, t0: float) -> MaskUpdate:
        if distributed.is_parallel():
            # every rank computed the same update from the same (all-reduced) signals, so the
            # masks agree; a disagreement (a rank that diverged) is repaired from rank 0
            repaired = self.agree()
            if repaired:
                self.on_disagreement(repaired)
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
