"""Exact top-k with seeded tie-breaking."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparselearn.selection import bottom_k, top_k
from sparselearn.selection import local as selection


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


@given(
    n=st.integers(64, 4000),
    k_frac=st.floats(0.0, 0.25),
    levels=st.sampled_from([3, 50, 10_000]),
    seed=st.integers(0, 2**30),
    largest=st.booleans(),
)
def test_sampled_kth_value_is_exact(
    monkeypatch: pytest.MonkeyPatch, n: int, k_frac: float, levels: int, seed: int, largest: bool
) -> None:
    # shrink the thresholds so that small inputs take the sampled path (and sometimes its
    # fallback, when the sample underestimates the tail)
    monkeypatch.setattr(selection, "SAMPLED_MIN", 64)
    monkeypatch.setattr(selection, "_SAMPLE", 16)
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, levels, (n,), generator=g).float()
    k = max(1, int(k_frac * n))
    ordered = torch.sort(values, descending=largest).values
    assert selection._kth_value(values, k, largest) == ordered[k - 1]


def test_large_selection_matches_a_full_sort() -> None:
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(2**21, generator=g)
    cand = torch.rand(2**21, generator=g) < 0.9
    chosen = top_k(scores, cand, 50_000, torch.Generator().manual_seed(0))
    expected = torch.zeros_like(cand)
    masked = torch.where(cand, scores, torch.tensor(float("-inf")))
    expected[torch.sort(masked, descending=True).indices[:50_000]] = True
    assert torch.equal(chosen, expected)


def test_sampled_kth_value_falls_back_when_the_sample_misleads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(selection, "SAMPLED_MIN", 64)
    monkeypatch.setattr(selection, "_SAMPLE", 16)
    n = 4000
    values = torch.zeros(n)
    values[1::7] = 0.5
    values[:: n // 16] = 1.0  # every sampled position holds a large value, nothing else does
    monkeypatch.setattr(
        selection, "_sample_positions", lambda n, device: torch.arange(0, n, n // 16)
    )
    calls: list[int] = []
    real = torch.kthvalue

    def counting(t: torch.Tensor, k: int) -> torch.return_types.kthvalue:
        calls.append(t.numel())
        return real(t, k)

    monkeypatch.setattr(torch, "kthvalue", counting)
    k = 500  # far more than the 16 large values the sample suggests
    result = selection._kth_value(values, k, largest=True)
    assert result == torch.sort(values, descending=True).values[k - 1] == 0.5
    assert calls[-1] == n  # the pre-filter held too few values: the full tensor was used


@given(
    n=st.integers(64, 3000),
    cand_frac=st.floats(0.5, 1.0),
    k_frac=st.floats(0.0, 0.25),
    levels=st.sampled_from([2, 5, 50, 100_000]),
    seed=st.integers(0, 2**30),
    largest=st.booleans(),
)
def test_the_sampled_pivot_path_selects_what_ranking_all_candidates_selects(
    monkeypatch: pytest.MonkeyPatch,
    n: int,
    cand_frac: float,
    k_frac: float,
    levels: int,
    seed: int,
    largest: bool,
) -> None:
    # same positions, same tie draw, whether or not the candidates were pre-filtered by a pivot
    monkeypatch.setattr(selection, "SAMPLED_MIN", 64)
    monkeypatch.setattr(selection, "_SAMPLE", 16)
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (n,), generator=g).float()
    scores[torch.rand(n, generator=g) < 0.1] = float("nan")  # never candidates: never read
    cand = (torch.rand(n, generator=g) < cand_frac) & ~scores.isnan()
    n_cand = int(cand.sum())
    k = int(k_frac * n_cand)
    fast = top_k(scores, cand, k, torch.Generator().manual_seed(seed), largest=largest)
    fast_counted = top_k(
        scores, cand, k, torch.Generator().manual_seed(seed), largest=largest, count=n_cand
    )
    monkeypatch.setattr(selection, "_split_at_sampled_pivot", lambda *args: None)
    full = top_k(scores, cand, k, torch.Generator().manual_seed(seed), largest=largest)
    assert torch.equal(fast, full)
    assert torch.equal(fast_counted, full)
    assert int(fast.sum()) == k


def test_growth_ranks_only_the_candidates_past_the_pivot(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    n = 2**21
    scores = torch.rand(n, generator=g)
    cand = torch.rand(n, generator=g) < 0.95
    k = 30_000
    ranked: list[int] = []
    real = selection._split

    def spy(flat: torch.Tensor, idx: torch.Tensor, k: int, largest: bool) -> object:
        ranked.append(idx.numel())
        return real(flat, idx, k, largest)

    monkeypatch.setattr(selection, "_split", spy)
    chosen = top_k(scores, cand, k, torch.Generator().manual_seed(0))
    assert len(ranked) == 1
    assert k <= ranked[0] < 2 * k
    kth = torch.sort(scores[cand], descending=True).values[k - 1]
    assert torch.equal(chosen, (scores >= kth) & cand)


def test_a_sea_of_tied_scores_is_split_without_ranking() -> None:
    # real gradients: most positions exactly zero (dead units), fewer non-zero than wanted
    g = torch.Generator().manual_seed(1)
    n = 2**21
    scores = torch.where(torch.rand(n, generator=g) < 0.01, torch.rand(n, generator=g), 0.0)
    cand = torch.rand(n, generator=g) < 0.95
    k = 50_000
    found = selection._split_at_sampled_pivot(scores, cand, k, int(cand.sum()), True)
    assert found is not None
    picked, ties = found
    assert torch.equal(picked, ((scores > 0) & cand).nonzero().squeeze(1))
    assert torch.equal(ties, ((scores == 0) & cand).nonzero().squeeze(1))
    chosen = top_k(scores, cand, k, torch.Generator().manual_seed(0))
    assert int(chosen.sum()) == k
    assert bool(chosen[(scores > 0) & cand].all())


def test_a_misleading_sample_gets_a_second_wider_try_before_ranking_everything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the sample sees only the largest scores; the wider second pivot still leaves a short list
    monkeypatch.setattr(selection, "SAMPLED_MIN", 64)
    monkeypatch.setattr(selection, "_SAMPLE", 64)
    n, k = 20_000, 200
    scores = torch.linspace(0, 1, n)
    cand = torch.ones(n, dtype=torch.bool)
    top = torch.arange(n - 400, n)  # what the sample sees: the top 2%, k is the top 1%
    sample = top[torch.randperm(400, generator=torch.Generator().manual_seed(0))[:64]]
    monkeypatch.setattr(selection, "_sample_positions", lambda n, device: sample)
    found = selection._split_at_sampled_pivot(scores, cand, k, n, True)
    assert found is not None
    picked, ties = found
    assert torch.equal(torch.cat([picked, ties]).sort().values, torch.arange(n - k, n))


@given(st.integers(1, 2000), st.floats(0.0, 1.0), st.integers(0, 2**30))
def test_positions_drawn_without_replacement_are_distinct_ascending_and_exactly_k(
    n: int, share: float, seed: int
) -> None:
    from sparselearn.selection import sample_without_replacement

    k = round(share * n)
    drawn = sample_without_replacement(n, k, torch.Generator().manual_seed(seed))
    assert drawn.numel() == k
    assert torch.equal(drawn, torch.unique(drawn))  # distinct and ascending
    assert k == 0 or (int(drawn[0]) >= 0 and int(drawn[-1]) < n)


def test_positions_drawn_without_replacement_are_uniform() -> None:
    from sparselearn.selection import sample_without_replacement

    # each position is drawn with probability k / n, below and above n / 2
    for k in (3, 7):
        counts = torch.zeros(10)
        gen = torch.Generator().manual_seed(0)
        for _ in range(4000):
            counts[sample_without_replacement(10, k, gen)] += 1
        expected = 4000 * k / 10
        assert float((counts - expected).abs().max()) < 5 * (expected * (1 - k / 10)) ** 0.5
