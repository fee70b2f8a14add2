"""Scoring and selection for mask updates, in whole-layer terms: the views criteria read, their
scores (checked for shape and finiteness), the prune sets. How each step is done for the part
of a weight this process holds is the layer's placement's business (``placement.py``)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..criteria import Criterion, LayerView
from .signals import Signals, _finite
from .storage import LayerStorage

Generators = Callable[[torch.device], torch.Generator]


class ActiveScores(NamedTuple):
    """Prune scores of the active positions only (flat indices ``idx``, ascending)."""

    idx: Tensor
    scores: Tensor


def checked(criterion: Criterion, scores: object, shape: torch.Size, name: str) -> Tensor:
    """``scores`` as a criterion must return them for a layer ``name``: a tensor of ``shape``
    (the view's; 1-D for a view of listed positions); else a TypeError naming both."""
    if not isinstance(scores, Tensor) or scores.shape != shape:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        what = (
            "scores of the shape of its (1-D) inputs," if len(shape) == 1 else "a tensor of shape"
        )
        raise TypeError(
            f"criterion {criterion.name!r} must return {what} {tuple(shape)} for {name}, got {got}"
        )
    return scores


def layer_views(
    layers: Sequence[LayerStorage], needs: frozenset[str], signals: Signals, generator: Generators
) -> list[LayerView]:
    """What each layer's criteria may read at this update (signals computed on first use)."""
    views = []
    for layer in layers:
        layer.sync_device()
        reads: dict[str, Callable[[], Tensor]] = {}
        if "momentum" in needs:
            reads["momentum"] = functools.partial(signals.momentum, layer)
        if "grad" in needs:
            reads["grad"] = functools.partial(signals.grad, layer)
        views.append(
            LayerView(
                layer.name,
                layer.weight,  # materialised where a criterion reads it
                layer.mask,
                signals=reads,
                generator=generator(layer.device),
                noise=layer.placement.noise,
                weight_at=layer.weight_at,
            )
        )
    return views


def _agreed(reason: str | None, layers: Sequence[LayerStorage]) -> str | None:
    """A reason to skip an update, the same wherever the layers' parts are held (the engine
    places all its layers alike)."""
    return layers[0].placement.agree(reason) if layers else reason


def non_finite_inputs(
    views: list[LayerView], needs: frozenset[str], layers: Sequence[LayerStorage]
) -> str | None:
    """Name the first non-finite weight, gradient or momentum, or None if all are finite."""
    found = None
    for view, layer in zip(views, layers, strict=True):
        for key in ("weight", *sorted(needs)):
            # the weight's values as held (a dense weight's inactive entries are zeros)
            value = layer.local(layer.param).detach() if key == "weight" else getattr(view, key)
            if found is None and not _finite(value):
                found = f"{key} of {view.name}"
        if found is not None:
            break
    return _agreed(found, layers)


def scores(
    criterion: Criterion,
    views: list[LayerView],
    layers: Sequence[LayerStorage],
    done: Callable[[int], None] | None = None,
) -> list[Tensor] | str:
    """Each view's scores; a string (the reason) where a criterion gave non-finite ones.
    ``done(i)`` is called once layer ``i`` is scored."""
    out = []
    reason = None
    for i, view in enumerate(views):
        s = layers[i].placement.evaluate(criterion, view)
        if done is not None:
            done(i)
        s = checked(criterion, s, view.shape, view.name)
        if reason is None and not _finite(s):
            # no early exit: where a criterion is evaluated together with other processes,
            # each of them must evaluate every layer
            reason = f"criterion {criterion.name!r} gave non-finite scores for {view.name}"
        out.append(s)
    reason = _agreed(reason, layers)
    return out if reason is None else reason


def prune_scores(
    crit: Criterion, views: list[LayerView], layers: Sequence[LayerStorage]
) -> list[Tensor | ActiveScores] | str:
    """Prune scores per layer. An elementwise criterion (magnitude, global magnitude) is
    evaluated on the active weights only where they are fewer than half: the scores of those
    positions, with the positions, instead of a pass over the whole layer (and, for a weight
    held as CSR values, without building it)."""
    if not crit.elementwise:
        whole = scores(crit, views, layers)
        return whole if isinstance(whole, str) else list[Tensor | ActiveScores](whole)
    out: list[Tensor | ActiveScores] = []
    reason = None
    for view, layer in zip(views, layers, strict=True):
        if 2 * layer.active >= layer.numel:
            s = checked(crit, crit.fn(view), view.shape, view.name)
            entry: Tensor | ActiveScores = s
        else:
            idx = view.mask.reshape(-1).nonzero().squeeze(1)
            s = checked(crit, crit.fn(view.at(idx)), idx.shape, view.name)
            entry = ActiveScores(idx, s)
        if not _finite(s):
            reason = f"criterion {crit.name!r} gave non-finite scores for {view.name}"
            break
        out.append(entry)
    reason = _agreed(reason, layers)
    return out if reason is None else reason


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
        placement = layers[i].placement
        if isinstance(s, ActiveScores):  # scores of the active positions only
            gen = generator(s.idx.device)
            chosen = placement.select_listed(
                s.scores, s.idx, view.mask.numel(), remove[i], gen, count=layers[i].active
            )
            out[i] = chosen.view_as(view.mask)
            continue
        out[i] = placement.select(
            s,
            view.mask,
            remove[i],
            generator(s.device),
            largest=False,
            count=layers[i].active,
        )
    if glob:
        # across the free layers, over their active positions (the same candidates, in the
        # same order, as over the whole layers)
        listed = [_listed(scores[i], views[i].mask) for i in free]
        cands = []
        for i, entry in zip(free, listed, strict=True):
            cand = torch.ones(entry.idx.numel(), dtype=torch.bool, device=entry.idx.device)
            # protected: every layer keeps at least one weight
            best = layers[i].placement.best_listed(entry.scores, entry.idx, views[i].mask.numel())
            if best is not None:
                cand[best] = False
            cands.append(cand)
        across = layers[free[0]].placement.select_across_listed(
            [entry.scores for entry in listed],
            [entry.idx for entry in listed],
            cands,
            [views[i].mask.numel() for i in free],
            [layers[i].placement for i in free],
            total_free,
            generator,
            largest=False,
        )
        for i, entry, chosen in zip(free, listed, across, strict=True):
            pruned = torch.zeros(views[i].mask.numel(), dtype=torch.bool, device=entry.idx.device)
            pruned[entry.idx[chosen]] = True
            out[i] = pruned.view_as(views[i].mask)
    return [o for o in out if o is not None]


def _listed(scores: Tensor | ActiveScores, mask: Tensor) -> ActiveScores:
    """Scores at the active positions only."""
    if isinstance(scores, ActiveScores):
        return scores
    idx = mask.reshape(-1).nonzero().squeeze(1)
    return ActiveScores(idx, scores.reshape(-1)[idx])
