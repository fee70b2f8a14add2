"""Scoring and selection for mask updates: the views criteria read, their scores (checked
for shape and finiteness), and exact selections over several layers at once."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..criteria import Criterion, LayerView, Redistribution
from ..selection import bottom_k, top_k
from .sharding import Part, Shard, all_sum, any_rank, sharded_argmax, sharded_top_k
from .signals import Signals, _finite
from .storage import LayerStorage

Generators = Callable[[torch.device], torch.Generator]


class ActiveScores(NamedTuple):
    """Prune scores of the active positions only (flat indices ``idx``, ascending)."""

    idx: Tensor
    scores: Tensor


def layer_views(
    layers: Sequence[LayerStorage], needs: frozenset[str], signals: Signals, generator: Generators
) -> list[LayerView]:
    """What each layer's criteria may read at this update (signals computed on first use)."""
    views = []
    for layer in layers:
        layer.sync_device()
        shard = shard_of(layer)
        reads: dict[str, Callable[[], Tensor]] = {}
        if "momentum" in needs:
            reads["momentum"] = functools.partial(signals.momentum, layer)
        if "grad" in needs:
            reads["grad"] = functools.partial(signals.grad, layer)
        views.append(
            LayerView(
                layer.name,
                layer.weight(),
                layer.mask,
                signals=reads,
                generator=generator(layer.device),
                shard=shard,
            )
        )
    return views


def shard_of(layer: LayerStorage) -> Shard | None:
    """The block of the weight this rank holds (FSDP2), None for a whole weight."""
    shard = getattr(layer, "shard", None)
    return shard if isinstance(shard, Shard) else None


def _group(layers: Sequence[LayerStorage]) -> object | None:
    """The process group of sharded layers (the engine shards all layers or none)."""
    shard = shard_of(layers[0]) if layers else None
    return None if shard is None else shard.group


def _agreed(reason: str | None, group: object | None) -> str | None:
    """A reason to skip an update, the same on every rank: one rank's non-finite values make
    every rank skip (their blocks differ, so the others may not have seen any)."""
    if group is None or not any_rank(reason is not None, group):
        return reason
    return reason or "non-finite values on another rank"


def non_finite_inputs(
    views: list[LayerView], needs: frozenset[str], layers: Sequence[LayerStorage] = ()
) -> str | None:
    """Name the first non-finite weight, gradient or momentum, or None if all are finite."""
    found = None
    for view in views:
        for key in ("weight", *sorted(needs)):
            value = view.weight if key == "weight" else getattr(view, key)
            if found is None and not _finite(value):
                found = f"{key} of {view.name}"
        if found is not None:
            break
    return _agreed(found, _group(layers))


def _whole(view: LayerView, shard: Shard) -> LayerView:
    """The view of the whole weight, gathered from every rank's block (signals on first use)."""

    def gathered(key: str) -> Tensor:
        return shard.gather(view._signal(key))

    return LayerView(
        view.name,
        shard.gather(view.weight),
        shard.gather(view.mask),
        signals={key: functools.partial(gathered, key) for key in view._signals},
        generator=view._generator,
        kept=None if view.kept is None else shard.gather(view.kept),
        n_grow=view.n_grow,
    )


def evaluate(criterion: Criterion, view: LayerView, shard: Shard | None) -> object:
    """``criterion.fn(view)``; for a block of a sharded weight, the block of the scores: the
    criterion sees the block itself where it is elementwise, else the whole weight."""
    if shard is None or criterion.elementwise:
        return criterion.fn(view)
    whole = criterion.fn(_whole(view, shard))
    return shard.block(whole) if isinstance(whole, Tensor) else whole


def scores(
    criterion: Criterion, views: list[LayerView], layers: Sequence[LayerStorage] = ()
) -> list[Tensor] | str:
    """Each view's scores; a string (the reason) where a criterion gave non-finite ones."""
    out = []
    group = _group(layers)
    reason = None
    for i, view in enumerate(views):
        s = evaluate(criterion, view, shard_of(layers[i]) if layers else None)
        if not isinstance(s, Tensor) or s.shape != view.weight.shape:
            raise TypeError(
                f"criterion {criterion.name!r} must return a tensor of shape "
                f"{tuple(view.weight.shape)} for {view.name}, got "
                f"{tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__}"
            )
        if reason is None and not _finite(s):
            reason = f"criterion {criterion.name!r} gave non-finite scores for {view.name}"
            if group is None:
                break
        out.append(s)
    reason = _agreed(reason, group)
    return out if reason is None else reason


def statistic(redistribution: Redistribution, view: LayerView, layer: LayerStorage) -> float:
    """A redistribution's number for one layer (for a sharded weight: from sums over every
    rank's block where the redistribution gives them, else from the whole weight)."""
    assert redistribution.fn is not None
    shard = shard_of(layer)
    if shard is None:
        return redistribution.fn(view)
    if redistribution.sums is not None and redistribution.combine is not None:
        return redistribution.combine(all_sum(list(redistribution.sums(view)), shard.group))
    return redistribution.fn(_whole(view, shard))


def select(
    layer: LayerStorage,
    scores: Tensor,
    candidates: Tensor,
    k: int,
    generator: torch.Generator,
    *,
    largest: bool = True,
    count: int | None = None,
) -> Tensor:
    """:func:`~sparselearn.selection.top_k` within one layer (over every rank's block of a
    sharded weight: the same positions)."""
    shard = shard_of(layer)
    if shard is None:
        return top_k(scores, candidates, k, generator, largest=largest, count=count)
    part = Part(scores, shard.flat_start, candidates.numel(), candidates=candidates)
    chosen = sharded_top_k([part], k, generator, shard.group, largest=largest, count=count)
    return chosen[0].view_as(candidates)


def prune_scores(
    crit: Criterion, views: list[LayerView], layers: Sequence[LayerStorage]
) -> list[Tensor | ActiveScores] | str:
    """Prune scores per layer. An elementwise layer-scope criterion (magnitude) is evaluated
    on the active weights only where they are fewer than half: the scores of those
    positions, with the positions, instead of a pass over the whole layer."""
    if not (crit.elementwise and crit.scope == "layer"):
        whole = scores(crit, views, layers)
        return whole if isinstance(whole, str) else list[Tensor | ActiveScores](whole)
    out: list[Tensor | ActiveScores] = []
    group = _group(layers)
    reason = None
    for view, layer in zip(views, layers, strict=True):
        if 2 * layer.active >= layer.numel:
            s = crit.fn(view)
            if not isinstance(s, Tensor) or s.shape != view.weight.shape:
                raise TypeError(
                    f"criterion {crit.name!r} must return a tensor of shape "
                    f"{tuple(view.weight.shape)} for {view.name}, got "
                    f"{tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__}"
                )
            entry: Tensor | ActiveScores = s
        else:
            idx = view.mask.reshape(-1).nonzero().squeeze(1)
            s = crit.fn(view.at(idx))
            if not isinstance(s, Tensor) or s.shape != idx.shape:
                raise TypeError(
                    f"elementwise criterion {crit.name!r} must return scores of the shape of "
                    f"its (1-D) inputs, {tuple(idx.shape)} for {view.name}, got "
                    f"{tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__}"
                )
            entry = ActiveScores(idx, s)
        if not _finite(s):
            reason = f"criterion {crit.name!r} gave non-finite scores for {view.name}"
            break
        out.append(entry)
    reason = _agreed(reason, group)
    return out if reason is None else reason


def select_across(
    scores: list[Tensor],
    candidates: list[Tensor],
    k: int,
    generator: Generators,
    *,
    largest: bool = True,
    shards: Sequence[Shard | None] = (),
) -> list[Tensor]:
    """Exact top-k (or bottom-k) over several layers at once; one bool tensor per layer
    (``shards``: the blocks of sharded weights that ``scores`` and ``candidates`` are)."""
    if shards and shards[0] is not None:
        parts, offset = [], 0
        for s, c, shard in zip(scores, candidates, shards, strict=True):
            assert shard is not None
            parts.append(Part(s, offset + shard.flat_start, c.numel(), candidates=c))
            offset += math.prod(shard.shape)
        gen = generator(scores[0].device)
        chosen_parts = sharded_top_k(parts, k, gen, shards[0].group, largest=largest)
        return [o.view_as(c) for o, c in zip(chosen_parts, candidates, strict=True)]
    device = scores[0].device
    flat = torch.cat([s.float().reshape(-1).to(device) for s in scores])
    cand = torch.cat([c.reshape(-1).to(device) for c in candidates])
    chosen = top_k(flat, cand, k, generator(device), largest=largest)
    out, offset = [], 0
    for c in candidates:
        out.append(chosen[offset : offset + c.numel()].view_as(c).to(c.device))
        offset += c.numel()
    return out


def prune_sets(
    crit: Criterion,
    layers: Sequence[LayerStorage],
    views: list[LayerView],
    scores: list[Tensor | ActiveScores],
    remove: list[int],
    total_free: int,
    generator: Generators,
) -> list[Tensor]:
    """Bool tensors of the positions to prune. Fixed layers and layer-scope criteria remove
    ``remove[i]`` per layer; a global criterion removes ``total_free`` across the free layers,
    never the best active weight of a layer (no layer is emptied)."""
    out: list[Tensor | None] = [None] * len(views)
    free = [i for i, layer in enumerate(layers) if not layer.fixed]
    glob = crit.scope == "global" and len(free) > 0
    for i, (view, s) in enumerate(zip(views, scores, strict=True)):
        if glob and i in free:
            continue
        shard = shard_of(layers[i])
        if isinstance(s, ActiveScores) and shard is not None:
            part = Part(s.scores, shard.flat_start, view.mask.numel(), positions=s.idx)
            gen = generator(s.idx.device)
            blocks = sharded_top_k(
                [part], remove[i], gen, shard.group, largest=False, count=layers[i].active
            )
            out[i] = blocks[0].view_as(view.mask)
            continue
        if isinstance(s, ActiveScores):  # scores of the active positions only
            m = s.idx.numel()
            every = torch.ones(m, dtype=torch.bool, device=s.idx.device)
            chosen = bottom_k(s.scores, every, remove[i], generator(s.idx.device), count=m)
            pruned = torch.zeros(view.mask.numel(), dtype=torch.bool, device=s.idx.device)
            pruned[s.idx[chosen]] = True
            out[i] = pruned.view_as(view.mask)
            continue
        out[i] = select(
            layers[i],
            s,
            view.mask,
            remove[i],
            generator(s.device),
            largest=False,
            count=layers[i].active,
        )
    if glob:
        full = [s for s in scores if isinstance(s, Tensor)]
        assert len(full) == len(scores)  # global criteria are scored over whole layers
        cands = []
        shards = [shard_of(layers[i]) for i in free]
        for i, shard in zip(free, shards, strict=True):
            mask = views[i].mask
            cand = mask.clone()
            # protected: every layer keeps at least one weight
            if shard is None:
                cand.view(-1)[torch.where(mask, full[i].float(), -math.inf).argmax()] = False
            else:
                best = sharded_argmax(full[i], mask, shard) - shard.flat_start
                if 0 <= best < cand.numel():
                    cand.view(-1)[best] = False
            cands.append(cand)
        across = select_across(
            [full[i] for i in free], cands, total_free, generator, largest=False, shards=shards
        )
        for i, c in zip(free, across, strict=True):
            out[i] = c
    return [o for o in out if o is not None]
