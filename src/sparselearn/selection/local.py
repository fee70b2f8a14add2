"""Exact top-k and bottom-k of one tensor, ties drawn with a seeded generator."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# above this many values, the k-th value is found on a pre-filtered subset (see _kth_value)
SAMPLED_MIN = 1 << 20
_SAMPLE = 1 << 16


def _sample_positions(n: int, device: torch.device) -> Tensor:
    """``_SAMPLE`` positions in ``range(n)``, drawn uniformly from a generator seeded by ``n``.

    A pivot estimated from them only decides how much work the exact selection does, never what
    it selects, so it need not follow the engine's seed. Not a stride: a stride that divides
    the row length of a weight samples a few columns only, and gradients are correlated by
    column (an input that is zero for the whole batch zeroes its column).
    """
    gen = torch.Generator(device=device).manual_seed(n)
    return torch.randint(0, n, (_SAMPLE,), generator=gen, device=device)


def _kth_value(values: Tensor, k: int, largest: bool) -> Tensor:
    """The k-th largest (or smallest) entry of a 1-D tensor, exactly.

    For large inputs a random sample estimates a threshold a little beyond the k-th value; only
    the entries past it (about 1.25 k) go through ``kthvalue``, and none do when the k-th value is
    the pivot itself. If the estimate was too tight, the
    full tensor is used: the answer is exact either way, only the cost differs.
    """
    n = values.numel()
    if n >= SAMPLED_MIN and 4 * k <= n:
        sample = values[_sample_positions(n, values.device)]
        s = sample.numel()
        expected = k * s / n
        j = min(s, int(1.25 * expected + 4 * math.sqrt(expected) + 16))  # rank inside the sample
        pivot = torch.kthvalue(sample, s - j + 1 if largest else j).values
        reached = int(torch.count_nonzero(values >= pivot if largest else values <= pivot))
        if reached >= k:  # the k-th value is the pivot or lies beyond it
            beyond = values > pivot if largest else values < pivot
            c = int(torch.count_nonzero(beyond))
            if c < k:
                return pivot  # e.g. a sea of tied zeros: no selection pass needed at all
            return torch.kthvalue(values[beyond], c - k + 1 if largest else k).values
    return torch.kthvalue(values, n - k + 1 if largest else k).values


def top_k(
    scores: Tensor,
    candidates: Tensor,
    k: int,
    generator: torch.Generator,
    *,
    largest: bool = True,
    count: int | None = None,
) -> Tensor:
    """Bool tensor (shape of ``candidates``) marking exactly ``k`` candidate positions with the
    largest (``largest=False``: smallest) ``scores``; ties at the threshold are broken uniformly at
    random by ``generator``.

    ``scores`` must be finite at the candidate positions. ``count``, the number of candidates,
    saves a counting pass where the caller knows it.
    """
    n_cand = int(torch.count_nonzero(candidates)) if count is None else count
    if k < 0 or k > n_cand:
        raise ValueError(f"cannot select {k} of {n_cand} candidates")
    if k == n_cand:
        return candidates.clone()
    if k == 0:
        return torch.zeros_like(candidates)
    if scores.dtype in (torch.float16, torch.bfloat16) or not scores.is_floating_point():
        scores = scores.float()
    flat, cand = scores.reshape(-1), candidates.reshape(-1)

    # positions strictly better than the k-th best score, and those tied with it
    found = _split_at_sampled_pivot(flat, cand, k, n_cand, largest)
    picked, ties = (
        found if found is not None else _split(flat, cand.nonzero().squeeze(1), k, largest)
    )
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[picked] = True
    need = k - picked.numel()
    if need == ties.numel():
        chosen[ties] = True
    else:
        chosen[ties[_sample_without_replacement(ties.numel(), need, generator, ties.device)]] = True
    return chosen.view_as(candidates)


def _split(flat: Tensor, idx: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """Among the positions ``idx`` (ascending), those strictly better than the k-th best score
    and those tied with it (ascending: the tie draw does not depend on how ``idx`` was found)."""
    vals = flat[idx]
    kth = _kth_value(vals, k, largest)
    beyond = vals > kth if largest else vals < kth
    return idx[beyond], idx[vals == kth]


def _split_at_sampled_pivot(
    flat: Tensor, cand: Tensor, k: int, n_cand: int, largest: bool
) -> tuple[Tensor, Tensor] | None:
    """:func:`_split` without ranking every candidate, for when most positions are candidates
    and few are wanted (growth): a pivot estimated from a random sample to lie a little beyond
    the k-th best leaves a short list of candidates at or past it, which holds every candidate
    better than the k-th best and every one tied with it. None when there is no point in
    sampling or the estimate fell short (fewer than ``k`` reached the pivot).

    When far more than expected reach the pivot, the pivot sits on a large tie (e.g. the zero
    gradients of dead units): if fewer than ``k`` lie strictly past it, it is the k-th best
    value itself and the split needs no ranking at all.
    """
    n = flat.numel()
    if n < SAMPLED_MIN or 2 * n_cand < n or 4 * k > n_cand:
        return None
    pos = _sample_positions(n, flat.device)
    sample = flat[pos][cand[pos]]
    s = sample.numel()
    if s == 0:
        return None
    expected = k * s / n_cand
    for margin in (1, 4):  # a second, wider try before ranking every candidate
        j = min(s, int(margin * (1.25 * expected + 4 * math.sqrt(expected) + 16)))  # rank inside
        pivot = torch.kthvalue(sample, s - j + 1 if largest else j).values
        reached = torch.ge(flat, pivot) if largest else torch.le(flat, pivot)
        reached.logical_and_(cand)
        n_reached = int(torch.count_nonzero(reached))
        if n_reached >= k:
            break
    else:
        return None
    if n_reached > 2 * k + _SAMPLE:
        past = torch.gt(flat, pivot) if largest else torch.lt(flat, pivot)
        past.logical_and_(cand)
        if int(torch.count_nonzero(past)) < k:  # the pivot is the k-th best value
            picked = past.nonzero().squeeze(1)
            return picked, reached.logical_xor_(past).nonzero().squeeze(1)
        return _split(flat, past.nonzero().squeeze(1), k, largest)
    return _split(flat, reached.nonzero().squeeze(1), k, largest)


def _sample_without_replacement(
    n: int, k: int, generator: torch.Generator, device: torch.device
) -> Tensor:
    """``k`` distinct indices in ``range(n)``, uniformly, determined by ``generator``.

    Ties can number millions (e.g. every zero gradient of a dead unit) while only a few are
    needed: NumPy picks k of n without shuffling all n (``randperm`` would permute all of them);
    its seed is drawn from the torch generator, so the result follows the engine's seed.
    """
    import numpy as np  # only needed here; keeps `import sparselearn` lean

    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    picked = np.random.default_rng(seed).choice(n, size=k, replace=False)
    return torch.from_numpy(picked).to(device)


def sample_without_replacement(n: int, k: int, generator: torch.Generator) -> Tensor:
    """``k`` distinct positions in ``range(n)`` (int64, ascending), every set of ``k`` equally
    likely, from ``generator``; memory of the order of ``min(k, n - k)`` positions (and ``n``
    bytes above ``k = n / 2``), never ``n`` positions: a layer's initial mask drawn as a list.

    Up to ``k = n / 50``, NumPy's ``choice`` draws the set in memory of the order of ``k`` (its
    seed drawn from ``generator``). Past that it would permute all of ``range(n)``; positions
    are then drawn independently, the repeated ones dropped, until ``k`` distinct ones are in
    hand, and ``k`` of those kept at random: the set drawn so is uniform too (the draws are
    exchangeable).
    """
    if not 0 <= k <= n:
        raise ValueError(f"cannot draw {k} of {n} positions")
    device = generator.device
    if 50 * k <= n:
        return torch.sort(_sample_without_replacement(n, k, generator, device)).values
    if 2 * k > n:  # draw the positions left out
        out = torch.ones(n, dtype=torch.bool, device=device)
        out[sample_without_replacement(n, n - k, generator)] = False
        return out.nonzero().squeeze(1)
    picked = torch.zeros(0, dtype=torch.long, device=device)
    while picked.numel() < k:
        need = k - picked.numel()
        draw = torch.randint(0, n, (need + need // 8 + 16,), generator=generator, device=device)
        picked = torch.unique(torch.cat([picked, draw]))
    if picked.numel() > k:
        keep = torch.randperm(picked.numel(), generator=generator, device=device)[:k]
        picked = torch.sort(picked[keep]).values
    return picked


def bottom_k(
    scores: Tensor,
    candidates: Tensor,
    k: int,
    generator: torch.Generator,
    *,
    count: int | None = None,
) -> Tensor:
    """Like :func:`top_k`, for the ``k`` smallest scores."""
    return top_k(scores, candidates, k, generator, largest=False, count=count)
