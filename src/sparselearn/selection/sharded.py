"""Exact top-k over scores that several processes hold a part of (e.g. the blocks of rows that
FSDP2 gives each rank), equal to what :func:`~sparselearn.selection.top_k` picks from the whole
scores in one process.

Each process proposes its candidates at or past a threshold all of them agree on (an
all-reduce), the proposals are all-gathered (about ``k`` values and their positions: far less
than the scores), and every process runs the same exact selection on them, ties ordered by
global position and drawn with the caller's seeded generator, as ``top_k`` draws them. A
process then keeps the positions in its parts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .collectives import all_counts, all_gather_varying, comm_device
from .local import _kth_value, _sample_without_replacement, _split, _split_at_sampled_pivot


@dataclass
class Part:
    """One process's share of a selection: a block of scores with a bool tensor of its
    candidates (``candidates``), or the scores of listed positions only (``positions``, flat
    within the block); ``start`` is the block's first position in the selection's global
    numbering (e.g. a layer's offset among several layers plus the block's offset in it)."""

    scores: Tensor
    start: int
    numel: int  # the block's entries
    candidates: Tensor | None = None
    positions: Tensor | None = None

    def best(self, k: int, largest: bool) -> tuple[Tensor, Tensor, int]:
        """The scores and block positions of the candidates at or past this part's k-th best
        (all of them where there are no more than ``k``), and the number of candidates.
        Without ranking every candidate where most positions are candidates (growth): the
        sampled pivot of :func:`~sparselearn.selection.top_k`."""
        flat = self.scores.reshape(-1)
        if flat.dtype in (torch.float16, torch.bfloat16) or not flat.is_floating_point():
            flat = flat.float()
        if self.positions is not None:
            n = self.positions.numel()
            if n <= k:
                return flat, self.positions, n
            reach = _reaching(flat, _kth_value(flat, k, largest), largest)
            return flat[reach], self.positions[reach], n
        assert self.candidates is not None
        cand = self.candidates.reshape(-1)
        n = int(torch.count_nonzero(cand))
        if n <= k:
            idx = cand.nonzero().squeeze(1)
            return flat[idx], idx, n
        found = _split_at_sampled_pivot(flat, cand, k, n, largest)
        picked, ties = (
            found if found is not None else _split(flat, cand.nonzero()[:, 0], k, largest)
        )
        idx = torch.cat([picked, ties])
        return flat[idx], idx, n


def _reaching(values: Tensor, threshold: Tensor | float, largest: bool) -> Tensor:
    return values >= threshold if largest else values <= threshold


def sharded_top_k(
    parts: list[Part],
    k: int,
    generator: torch.Generator,
    group: Any,
    *,
    largest: bool = True,
    count: int | None = None,
) -> list[Tensor]:
    """Exactly ``k`` candidates with the largest (``largest=False``: smallest) scores over every
    process's parts, the result of :func:`~sparselearn.selection.top_k` on the whole scores: one
    flat bool tensor per part (its block's entries). ``count``: the candidates on all ranks.

    Why it is exact: a rank whose candidates number more than ``k`` has ``k`` of them at or past
    its own k-th best value ``t``, so the global k-th best lies at or past ``t``; the largest
    such ``t`` over the ranks (``T``) is a threshold every selected or tied candidate reaches.
    The candidates at or past ``T`` (at least ``k``, at most about ``k`` per rank) are
    all-gathered and selected from; the ties at the k-th best are drawn in the order of their
    global positions, as one process draws them.
    """
    out = [torch.zeros(p.numel, dtype=torch.bool, device=p.scores.device) for p in parts]
    found = [p.best(max(k, 1), largest) for p in parts]
    n_local = sum(n for _, _, n in found)
    n_cand = all_counts([n_local], group)[0] if count is None else count
    if k < 0 or k > n_cand:
        raise ValueError(f"cannot select {k} of {n_cand} candidates")
    if k == 0:
        return out
    if k == n_cand:
        for o, (_, idx, _) in zip(out, found, strict=True):
            o[idx] = True
        return out
    vals = torch.cat([v for v, _, _ in found])
    sign = 1.0 if largest else -1.0
    own = float(_kth_value(vals, k, largest)) * sign if n_local > k else -math.inf
    t = torch.tensor([own], dtype=torch.float64, device=comm_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    threshold = float(t) * sign
    reach = _reaching(vals, threshold, largest)
    positions = torch.cat(
        [idx.to(torch.int64) + p.start for p, (_, idx, _) in zip(parts, found, strict=True)]
    )
    every_v = all_gather_varying(vals[reach], group)
    every_p = all_gather_varying(positions[reach], group)
    kth = _kth_value(every_v, k, largest)
    beyond = every_v > kth if largest else every_v < kth
    picked = every_p[beyond]
    ties = every_p[every_v == kth].sort().values  # in global position order
    need = k - picked.numel()
    if need == ties.numel():
        chosen = torch.cat([picked, ties])
    else:
        draw = _sample_without_replacement(ties.numel(), need, generator, ties.device)
        chosen = torch.cat([picked, ties[draw]])
    for o, p in zip(out, parts, strict=True):
        here = chosen[(chosen >= p.start) & (chosen < p.start + p.numel)] - p.start
        o[here.to(o.device)] = True
    return out


def sharded_argmax(scores: Tensor, candidates: Tensor, start: int, group: Any) -> int:
    """The global flat position of the best candidate over every process's part (``start``:
    this part's first position), the first by position among equal best scores: what
    ``argmax`` of the whole tensor gives."""
    flat = torch.where(candidates.reshape(-1), scores.reshape(-1).double(), -math.inf)
    if flat.numel():
        best = int(flat.argmax())
        mine = torch.tensor([float(flat[best]), float(best + start)])
    else:
        mine = torch.tensor([-math.inf, math.inf])
    every = all_gather_varying(mine.double(), group).view(-1, 2)
    top = every[:, 0].max()
    return int(every[every[:, 0] == top, 1].min())
