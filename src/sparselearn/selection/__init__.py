"""Exact top-k selection with seeded tie-breaking: the one place scores become positions.

- :func:`top_k` / :func:`bottom_k`: exactly ``k`` of the candidate positions of one tensor,
  ties at the threshold drawn uniformly by a seeded generator;
  :func:`~.streamed.streamed_top_k`: the same over scores that come block by block;
  :func:`sample_without_replacement`: ``k`` positions of ``n`` drawn as a list.
- :func:`sharded_top_k`: the same selection over scores that several processes each hold a
  part of (one :class:`Part` per block), equal to ``top_k`` on the whole scores;
  :func:`sharded_argmax` likewise for ``argmax``.
- ``collectives``: the sums, counts and gathers those use.

It depends on torch alone; the engine's mask updates and anything else that turns scores
into masks build on it.
"""

from __future__ import annotations

from .collectives import all_counts, all_gather_varying, all_sum, any_rank
from .local import bottom_k, sample_without_replacement, top_k
from .sharded import Part, sharded_argmax, sharded_top_k

__all__ = [
    "Part",
    "all_counts",
    "all_gather_varying",
    "all_sum",
    "any_rank",
    "bottom_k",
    "sample_without_replacement",
    "sharded_argmax",
    "sharded_top_k",
    "top_k",
]
