"""The compiled max pooling (sparselearn.accel.max_pool2d): F.max_pool2d's outputs and
gradients bit for bit, ties and NaNs included, on both backends and any number of threads."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparselearn.accel import MaxPool2d, max_pool2d
from sparselearn.accel.pooling import _MaxPoolFn
from sparselearn.kernels import extension, kernels_for
from sparselearn.models import create_model
from tests.helpers import BoundKernels

BACKENDS = ["torch"] + (["cpp"] if extension() is not None else [])


def _both(x: torch.Tensor, k: int, backend: str) -> tuple[torch.Tensor, ...]:
    """(the kernels', PyTorch's) outputs and input gradients for one output gradient (the
    kernels on any plane, where max_pool2d leaves narrow ones to PyTorch)."""
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = _MaxPoolFn.apply(a, k, kernels_for(a, backend)), F.max_pool2d(b, k)
    g = torch.randn(ya.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    ya.backward(g)
    yb.backward(g)
    assert a.grad is not None
    assert b.grad is not None
    return ya, yb, a.grad, b.grad


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 4),
    hw=st.tuples(st.integers(1, 13), st.integers(1, 70)),  # rows of 16 windows and a rest
    k=st.integers(1, 4),
    levels=st.integers(1, 6),  # few distinct values: many windows with equal maxima
    double=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_equals_torch_bit_for_bit(
    batch: int,
    channels: int,
    hw: tuple[int, int],
    k: int,
    levels: int,
    double: bool,
    seed: int,
) -> None:
    if min(hw) < k:
        return
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    x = torch.randint(0, levels, (batch, channels, *hw), generator=g).to(dtype)
    for backend in BACKENDS:
        ya, yb, ga, gb = _both(x, k, backend)
        assert torch.equal(ya, yb)
        assert torch.equal(ga, gb)  # the same input gets each window's gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_nans_and_infinities_are_chosen_as_torch_chooses(backend: str) -> None:
    x = torch.tensor(
        [[[[float("nan"), 1.0, -float("inf"), -float("inf")],
           [2.0, float("nan"), -float("inf"), -float("inf")],
           [float("inf"), 3.0, 5.0, 5.0],
           [1.0, float("inf"), 5.0, 5.0]]]]
    )  # fmt: skip
    ya, yb, ga, gb = _both(x, 2, backend)
    assert torch.equal(ya.isnan(), yb.isnan())
    assert torch.equal(ya.nan_to_num(), yb.nan_to_num())
    assert torch.equal(ga, gb)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_under_deterministic_algorithms(backend: str) -> None:
    """A user who asks PyTorch for deterministic algorithms can still pool (PyTorch refuses
    some scatter-like kernels in that mode)."""
    x = torch.randn(2, 3, 8, 6, generator=torch.Generator().manual_seed(0))
    torch.use_deterministic_algorithms(True)  # restored after the test (conftest)
    _, _, ga, gb = _both(x, 2, backend)
    assert torch.equal(ga, gb)


@pytest.mark.skipif(extension() is None, reason="needs the compiled kernels")
def test_one_thread_gives_the_same_bits_as_all() -> None:
    x = torch.randn(32, 64, 32, 32)
    results = []
    for threads in (1, 2):  # the thread count is restored after each test (conftest)
        torch.set_num_threads(threads)
        results.append(BoundKernels(x, "cpp").max_pool2d(x, 2, True))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.skipif(extension() is None, reason="needs the compiled kernels")
def test_inference_keeps_no_index() -> None:
    x = torch.randn(2, 3, 8, 8)
    _, index = BoundKernels(x, "cpp").max_pool2d(x, 2, False)
    assert index.numel() == 0
    with torch.no_grad():
        assert torch.equal(max_pool2d(x, 2), F.max_pool2d(x, 2))


def test_narrow_float64_outputs_pool_with_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    from sparselearn.accel import pooling

    def refuse(*args: Any) -> None:
        raise AssertionError("the compiled pooling ran")

    monkeypatch.setattr(pooling._MaxPoolFn, "apply", refuse)
    x = torch.randn(2, 3, 8, 14, dtype=torch.float64, requires_grad=True)  # outputs 7 wide
    assert torch.equal(max_pool2d(x, 2), F.max_pool2d(x, 2))
    with pytest.raises(AssertionError, match="compiled pooling ran"):
        max_pool2d(x.detach().float(), 2)  # float32 narrow planes have a kernel


@pytest.mark.skipif(extension() is None, reason="needs the compiled kernels")
@pytest.mark.parametrize("shape", [(64, 256, 8, 8), (64, 512, 4, 4), (64, 512, 2, 2), (7, 9, 6, 5)])
def test_narrow_planes_on_many_threads(shape: tuple[int, ...]) -> None:
    """Planes whose outputs are narrower than a vector, in groups of planes on every thread:
    PyTorch's outputs and gradients, and the same bits on one thread as on all."""
    x = torch.randint(0, 4, shape, generator=torch.Generator().manual_seed(0)).float()
    results = []
    for threads in (1, 2):  # the thread count is restored after each test (conftest)
        torch.set_num_threads(threads)
        results.append(_both(x, 2, "cpp"))
    for ya, yb, ga, gb in results:
        assert torch.equal(ya, yb)
        assert torch.equal(ga, gb)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, None])
def test_a_bad_kernel_size_is_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="kernel_size must be a positive int"):
        max_pool2d(torch.ones(1, 1, 4, 4), bad)
    with pytest.raises(ValueError, match="kernel_size must be a positive int"):
        MaxPool2d(bad)


def test_a_window_larger_than_the_input_or_a_wrong_rank_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        max_pool2d(torch.ones(1, 1, 3, 8), 4)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) input"):
        max_pool2d(torch.ones(1, 8, 8), 2)


def test_large_windows_fall_back_to_torch() -> None:
    x = torch.randn(1, 2, 40, 40, requires_grad=True)
    assert torch.equal(max_pool2d(x, 20), F.max_pool2d(x, 20))


def test_the_models_pool_with_it_and_compute_what_they_did(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # LeNet-5 and VGG-D pool with sparselearn's max_pool2d (its kernel on every plane), and give
    # what PyTorch's pooling gave
    from sparselearn.accel import pooling

    real = F.max_pool2d
    torch.manual_seed(0)
    lenet, vgg = create_model("lenet5", (1, 28, 28), 10), create_model("vgg-d", (3, 32, 32), 10)
    x_lenet, x_vgg = torch.randn(2, 1, 28, 28), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = real(F.relu(lenet.conv1(x_lenet)), 2)
        h = real(F.relu(lenet.conv2(h)), 2)
        want_lenet = lenet.fc4(F.relu(lenet.fc3(h.flatten(1))))
        reference = copy.deepcopy(vgg).eval()
        for module in list(reference.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, MaxPool2d):
                    setattr(module, child_name, torch.nn.MaxPool2d(child.kernel_size))
        want_vgg = reference(x_vgg)
    kernel_calls = []
    apply = pooling._MaxPoolFn.apply

    def counted(*args: Any) -> torch.Tensor:
        kernel_calls.append(args[0].shape)
        result: torch.Tensor = apply(*args)
        return result

    monkeypatch.setattr(pooling._MaxPoolFn, "apply", counted)
    with torch.no_grad():
        assert torch.equal(lenet(x_lenet), want_lenet)
        assert len(kernel_calls) == 2  # outputs 12 and 4 wide
        assert torch.equal(vgg.eval()(x_vgg), want_vgg)
        assert len(kernel_calls) == 7  # outputs 16, 8, 4, 2 and 1 wide
