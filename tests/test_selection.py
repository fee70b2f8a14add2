"""Exact top-k with seeded tie-breaking."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from sparselearn.selection import bottom_k, top_k


@st.composite
def problems(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, int]:
    n = draw(st.integers(1, 300))
    levels = draw(st.integers(1, 6))  # few distinct values: many ties
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**30)))
    scores = torch.randint(0, levels, (n,), generator=g).float()
    cand = torch.rand(n, generator=g) < draw(st.floats(0.05, 1.0))
    k = draw(st.integers(0, int(cand.sum())))
    return scores, cand, k


@given(problems())
def test_selects_exactly_k_candidates_with_the_largest_scores(
    problem: tuple[torch.Tensor, torch.Tensor, int],
) -> None:
    scores, cand, k = problem
    chosen = top_k(scores, cand, k, torch.Generator().manual_seed(0))
    assert int(chosen.sum()) == k
    assert not (chosen & ~cand).any()
    if 0 < k < int(cand.sum()):
        # nothing left out scores above anything chosen
        assert scores[chosen].min() >= scores[cand & ~chosen].max()


@given(problems())
def test_bottom_k_selects_the_smallest(problem: tuple[torch.Tensor, torch.Tensor, int]) -> None:
    scores, cand, k = problem
    chosen = bottom_k(scores, cand, k, torch.Generator().manual_seed(0))
    assert int(chosen.sum()) == k
    assert not (chosen & ~cand).any()
    if 0 < k < int(cand.sum()):
        assert scores[chosen].max() <= scores[cand & ~chosen].min()


def test_ties_are_broken_by_the_generator_deterministically() -> None:
    scores = torch.zeros(1000)
    cand = torch.ones(1000, dtype=torch.bool)
    a = top_k(scores, cand, 100, torch.Generator().manual_seed(1))
    b = top_k(scores, cand, 100, torch.Generator().manual_seed(1))
    c = top_k(scores, cand, 100, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # not simply the first positions
    assert a[:100].sum() < 100


def test_shape_is_kept_and_half_precision_works() -> None:
    scores = torch.randn(4, 5, 3).half()
    cand = torch.ones(4, 5, 3, dtype=torch.bool)
    out = top_k(scores, cand, 7, torch.Generator().manual_seed(0))
    assert out.shape == (4, 5, 3)
    assert int(out.sum()) == 7
