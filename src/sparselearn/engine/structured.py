"""Mask updates that keep a structure (``structure="fan_in"`` or ``"N:M"``): every group of a
layer (a row, or a block of M inputs; :class:`~sparselearn.structure.Groups`) holds the same
number of active weights before and after every update.

Regrowth (:func:`regrow`), with the same criteria, rates and counts as the unstructured update:

- **A layer whose count stays** (N:M, where the structure fixes every count; fan-in without a
  redistribution; a layer with its own ``layer_density``) loses the ``rate`` share of its
  weights with the lowest prune scores across the layer, at most as many from one group as
  the group can regrow, and every group regrows exactly what it lost, at its highest growth
  scores among the positions that were inactive before the update. Every group keeps its count.
- **Fan-in with a redistribution** (sparse momentum, DSR) moves weights between layers in whole
  rows' worth: every row of a layer loses the same number, its lowest prune scores, so that
  the layer's loss is a whole number of rows' worth; the loss of all layers is shared out by the
  redistribution as whole rows' worth per layer (:func:`~sparselearn.structure.whole_groups`:
  the shares rounded down to whole rows, the rest placed exactly in whole rows; where no such
  split adds up, each layer regrows what it lost), and every row of a layer regrows the same
  number. The budget stays exact.

A global prune criterion (DSR's) decides how many each layer loses, as without structure;
the positions are then chosen within the layer as above. Gradual and one-shot pruning
(:func:`prune_to`) prune every group to the same count on the way to the target (for N:M from
M down to N).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from ..budget import allocate
from ..config import SparsityConfig
from ..criteria import LayerView
from ..schedules import MaskUpdate
from ..selection import top_k
from ..structure import Groups, Structure, layout_of, pick_per_group, ranks, whole_groups
from . import scoring
from .scoring import ActiveScores
from .storage import LayerStorage

if TYPE_CHECKING:
    from ..targets import Target
    from .calendar import Calendar
    from .listed import Criteria

logger = logging.getLogger("sparselearn")


class MaskUpdater(Protocol):
    """What the structured update uses of :class:`~.update.MaskUpdater` (whose updates it
    makes where the masks keep a structure)."""

    config: SparsityConfig
    layers: list[LayerStorage]
    groups: list[Groups] | None
    needs: frozenset[str]
    calendar: Calendar
    generator: Callable[[torch.device], torch.Generator]

    @property
    def criteria(self) -> Criteria: ...

    @property
    def step(self) -> int: ...

    def _views(self) -> list[LayerView]: ...

    def _skip(self, reason: str, rate: float | None) -> MaskUpdate: ...

    def _removals(
        self, rate: float, active: list[int], room: list[int], free: list[int]
    ) -> tuple[list[int], int]: ...

    def _release(self, view: LayerView, layer: LayerStorage) -> None: ...

    def _commit(
        self,
        layer: LayerStorage,
        new: Tensor,
        pruned: Tensor,
        grown: Tensor | None,
        *,
        active: int | None = None,
    ) -> None: ...

    def _finish(self, update: MaskUpdate, t0: float) -> MaskUpdate: ...


def groups_of(targets: Sequence[Target], structure: Structure) -> list[Groups]:
    """Each target's groups under ``structure`` (a ValueError naming a weight it cannot
    describe)."""
    out = []
    for t in targets:
        shape = tuple(t.param.shape)
        layout = layout_of(t.module_type, shape, t.name, t.experts)
        out.append(Groups(t.name, shape, layout, structure))
    return out


def initial_counts(
    groups: Sequence[Groups], counts: Sequence[int], free: Sequence[int]
) -> list[int]:
    """Per-group counts for the layers' initial ``counts`` (the unstructured split of the
    budget): under N:M the structure's; under fan-in the free layers' shares in whole rows,
    adding up to the same budget where whole rows can (else each share rounded to whole rows),
    at least one weight per row; fixed layers their own count rounded to whole rows."""
    k = [
        g.per_group or max(1, min(g.size, round(c / g.count)))
        for g, c in zip(groups, counts, strict=True)
    ]
    if groups and groups[0].per_group:
        return k
    if free:
        split = whole_groups(
            sum(counts[i] for i in free),
            [float(counts[i]) for i in free],
            [groups[i].count for i in free],
            [1] * len(free),
            [groups[i].size for i in free],
        )
        for i, c in zip(free, split or [k[i] for i in free], strict=True):
            k[i] = c
    return k


def initial_mask(
    groups: Groups, k: int, generator: torch.Generator, device: torch.device
) -> Tensor:
    """A random mask with ``k`` active weights in every group (the engine's generator)."""
    noise = torch.rand((groups.count, groups.size), generator=generator, device=device)
    everywhere = torch.ones_like(noise, dtype=torch.bool)
    return groups.unview(pick_per_group(noise, everywhere, k, generator, largest=True))


def broken(
    masks: Sequence[Tensor], groups: Sequence[Groups], *, pruning: bool, ablation: bool
) -> list[str]:
    """What breaks the structure in the layers' ``masks`` (empty: every group holds its
    count; ``pruning`` and ``ablation`` as for :meth:`Groups.broken`)."""
    found = (
        g.broken(m, pruning=pruning, ablation=ablation) for m, g in zip(masks, groups, strict=True)
    )
    return [why for why in found if why is not None]


def _lowest_capped(
    scores: Tensor, mask: Tensor, candidates: Tensor, cap: int, n: int, gen: torch.Generator
) -> Tensor:
    """Up to ``n`` of ``candidates`` (within ``mask``, rows as groups) with the lowest
    scores across the layer, at most ``cap`` from one group."""
    eligible = candidates & (ranks(scores, mask, gen, largest=False) < cap)
    return top_k(scores, eligible, min(n, int(eligible.sum())), gen, largest=False)


def _dense_scores(entry: Tensor | ActiveScores, mask: Tensor) -> Tensor:
    """Prune scores in the weight's shape (those given at the active positions spread out;
    the inactive positions are never candidates)."""
    if not isinstance(entry, ActiveScores):
        return entry
    out = torch.zeros(mask.numel(), dtype=torch.float32, device=entry.scores.device)
    out[entry.idx] = entry.scores.float()
    return out.view_as(mask)


@torch.no_grad()
def regrow(up: MaskUpdater, rate: float) -> MaskUpdate:
    """Prune ``rate`` of the active weights and regrow as many, keeping the structure (see
    the module docstring)."""
    t0 = time.perf_counter()
    prune, growth = up.criteria.prune, up.criteria.growth
    assert prune is not None
    assert growth is not None
    assert up.groups is not None
    layers, groups = up.layers, up.groups
    views = up._views()
    bad = scoring.non_finite_inputs(views, up.needs, layers)
    if bad:
        return up._skip(f"non-finite {bad}", rate)
    active = [layer.active for layer in layers]
    room = [layer.numel - a for layer, a in zip(layers, active, strict=True)]
    free = [i for i, layer in enumerate(layers) if not layer.fixed]
    found = scoring.prune_scores(prune, views, layers)
    if isinstance(found, str):
        return up._skip(found, rate)
    remove, total_free = up._removals(rate, active, room, free)
    if prune.scope == "global" and free:
        # the global criterion says how many each layer loses; where, the structure decides
        chosen = scoring.prune_sets(prune, layers, views, found, remove, total_free, up.generator)
        remove = [layers[i].count(c) if i in free else remove[i] for i, c in enumerate(chosen)]
    resize = set(free) if _resizes(up, groups) else set()
    gamma = up.config.neuron_ablation
    early: list[Tensor] | None = None
    if gamma > 0:
        # which weights growth would choose decides which units stay (an elementwise growth
        # criterion: these are the scores the growth below reads)
        first = [v.with_growth(v.mask, None) for v in views]
        scored = scoring.scores(
            growth, first, layers, done=lambda i: up._release(first[i], layers[i])
        )
        if isinstance(scored, str):
            return up._skip(scored, rate)
        early = scored

    per_row: dict[int, int] = {}  # the resized layers: what every row of each loses
    grow_rows: dict[int, Tensor] = {}  # layers with units removed: what every row regrows
    pruned, lost_groups = [], []
    for i, (layer, g) in enumerate(zip(layers, groups, strict=True)):
        mask = g.view(layer.mask)
        scores = g.view(_dense_scores(found[i], layer.mask))
        gen = up.generator(layer.mask.device)
        counts = mask.sum(dim=1)
        alive = counts > 0
        k = active[i] // max(int(alive.sum()), 1)
        if early is not None:
            chosen_g, grow_rows[i] = _ablated(
                scores, g.view(early[i]), mask, counts, remove[i], gamma, gen
            )
        elif i in resize:
            p = min(round(remove[i] / g.count), k - 1, g.size - k)
            per_row[i] = p
            chosen_g = pick_per_group(scores, mask, p, gen, largest=False)
        else:
            # the layer's lowest, at most as many from a group as it can regrow
            chosen_g = _lowest_capped(scores, mask, mask, min(k, g.size - k), remove[i], gen)
        pruned.append(g.unview(chosen_g))
        lost_groups.append(chosen_g.sum(dim=1))
    kept = [v.mask & p.logical_not() for v, p in zip(views, pruned, strict=True)]
    lost = [int(q.sum()) for q in lost_groups]

    grow_groups: list[Tensor | int] = list(lost_groups)
    for i, each in grow_rows.items():
        grow_groups[i] = each
    if per_row:
        for i, same in _share_rows(up, views, kept, groups, per_row, active).items():
            grow_groups[i] = same
    grow = [
        int(n) * g.count if isinstance(n, int) else int(n.sum())
        for n, g in zip(grow_groups, groups, strict=True)
    ]
    gviews = [v.with_growth(k, n) for v, k, n in zip(views, kept, grow, strict=True)]

    def done(i: int) -> None:
        up._release(gviews[i], layers[i])

    growth_scores = (
        early if early is not None else scoring.scores(growth, gviews, layers, done=done)
    )
    if isinstance(growth_scores, str):
        return up._skip(growth_scores, rate)
    update = MaskUpdate(up.step, "regrow", rate)
    for i, (layer, g) in enumerate(zip(layers, groups, strict=True)):
        gen = up.generator(layer.mask.device)
        grown = g.unview(
            pick_per_group(
                g.view(growth_scores[i]), g.view(~layer.mask), grow_groups[i], gen, largest=True
            )
        )
        up._commit(layer, kept[i] | grown, pruned[i], grown, active=active[i] - lost[i] + grow[i])
        update.pruned[layer.name] = lost[i]
        update.grown[layer.name] = grow[i]
    return up._finish(update, t0)


def _ablated(
    scores: Tensor,
    growth: Tensor,
    mask: Tensor,
    counts: Tensor,
    remove: int,
    gamma: float,
    gen: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """SRigL's neuron ablation for one constant fan-in layer (rows: its units; ``scores``,
    ``growth``: its prune and growth scores as rows). A unit's salient weights are those an
    unstructured update of the layer would keep (the best ``active - remove`` prune scores) or
    grow (the best ``remove`` growth scores); a unit with fewer than ``gamma`` times its fan-in
    of them is removed, all its weights pruned and none regrown (the best unit always stays).
    The others share the layer's weights equally, ``active // units`` each (at most one unit's
    worth below the layer's count): they lose their lowest prune scores across the layer as
    without ablation, and each regrows to the new count. Returns the pruned positions and what
    each row regrows."""
    alive = counts > 0
    active = int(counts.sum())
    k = active // int(alive.sum())
    size = mask.shape[1]
    kept = top_k(scores, mask, active - remove, gen, largest=True)
    room = ~mask & alive.unsqueeze(1)
    grown = top_k(growth, room, min(remove, int(room.sum())), gen, largest=True)
    salient = (kept | grown).sum(dim=1)
    removed = alive & (salient < gamma * k)
    if bool(removed.sum() == alive.sum()):  # never every unit: the most salient one stays
        best = torch.where(alive, salient, -1).argmax()
        removed[best] = False
    stays = alive & ~removed
    k_new = min(size, active // int(stays.sum()))
    # a row regrows k_new minus what it kept among its old inputs
    cap = min(k, size - k_new)
    pruned = _lowest_capped(scores, mask, mask & stays.unsqueeze(1), cap, remove, gen)
    pruned |= mask & removed.unsqueeze(1)
    left = counts - pruned.sum(dim=1)
    return pruned, torch.where(stays, k_new - left, torch.zeros_like(left))


def _resizes(up: MaskUpdater, groups: Sequence[Groups]) -> bool:
    """Whether layers may change their counts at this update: constant fan-in with a
    redistribution that shares the regrowth between layers."""
    return (
        bool(groups)
        and not groups[0].per_group
        and up.criteria.redistribution.fn is not None
        and up.criteria.growth is not None
        and up.criteria.growth.scope != "global"
    )


def _share_rows(
    up: MaskUpdater,
    views: Sequence[LayerView],
    kept: Sequence[Tensor],
    groups: Sequence[Groups],
    per_row: dict[int, int],
    active: Sequence[int],
) -> dict[int, int]:
    """How many every row of each resized layer regrows: the layers' loss shared by the
    redistribution in whole rows' worth (each layer its own loss where that cannot add up)."""
    redistribution = up.criteria.redistribution
    free = sorted(per_row)
    total = sum(per_row[i] * groups[i].count for i in free)
    own = {i: per_row[i] for i in free}
    if total == 0:
        return own
    # a row can regrow among the positions that were inactive before the update
    highs = [groups[i].size - active[i] // groups[i].count for i in free]
    weights = [
        up.layers[i].placement.statistic(redistribution, views[i].with_growth(kept[i], None))
        for i in free
    ]
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        logger.warning(
            "step %d: redistribution %r gave %s; each layer regrows what it lost",
            up.step,
            redistribution.name,
            weights,
        )
        return own
    caps = [h * groups[i].count for h, i in zip(highs, free, strict=True)]
    shares = allocate(total, weights, caps)
    split = whole_groups(
        total, [float(s) for s in shares], [groups[i].count for i in free], [0] * len(free), highs
    )
    if split is None:
        logger.info(
            "step %d: the redistribution's shares do not add up in whole rows; each layer "
            "regrows what it lost",
            up.step,
        )
        return own
    return dict(zip(free, split, strict=True))


@torch.no_grad()
def prune_to(up: MaskUpdater, fraction: float) -> MaskUpdate:
    """Prune every group of each layer to the same count on the way to its final count
    (``fraction`` 0: dense, 1: the target)."""
    t0 = time.perf_counter()
    prune = up.criteria.prune
    assert prune is not None
    assert up.groups is not None
    layers, groups = up.layers, up.groups
    views = up._views()
    bad = scoring.non_finite_inputs(views, up.needs, layers)
    if bad:
        return up._skip(f"non-finite {bad}", None)
    found = scoring.prune_scores(prune, views, layers)
    if isinstance(found, str):
        return up._skip(found, None)
    update = MaskUpdate(up.step, "prune", None)
    for i, (layer, g) in enumerate(zip(layers, groups, strict=True)):
        now, final = layer.active // g.count, layer.final_count // g.count
        target = round(g.size - (g.size - final) * fraction)
        p = max(now - target, 0)
        mask = g.view(layer.mask)
        scores = g.view(_dense_scores(found[i], layer.mask))
        gen = up.generator(layer.mask.device)
        pruned = g.unview(pick_per_group(scores, mask, p, gen, largest=False))
        up._commit(layer, layer.mask & ~pruned, pruned, None, active=layer.active - p * g.count)
        update.pruned[layer.name] = p * g.count
        update.grown[layer.name] = 0
    if fraction >= 1.0:
        up.calendar.finished = True
    return up._finish(update, t0)
