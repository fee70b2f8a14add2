"""Where a sparsified weight lives, answered beneath the mask-update algorithm.

The algorithm (``scoring.py``, ``update.py``) is written in whole-layer terms: score the layer,
select exactly ``k`` positions, count, agree on a reason to skip. A layer's :class:`Placement`
says how each of those is done for the part of the weight this process holds:

- :data:`WHOLE`: the process holds the whole weight (one process, or data-parallel ranks that
  each hold all of it).
- :class:`RowBlock`: the process holds a block of rows (FSDP2's ``fully_shard``, a ``DTensor``
  placed ``Shard(0)``); selections run across every rank's block and equal what one process
  picks from the whole weight (:func:`~sparselearn.selection.sharded_top_k`).

Every per-weight tensor the algorithm handles (masks, scores, gradients) is the part this process
holds. A new placement (e.g. another sharding) is a new class here; the algorithm does not
change.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from ..criteria import Criterion, LayerView, Redistribution, Reduction
from ..selection import (
    Part,
    all_counts,
    all_sum,
    any_rank,
    bottom_k,
    sharded_argmax,
    sharded_top_k,
    top_k,
)
from . import distributed
from .sharding import Shard, local_tensor, shard_of

Generators = Callable[[torch.device], torch.Generator]


class Placement(Protocol):
    """How the algorithm's whole-layer operations are done on the part of a weight held here."""

    def local(self, tensor: Tensor) -> Tensor:
        """The part held here of a tensor of the parameter's layout (the parameter, its gradient,
        optimizer state): the same storage, in-place changes reach it."""
        ...

    def whole_shape(self, local_shape: torch.Size) -> torch.Size:
        """The whole weight's shape, from the shape of the part held here."""
        ...

    def part(self, whole: Tensor) -> Tensor:
        """The part held here of a tensor of the whole weight's shape (a copy)."""
        ...

    def public(self, mask: Tensor) -> Tensor:
        """The mask as ``engine.masks`` shows it."""
        ...

    def count(self, positions: Tensor) -> int:
        """True entries of a bool tensor (the part held here) over the whole weight."""
        ...

    def agree(self, reason: str | None) -> str | None:
        """A reason to skip an update, the same wherever the weight's parts are (one part's
        non-finite values make every holder skip)."""
        ...

    def evaluate(self, criterion: Criterion, view: LayerView) -> object:
        """``criterion.fn`` for the part held here: scores of the part's shape."""
        ...

    def statistic(self, redistribution: Redistribution, view: LayerView) -> float:
        """A redistribution's number for the whole layer."""
        ...

    def noise(self, generator: torch.Generator, like: Tensor) -> Tensor:
        """Uniform [0, 1) noise for the part held here (``like``: a tensor of its shape and
        device): the part of the whole weight's draw, so that the draw is the one a single
        process makes."""
        ...

    def select(
        self,
        scores: Tensor,
        candidates: Tensor,
        k: int,
        generator: torch.Generator,
        *,
        largest: bool,
        count: int | None,
    ) -> Tensor:
        """Exactly ``k`` of the layer's candidates (:func:`~sparselearn.selection.top_k` over
        the whole layer): bool, the part's shape."""
        ...

    def select_listed(
        self,
        scores: Tensor,
        positions: Tensor,
        numel: int,
        k: int,
        generator: torch.Generator,
        *,
        count: int,
    ) -> Tensor:
        """The ``k`` lowest of scores given at listed flat ``positions`` of the part (``count``:
        how many are listed over the whole layer): flat bool of ``numel`` entries."""
        ...

    def select_across(
        self,
        scores: Sequence[Tensor],
        candidates: Sequence[Tensor],
        placements: Sequence[Placement],
        k: int,
        generator: Generators,
        *,
        largest: bool,
    ) -> list[Tensor]:
        """Exactly ``k`` candidates over several layers at once, one bool tensor per layer
        (the layers share this placement's kind)."""
        ...

    def best_listed(self, scores: Tensor, positions: Tensor, numel: int) -> int | None:
        """The layer's best score among scores given at listed flat ``positions`` of the part
        (of ``numel`` entries), the first by position among equal ones: its index into the
        list, None when it lies in another part."""
        ...

    def select_across_listed(
        self,
        scores: Sequence[Tensor],
        positions: Sequence[Tensor],
        candidates: Sequence[Tensor],
        numels: Sequence[int],
        placements: Sequence[Placement],
        k: int,
        generator: Generators,
        *,
        largest: bool,
    ) -> list[Tensor]:
        """:meth:`select_across` over scores given at listed flat ``positions`` of each layer's
        part (``candidates``: bool over the listed entries; ``numels``: the parts' entries):
        one bool tensor over the listed entries per layer, the same selection as over the
        whole layers."""
        ...

    def disagreeing(self, masks: Sequence[Tensor], active: Sequence[int]) -> tuple[list[int], bool]:
        """Data-parallel checks after an update: the indices of layers whose masks are wrong
        somewhere, and whether rank 0's copy may repair them."""
        ...

    def record(self) -> list[int] | None:
        """What a saved state records of this placement (None: nothing to check)."""
        ...


class Whole:
    """The process holds the whole weight."""

    def local(self, tensor: Tensor) -> Tensor:
        return tensor

    def whole_shape(self, local_shape: torch.Size) -> torch.Size:
        return local_shape

    def part(self, whole: Tensor) -> Tensor:
        return whole

    def public(self, mask: Tensor) -> Tensor:
        return mask

    def count(self, positions: Tensor) -> int:
        return int(torch.count_nonzero(positions))

    def agree(self, reason: str | None) -> str | None:
        return reason

    def evaluate(self, criterion: Criterion, view: LayerView) -> object:
        return criterion.fn(view)

    def statistic(self, redistribution: Redistribution, view: LayerView) -> float:
        assert redistribution.fn is not None
        return _value(redistribution.fn(view))

    def noise(self, generator: torch.Generator, like: Tensor) -> Tensor:
        return torch.rand(like.shape, generator=generator, device=like.device).to(torch.float32)

    def select(
        self,
        scores: Tensor,
        candidates: Tensor,
        k: int,
        generator: torch.Generator,
        *,
        largest: bool,
        count: int | None,
    ) -> Tensor:
        return top_k(scores, candidates, k, generator, largest=largest, count=count)

    def select_listed(
        self,
        scores: Tensor,
        positions: Tensor,
        numel: int,
        k: int,
        generator: torch.Generator,
        *,
        count: int,
    ) -> Tensor:
        m = positions.numel()
        every = torch.ones(m, dtype=torch.bool, device=positions.device)
        chosen = bottom_k(scores, every, k, generator, count=m)
        out = torch.zeros(numel, dtype=torch.bool, device=positions.device)
        out[positions[chosen]] = True
        return out

    def select_across(
        self,
        scores: Sequence[Tensor],
        candidates: Sequence[Tensor],
        placements: Sequence[Placement],
        k: int,
        generator: Generators,
        *,
        largest: bool,
    ) -> list[Tensor]:
        device = scores[0].device
        flat = torch.cat([s.float().reshape(-1).to(device) for s in scores])
        cand = torch.cat([c.reshape(-1).to(device) for c in candidates])
        chosen = top_k(flat, cand, k, generator(device), largest=largest)
        out, offset = [], 0
        for c in candidates:
            out.append(chosen[offset : offset + c.numel()].view_as(c).to(c.device))
            offset += c.numel()
        return out

    def best_listed(self, scores: Tensor, positions: Tensor, numel: int) -> int | None:
        return int(scores.float().argmax()) if scores.numel() else None

    def select_across_listed(
        self,
        scores: Sequence[Tensor],
        positions: Sequence[Tensor],
        candidates: Sequence[Tensor],
        numels: Sequence[int],
        placements: Sequence[Placement],
        k: int,
        generator: Generators,
        *,
        largest: bool,
    ) -> list[Tensor]:
        # the listed positions ascend within each layer: the concatenation orders candidates
        # (and so ties) as the whole layers' concatenation does
        return self.select_across(scores, candidates, placements, k, generator, largest=largest)

    def disagreeing(self, masks: Sequence[Tensor], active: Sequence[int]) -> tuple[list[int], bool]:
        return distributed.disagreeing(masks), True

    def record(self) -> list[int] | None:
        return None


WHOLE = Whole()


class RowBlock:
    """The process holds rows ``[shard.start, shard.stop)`` of the weight (FSDP2)."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard

    def local(self, tensor: Tensor) -> Tensor:
        return local_tensor(tensor)

    def whole_shape(self, local_shape: torch.Size) -> torch.Size:
        return self.shard.shape

    def part(self, whole: Tensor) -> Tensor:
        return self.shard.block(whole).clone()

    def public(self, mask: Tensor) -> Tensor:
        return self.shard.dtensor(mask)

    def count(self, positions: Tensor) -> int:
        return all_counts([int(torch.count_nonzero(positions))], self.shard.group)[0]

    def agree(self, reason: str | None) -> str | None:
        if not any_rank(reason is not None, self.shard.group):
            return reason
        return reason or "non-finite values on another rank"

    def _whole(self, view: LayerView) -> LayerView:
        """The view of the whole weight, gathered from every rank's block (signals on first
        use)."""
        shard = self.shard

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

    def evaluate(self, criterion: Criterion, view: LayerView) -> object:
        # an elementwise criterion scores the block itself, any other the whole weight
        if criterion.elementwise:
            return criterion.fn(view)
        whole = criterion.fn(self._whole(view))
        return self.shard.block(whole) if isinstance(whole, Tensor) else whole

    def statistic(self, redistribution: Redistribution, view: LayerView) -> float:
        assert redistribution.fn is not None
        # a reduction over positions is summed over the blocks; any other number is computed
        # again from the whole weight
        found = redistribution.fn(view)
        if isinstance(found, Reduction):
            sums = [_sum(found.values)]
            if found.mean:
                sums.append(float(found.values.numel()))
            totals = all_sum(sums, self.shard.group)
            return totals[0] / totals[1] if found.mean else totals[0]
        return _value(redistribution.fn(self._whole(view)))

    def noise(self, generator: torch.Generator, like: Tensor) -> Tensor:
        whole = torch.rand(self.shard.shape, generator=generator, device=like.device)
        return self.shard.block(whole).to(torch.float32)

    def select(
        self,
        scores: Tensor,
        candidates: Tensor,
        k: int,
        generator: torch.Generator,
        *,
        largest: bool,
        count: int | None,
    ) -> Tensor:
        part = Part(scores, self.shard.flat_start, candidates.numel(), candidates=candidates)
        chosen = sharded_top_k([part], k, generator, self.shard.group, largest=largest, count=count)
        return chosen[0].view_as(candidates)

    def select_listed(
        self,
        scores: Tensor,
        positions: Tensor,
        numel: int,
        k: int,
        generator: torch.Generator,
        *,
        count: int,
    ) -> Tensor:
        part = Part(scores, self.shard.flat_start, numel, positions=positions)
        return sharded_top_k([part], k, generator, self.shard.group, largest=False, count=count)[0]

    def select_across(
        self,
        scores: Sequence[Tensor],
        candidates: Sequence[Tensor],
        placements: Sequence[Placement],
        k: int,
        generator: Generators,
        *,
        largest: bool,
    ) -> list[Tensor]:
        parts, offset = [], 0
        for s, c, placement in zip(scores, candidates, placements, strict=True):
            assert isinstance(placement, RowBlock)
            shard = placement.shard
            parts.append(Part(s, offset + shard.flat_start, c.numel(), candidates=c))
            offset += math.prod(shard.shape)
        gen = generator(scores[0].device)
        chosen = sharded_top_k(parts, k, gen, self.shard.group, largest=largest)
        return [o.view_as(c) for o, c in zip(chosen, candidates, strict=True)]

    def best_listed(self, scores: Tensor, positions: Tensor, numel: int) -> int | None:
        full, cand = _spread(
            scores, positions, positions.new_ones(positions.shape, dtype=torch.bool), numel
        )
        best = sharded_argmax(full, cand, self.shard.flat_start, self.shard.group)
        here = (positions == best - self.shard.flat_start).nonzero()
        return int(here[0, 0]) if here.numel() else None

    def select_across_listed(
        self,
        scores: Sequence[Tensor],
        positions: Sequence[Tensor],
        candidates: Sequence[Tensor],
        numels: Sequence[int],
        placements: Sequence[Placement],
        k: int,
        generator: Generators,
        *,
        largest: bool,
    ) -> list[Tensor]:
        # the ranks' parts are numbered by global position: spread over each block
        spread = [
            _spread(*entry) for entry in zip(scores, positions, candidates, numels, strict=True)
        ]
        chosen = self.select_across(
            [f for f, _ in spread],
            [c for _, c in spread],
            placements,
            k,
            generator,
            largest=largest,
        )
        return [c.reshape(-1)[p] for c, p in zip(chosen, positions, strict=True)]

    def disagreeing(self, masks: Sequence[Tensor], active: Sequence[int]) -> tuple[list[int], bool]:
        # each rank holds its own block: the blocks must add up to each layer's count, and
        # nothing can be copied from rank 0 (a layer that fails names a broken invariant)
        totals = all_counts([int(torch.count_nonzero(m)) for m in masks], self.shard.group)
        return [i for i, (t, a) in enumerate(zip(totals, active, strict=True)) if t != a], False

    def record(self) -> list[int] | None:
        return [self.shard.start, self.shard.stop, self.shard.mesh.size()]


def _spread(
    scores: Tensor, positions: Tensor, candidates: Tensor, numel: int
) -> tuple[Tensor, Tensor]:
    """Scores and candidates given at listed flat positions, as flat tensors of ``numel``
    entries (zeros, and no candidate, elsewhere)."""
    full = torch.zeros(numel, dtype=torch.float32, device=scores.device)
    full[positions] = scores.float()
    cand = torch.zeros(numel, dtype=torch.bool, device=scores.device)
    cand[positions[candidates]] = True
    return full, cand


def _value(found: float | Reduction) -> float:
    """A redistribution's number from what it returned, where the whole weight is at hand."""
    if not isinstance(found, Reduction):
        return float(found)
    if found.mean:
        return float(found.values.float().mean())
    return _sum(found.values)


def _sum(values: Tensor) -> float:
    """The sum of a reduction's values (a bool tensor's: its count)."""
    if values.dtype == torch.bool:
        return float(torch.count_nonzero(values))
    return float(values.double().sum())


def placements(names: Sequence[str], params: Sequence[Tensor]) -> list[Placement]:
    """Each weight's placement. The engine handles a model whose sparsified weights are all
    sharded by FSDP2 on one 1-D mesh, or none: anything else is refused, saying what to do."""
    shards = [shard_of(n, p) for n, p in zip(names, params, strict=True)]
    sharded = [n for n, s in zip(names, shards, strict=True) if s is not None]
    whole = [n for n, s in zip(names, shards, strict=True) if s is None]
    if sharded and whole:
        raise TypeError(
            f"{', '.join(sharded[:3])} are sharded by fully_shard but {', '.join(whole[:3])} "
            "are not: apply fully_shard to the root module as well (fully_shard(model) after "
            "its blocks), so that every sparsified weight is sharded"
        )
    meshes = [s.mesh for s in shards if s is not None]
    if any(m != meshes[0] for m in meshes[1:]):
        raise TypeError(
            "the sparsified weights are sharded on different device meshes; shard the whole "
            "model on one mesh (fully_shard(..., mesh=mesh) with the same mesh everywhere)"
        )
    return [WHOLE if s is None else RowBlock(s) for s in shards]


def check_records(saved: object, mine: Mapping[str, list[int]]) -> None:
    """A state saved with per-layer placement records (one rank's blocks) fits only an engine
    whose layers are placed the same way."""
    if not isinstance(saved, Mapping) or {k: list(v) for k, v in saved.items()} == dict(mine):
        return
    if not mine:
        raise ValueError(
            "this engine state was saved by one rank of a model sharded by fully_shard (its "
            "masks are blocks of the weights); load it into the same model sharded the same "
            "way, on the same number of ranks"
        )
    name = next(iter(mine))
    was: Any = saved.get(name) if saved else None
    described = f"rows {was[0]}:{was[1]} of {name} over {was[2]} ranks" if was else "whole weights"
    now = mine[name]
    raise ValueError(
        f"this engine state holds {described}, but this rank holds rows {now[0]}:{now[1]} over "
        f"{now[2]} ranks: load each rank's own state on the same number of ranks it was saved "
        "with (per-rank files: engine-rank<r>.pt)"
    )
