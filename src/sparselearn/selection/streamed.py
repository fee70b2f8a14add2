"""Exact top-k over scores that come block by block and are never held whole.

:func:`streamed_top_k` selects what :func:`~.local.top_k` selects from the whole tensor (the
same positions, ties drawn the same way from the same generator) while holding one block and a
list of the best positions seen so far: what a mask update needs to grow a layer whose dense
scores would not fit in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from .local import _kth_value, _sample_without_replacement

Blocks = Callable[[], Iterator[tuple[Tensor, Tensor, int]]]
"""A fresh pass over the blocks: each gives (scores, candidates, offset): 1-D scores of
consecutive positions starting at ``offset`` (after those of earlier blocks), and a bool
tensor of the same length marking the candidates among them."""


def _candidates(
    scores: Tensor, candidates: Tensor, offset: int, threshold: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The block's candidates at or above ``threshold`` (all without one): their scores and
    positions (positions are made for these only)."""
    scores = _as_float(scores)
    keep = candidates if threshold is None else candidates & (scores >= threshold)
    at = keep.nonzero().squeeze(1)
    return scores[at], at + offset


def streamed_top_k(
    blocks: Blocks, k: int, n_cand: int, generator: torch.Generator, *, spare: int = 1 << 20
) -> Tensor:
    """The positions (int64, ascending) of exactly ``k`` of the ``n_cand`` candidates with the
    largest scores, ties at the threshold drawn uniformly by ``generator``: equal to
    ``top_k(scores, candidates, k, generator, count=n_cand)`` on the whole tensor.

    One pass keeps every score at or above a threshold that rises as blocks come (the k-th
    best of those kept so far, once more than ``2 k + spare`` are kept): it ends holding every
    candidate better than the k-th best and every one tied with it. Where ties at the threshold
    are so many that more than ``4 k + spare`` would be kept (e.g. the zero gradients of dead
    units), it falls back to passes that find the k-th best value first, count its ties, and
    collect the ones drawn: memory stays bounded either way.
    """
    if k < 0 or k > n_cand:
        raise ValueError(f"cannot select {k} of {n_cand} candidates")
    if k == 0:
        return torch.zeros(0, dtype=torch.long)
    if k == n_cand:
        return torch.cat([c.nonzero().squeeze(1) + offset for _, c, offset in blocks()])
    kept_s: list[Tensor] = []
    kept_p: list[Tensor] = []
    held = 0
    threshold: Tensor | None = None
    for block in blocks():
        scores, positions = _candidates(*block, threshold)
        kept_s.append(scores)
        kept_p.append(positions)
        held += scores.numel()
        if held > 2 * k + spare:
            s, p = torch.cat(kept_s), torch.cat(kept_p)
            threshold = _kth_value(s, k, largest=True)
            keep = s >= threshold
            kept_s, kept_p = [s[keep]], [p[keep]]
            held = kept_s[0].numel()
            if held > 4 * k + spare:  # a sea of ties at the threshold
                return _by_passes(blocks, k, generator)
    s, p = torch.cat(kept_s), torch.cat(kept_p)
    kth = _kth_value(s, k, largest=True)
    picked, ties = p[s > kth], p[s == kth]
    return _with_ties(picked, ties, k - picked.numel(), generator)


def _as_float(scores: Tensor) -> Tensor:
    if scores.dtype in (torch.float16, torch.bfloat16) or not scores.is_floating_point():
        return scores.float()
    return scores


def _with_ties(picked: Tensor, ties: Tensor, need: int, generator: torch.Generator) -> Tensor:
    """``picked`` and ``need`` of the (ascending) ``ties``, drawn as :func:`top_k` draws them."""
    if need != ties.numel():
        ties = ties[_sample_without_replacement(ties.numel(), need, generator, ties.device)]
    return torch.sort(torch.cat([picked, ties])).values


def _by_passes(blocks: Blocks, k: int, generator: torch.Generator) -> Tensor:
    """:func:`streamed_top_k` where the ties at the threshold are too many to hold: the k-th
    best value (the best ``k`` values kept as blocks come), then the positions strictly better
    and the count of the tied ones, then the tied positions drawn."""
    best: Tensor | None = None
    for block in blocks():
        scores, _ = _candidates(*block, None if best is None or best.numel() < k else best.min())
        pool = scores if best is None else torch.cat([best, scores])
        best = torch.topk(pool, min(k, pool.numel())).values
    assert best is not None
    kth = best.min()
    picked, counts = [], []
    for block in blocks():
        scores, positions = _candidates(*block, kth)
        picked.append(positions[scores > kth])
        counts.append(int(torch.count_nonzero(scores == kth)))
    better = torch.cat(picked)
    need, total = k - better.numel(), sum(counts)
    if need == total:
        ranks = torch.arange(total)
    else:
        ranks = torch.sort(
            _sample_without_replacement(total, need, generator, better.device)
        ).values
    chosen, start = [], 0
    for block, n in zip(blocks(), counts, strict=True):
        lo, hi = torch.searchsorted(ranks, torch.tensor([start, start + n])).tolist()
        if hi > lo:
            scores, positions = _candidates(*block, kth)
            tied = positions[scores == kth]
            chosen.append(tied[ranks[lo:hi] - start])
        start += n
    return torch.sort(torch.cat([better, *chosen])).values
