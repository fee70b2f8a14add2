"""Scoring and selection for mask updates: the views criteria read, their scores (checked
for shape and finiteness), and exact selections over several layers at once."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..criteria import Criterion, LayerView
from ..selection import bottom_k, top_k
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
            )
        )
    return views


def non_finite_inputs(views: list[LayerView], needs: frozenset[str]) -> str | None:
    """Name the first non-finite weight, gradient or momentum, or None if all are finite."""
    for view in views:
        for key in ("weight", *sorted(needs)):
            value = view.weight if key == "weight" else getattr(view, key)
            if not _finite(value):
                return f"{key} of {view.name}"
    return None


def scores(criterion: Criterion, views: list[LayerView]) -> list[Tensor] | str:
    """Each view's scores; a string (the reason) where a criterion gave non-finite ones."""
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


def prune_scores(
    crit: Criterion, views: list[LayerView], layers: Sequence[LayerStorage]
) -> list[Tensor | ActiveScores] | str:
    """Prune scores per layer. An elementwise layer-scope criterion (magnitude) is evaluated
    on the active weights only where they are fewer than half: the scores of those
    positions, with the positions, instead of a pass over the whole layer."""
    if not (crit.elementwise and crit.scope == "layer"):
        whole = scores(crit, views)
        return whole if isinstance(whole, str) else list[Tensor | ActiveScores](whole)
    out: list[Tensor | ActiveScores] = []
    for view, layer in zip(views, layers, strict=True):
        if 2 * layer.active >= layer.numel:
            full = scores(crit, [view])
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
        out.append(ActiveScores(idx, s))
    return out


def select_across(
    scores: list[Tensor],
    candidates: list[Tensor],
    k: int,
    generator: Generators,
    *,
    largest: bool = True,
) -> list[Tensor]:
    """Exact top-k (or bottom-k) over several layers at once; one bool tensor per layer."""
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
        if isinstance(s, ActiveScores):  # scores of the active positions only
            m = s.idx.numel()
            every = torch.ones(m, dtype=torch.bool, device=s.idx.device)
            chosen = bottom_k(s.scores, every, remove[i], generator(s.idx.device), count=m)
            pruned = torch.zeros(view.mask.numel(), dtype=torch.bool, device=s.idx.device)
            pruned[s.idx[chosen]] = True
            out[i] = pruned.view_as(view.mask)
            continue
        out[i] = bottom_k(s, view.mask, remove[i], generator(s.device), count=layers[i].active)
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
        across = select_across([full[i] for i in free], cands, total_free, generator, largest=False)
        for i, c in zip(free, across, strict=True):
            out[i] = c
    return [o for o in out if o is not None]
