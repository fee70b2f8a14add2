"""Exact top-k selection with seeded tie-breaking: the one place scores become positions."""

from __future__ import annotations

import torch
from torch import Tensor


def top_k(scores: Tensor, candidates: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Bool tensor (shape of ``candidates``) marking exactly ``k`` candidate positions with the
    largest ``scores``; ties at the threshold are broken uniformly at random by ``generator``.

    ``scores`` must be finite at the candidate positions. Cost: one selection pass (kthvalue), no
    full sort.
    """
    flat_cand = candidates.reshape(-1)
    out = torch.zeros_like(flat_cand)
    idx = flat_cand.nonzero().squeeze(1)  # (n,) candidate positions
    n = idx.numel()
    if k < 0 or k > n:
        raise ValueError(f"cannot select {k} of {n} candidates")
    if k == n:
        out[idx] = True
        return out.view_as(candidates)
    if k == 0:
        return out.view_as(candidates)
    vals = scores.reshape(-1)[idx]
    if vals.dtype in (torch.float16, torch.bfloat16) or not vals.is_floating_point():
        vals = vals.float()
    kth = torch.kthvalue(vals, n - k + 1).values  # the k-th largest value
    above = vals > kth
    out[idx[above]] = True
    ties = idx[vals == kth]
    need = k - int(above.sum())
    if need == ties.numel():
        out[ties] = True
    else:
        perm = torch.randperm(ties.numel(), generator=generator, device=generator.device)
        out[ties[perm[:need].to(ties.device)]] = True
    return out.view_as(candidates)


def bottom_k(scores: Tensor, candidates: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Like :func:`top_k`, for the ``k`` smallest scores."""
    return top_k(-scores.float(), candidates, k, generator)
