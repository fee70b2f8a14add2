"""Exact integer budgets: allocation and initial distributions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from sparselearn.budget import allocate, layer_counts


@st.composite
def allocation_problems(draw: st.DrawFn) -> tuple[int, list[float], list[int]]:
    n = draw(st.integers(1, 8))
    caps = draw(st.lists(st.integers(0, 500), min_size=n, max_size=n))
    weights = draw(
        st.lists(st.floats(0, 1e3, allow_nan=False, allow_subnormal=False), min_size=n, max_size=n)
    )
    total = draw(st.integers(0, sum(caps)))
    return total, weights, caps


@given(allocation_problems())
def test_allocation_is_exact_and_within_caps(problem: tuple[int, list[float], list[int]]) -> None:
    total, weights, caps = problem
    counts = allocate(total, weights, caps)
    assert sum(counts) == total
    assert all(0 <= c <= cap for c, cap in zip(counts, caps, strict=True))


@given(allocation_problems())
def test_allocation_is_proportional_where_no_cap_binds(
    problem: tuple[int, list[float], list[int]],
) -> None:
    total, weights, caps = problem
    assume(sum(weights) > 0)
    shares = [total * w / sum(weights) for w in weights]
    assume(all(s <= cap - 1 for s, cap in zip(shares, caps, strict=True)))
    counts = allocate(total, weights, caps)
    for c, s in zip(counts, shares, strict=True):
        assert abs(c - s) < 1 + 1e-6


@given(allocation_problems())
def test_capped_shares_spill_to_the_others(problem: tuple[int, list[float], list[int]]) -> None:
    total, weights, caps = problem
    counts = allocate(total, weights, caps)
    # a layer below its cap never gets less than its proportional share of what the
    # uncapped layers received (up to rounding): the excess of full layers went there
    uncapped = [i for i in range(len(caps)) if counts[i] < caps[i] and weights[i] > 0]
    if len(uncapped) >= 2:
        ratio = [counts[i] / weights[i] for i in uncapped]
        spread = max(ratio) - min(ratio)
        assert spread <= 1.0 / min(weights[i] for i in uncapped) + 1e-6


def test_allocation_example() -> None:
    assert allocate(10, [1.0, 1.0, 2.0], [10, 1, 10]) == [3, 1, 6]
    assert allocate(5, [0.0, 0.0], [2, 3]) == [2, 3]  # no signal: fill by free capacity


def test_allocation_refuses_impossible_totals() -> None:
    with pytest.raises(ValueError, match="cannot allocate 7"):
        allocate(7, [1.0, 1.0], [3, 3])
    with pytest.raises(ValueError, match="finite and >= 0"):
        allocate(1, [math.nan], [3])


SHAPES = [
    torch.Size(s) for s in [(300, 784), (100, 300), (10, 100), (64, 3, 3, 3), (128, 64, 3, 3)]
]
NAMES = [f"l{i}" for i in range(len(SHAPES))]


@given(density=st.floats(0.01, 1.0), init=st.sampled_from(["uniform", "er", "erk"]))
def test_layer_counts_hit_the_global_budget_exactly(density: float, init: str) -> None:
    total = sum(math.prod(s) for s in SHAPES)
    counts = layer_counts(init, SHAPES, density, NAMES)
    assert sum(counts) == round(density * total)
    assert all(1 <= c <= math.prod(s) for c, s in zip(counts, SHAPES, strict=True))


def test_uniform_gives_every_layer_the_density() -> None:
    counts = layer_counts("uniform", SHAPES, 0.1, NAMES)
    for c, s in zip(counts, SHAPES, strict=True):
        assert abs(c - 0.1 * math.prod(s)) < 1


def test_erk_fills_small_layers_first_and_caps_them_at_dense() -> None:
    counts = layer_counts("erk", SHAPES, 0.5, NAMES)
    dens = [c / math.prod(s) for c, s in zip(counts, SHAPES, strict=True)]
    assert dens[3] == 1.0  # the 3-channel first conv is the one that saturates
    # the rest follow sum(shape)/prod(shape) with one common scale
    rho = [sum(s) / math.prod(s) for s in SHAPES]
    scales = [d / r for d, r, c in zip(dens, rho, counts, strict=True) if d < 1]
    assert max(scales) / min(scales) == pytest.approx(1.0, rel=0.02)


def test_er_ignores_the_kernel() -> None:
    shapes = [torch.Size((64, 32, 3, 3)), torch.Size((64, 32, 1, 1))]
    er = layer_counts("er", shapes, 0.2, ["a", "b"])
    erk = layer_counts("erk", shapes, 0.2, ["a", "b"])
    d_er = [c / math.prod(s) for c, s in zip(er, shapes, strict=True)]
    d_erk = [c / math.prod(s) for c, s in zip(erk, shapes, strict=True)]
    assert d_er[0] == pytest.approx(d_er[1], rel=0.02)  # same fan-in/out: same density
    assert d_erk[1] > d_erk[0]  # ERK favours the 1x1 kernel


def test_empty_layer_error_names_the_layer() -> None:
    with pytest.raises(ValueError, match="no active weight in l2 \\(1000 weights\\)"):
        layer_counts("uniform", SHAPES, 0.0004, NAMES)
