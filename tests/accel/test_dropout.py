"""The hashed dropout (sparselearn.accel.dropout): the distribution of F.dropout, the same bits
from both backends and on any number of threads, its own adjoint, seeded by torch.manual_seed."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparselearn.accel import Dropout, dropout
from sparselearn.accel.dropout import _DropoutFn
from sparselearn.kernels import TorchOps, extension, kernels_for
from sparselearn.models import create_model
from tests.helpers import BoundKernels

BACKENDS = ["torch"] + (["cpp"] if extension() is not None else [])
needs_cpp = pytest.mark.skipif(extension() is None, reason="needs the compiled kernels")


def _seed(seed: int) -> torch.Tensor:
    """A seed as the dropout operator takes it: a 0-d int64 tensor."""
    return torch.tensor(seed, dtype=torch.int64)


@needs_cpp
@settings(max_examples=30, deadline=None)
@given(
    numel=st.integers(1, 70_000),  # below and above one parallel block of 2**16 elements
    keep=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**63 - 2),
    double=st.booleans(),
)
def test_compiled_and_fallback_give_the_same_bits(
    numel: int, keep: float, seed: int, double: bool
) -> None:
    x = torch.randn(numel, dtype=torch.float64 if double else torch.float32)
    compiled = BoundKernels(x, "cpp").dropout(x, keep, _seed(seed))
    assert torch.equal(compiled, TorchOps().dropout(x, keep, seed))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_keeps_each_element_with_probability_one_minus_p(backend: str, p: float) -> None:
    n = 200_000
    x = torch.ones(n)
    y = dropout(x, p, backend=backend)
    kept = y != 0
    # the kept fraction within 5 binomial standard deviations, kept values scaled by 1 / (1 - p)
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sd
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    # neighbours are independent: P(both kept) is (1 - p)^2, not (1 - p)
    both = (kept[1:] & kept[:-1]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 / n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_calls_draw_different_masks_and_manual_seed_repeats_them(backend: str) -> None:
    x = torch.ones(10_000)
    torch.manual_seed(0)
    a, b = dropout(x, 0.5, backend=backend), dropout(x, 0.5, backend=backend)
    agreement = ((a != 0) == (b != 0)).float().mean().item()
    assert 0.45 < agreement < 0.55  # two independent masks agree on half the elements
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.5, backend=backend), a)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_applies_the_forward_mask(backend: str) -> None:
    x = torch.randn(4, 8, 16, 16, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    y = dropout(x, 0.3, backend=backend)
    g = torch.randn_like(y)
    y.backward(g)
    assert x.grad is not None
    kept = y.detach() != 0
    assert torch.equal(x.grad, torch.where(kept, g * (1 / 0.7), torch.zeros_like(g)))
    kernels = kernels_for(x, backend)
    small = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    # one fixed seed: every call of the checked function draws the same mask
    assert torch.autograd.gradcheck(
        lambda t: _DropoutFn.apply(t, 0.7, _seed(11), kernels), (small,)
    )


@needs_cpp
def test_one_thread_gives_the_same_bits_as_all() -> None:
    x = torch.randn(64, 32, 16, 16)
    results = []
    for threads in (1, 2):  # the thread count is restored after each test (conftest)
        torch.set_num_threads(threads)
        results.append(BoundKernels(x, "cpp").dropout(x, 0.7, _seed(99)))
    assert torch.equal(*results)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_contiguous_input_is_masked_by_its_logical_index(backend: str) -> None:
    x = torch.randn(32, 48)
    ops = BoundKernels(x, backend)
    seed = _seed(7)
    assert torch.equal(ops.dropout(x.t(), 0.6, seed), ops.dropout(x.t().contiguous(), 0.6, seed))


def test_identity_in_evaluation_or_at_zero_and_zeros_at_one() -> None:
    x = torch.randn(100)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros(100))
    module = Dropout(0.5).eval()
    assert module(x) is x


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.5", True, None])
def test_a_probability_outside_zero_one_is_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="dropout probability must be a number in"):
        dropout(torch.ones(3), bad)
    with pytest.raises(ValueError, match="dropout probability must be a number in"):
        Dropout(bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_kernels_refuse_a_keep_probability_outside_the_open_interval(backend: str) -> None:
    ops = BoundKernels(torch.ones(1), backend)
    for keep in (0.0, 1.0):
        with pytest.raises((ValueError, RuntimeError), match="keep probability must be in"):
            ops.dropout(torch.ones(3), keep, _seed(0))


def test_wide_resnet_uses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # the model's dropout is the hashed one (torch's is never called): in training two forwards
    # differ, in evaluation they are the same
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("F.dropout was called")

    monkeypatch.setattr(F, "dropout", refuse)
    torch.manual_seed(0)
    model = create_model("wrn-16-8", (3, 32, 32), 10)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
