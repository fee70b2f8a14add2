"""Top-k over scores that come block by block equals top-k over the whole tensor."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparselearn.selection import top_k
from sparselearn.selection.streamed import Blocks, streamed_top_k


@st.composite
def problems(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, int, list[int], int]:
    n = draw(st.integers(1, 400))
    levels = draw(st.integers(1, 6))  # few distinct values: many ties
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**30)))
    scores = torch.randint(0, levels, (n,), generator=g).float()
    if draw(st.booleans()):
        scores = scores + torch.rand(n, generator=g)  # and sometimes almost none
    cand = torch.rand(n, generator=g) < draw(st.floats(0.05, 1.0))
    k = draw(st.integers(0, int(cand.sum())))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=6)))
    spare = draw(st.sampled_from([0, 1, 8, 1 << 20]))  # small: trimming and the tie fallback
    return scores, cand, k, cuts, spare


def _blocks(scores: torch.Tensor, cand: torch.Tensor, cuts: list[int]) -> Blocks:
    bounds = [0, *cuts, scores.numel()]

    def blocks() -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        for lo, hi in itertools.pairwise(bounds):
            yield scores[lo:hi], cand[lo:hi], lo

    return blocks


@given(problems(), st.integers(0, 2**30))
def test_equals_top_k_on_the_whole_tensor_ties_included(
    problem: tuple[torch.Tensor, torch.Tensor, int, list[int], int], seed: int
) -> None:
    scores, cand, k, cuts, spare = problem
    whole_gen = torch.Generator().manual_seed(seed)
    whole = top_k(scores, cand, k, whole_gen).nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(seed)
    streamed = streamed_top_k(_blocks(scores, cand, cuts), k, int(cand.sum()), gen, spare=spare)
    assert torch.equal(streamed, whole)
    # the same draws from the generator: what follows in the update is the same too
    assert torch.equal(gen.get_state(), whole_gen.get_state())


def test_a_sea_of_ties_is_selected_in_passes_with_bounded_memory() -> None:
    # 10,000 zeros and a few positive scores: the threshold lands on the zeros; the passes
    # keep the positive ones and draw the rest of the zeros as top_k does
    scores = torch.zeros(10_000)
    scores[[5, 700, 9000]] = torch.tensor([3.0, 2.0, 1.0])
    cand = torch.ones(10_000, dtype=torch.bool)
    cuts = list(range(1000, 10_000, 1000))
    whole = top_k(scores, cand, 50, torch.Generator().manual_seed(3)).nonzero().squeeze(1)
    streamed = streamed_top_k(
        _blocks(scores, cand, cuts), 50, 10_000, torch.Generator().manual_seed(3), spare=0
    )
    assert torch.equal(streamed, whole)
    assert {5, 700, 9000} <= set(streamed.tolist())


def test_refuses_more_than_the_candidates() -> None:
    scores, cand = torch.rand(10), torch.ones(10, dtype=torch.bool)
    with pytest.raises(ValueError, match="cannot select 11 of 10 candidates"):
        streamed_top_k(_blocks(scores, cand, []), 11, 10, torch.Generator())
