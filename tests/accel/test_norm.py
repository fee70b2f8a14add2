"""sl.accel.BatchNorm2d: nn.BatchNorm2d (then a ReLU) on the compiled kernels, to rounding."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparselearn.accel import BatchNorm2d
from sparselearn.kernels import extension
from tests.helpers import BoundKernels

needs_kernels = pytest.mark.skipif(extension() is None, reason="the compiled kernels do not build")


def _pair(
    channels: int, relu: bool, affine: bool = True, **kwargs: Any
) -> tuple[BatchNorm2d, nn.Module]:
    """(ours, the reference: nn.BatchNorm2d then nn.ReLU) with the same random parameters."""
    ref = nn.BatchNorm2d(channels, affine=affine, **kwargs)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    ours = BatchNorm2d(channels, affine=affine, relu=relu, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours, nn.Sequential(ref, nn.ReLU()) if relu else ref


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    tol = 1e-10 if a.dtype == torch.float64 else 2e-5
    return torch.allclose(a, b, rtol=tol, atol=tol * 10)


def _check_steps(ours: BatchNorm2d, ref: nn.Module, shape: tuple[int, ...], dtype: Any) -> None:
    """Two training steps and an evaluation: outputs, gradients and running statistics."""
    ref_bn = ref[0] if isinstance(ref, nn.Sequential) else ref
    ours.to(dtype)
    ref.to(dtype)
    for _ in range(2):
        # an offset and scale of their own per channel, as a convolution's output has
        x = torch.randn(shape, dtype=dtype) * 3 + torch.randn(shape[1], 1, 1, dtype=dtype)
        x, x_ref = x.requires_grad_(), x.detach().clone().requires_grad_()
        y, y_ref = ours(x), ref(x_ref)
        assert _close(y, y_ref)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        assert x.grad is not None
        assert x_ref.grad is not None
        assert _close(x.grad, x_ref.grad)
        if ours.affine:
            assert _close(ours.weight.grad, ref_bn.weight.grad)
            assert _close(ours.bias.grad, ref_bn.bias.grad)
        if ours.track_running_stats:
            assert _close(ours.running_mean, ref_bn.running_mean)
            assert _close(ours.running_var, ref_bn.running_var)
            assert torch.equal(ours.num_batches_tracked, ref_bn.num_batches_tracked)
    ours.eval()
    ref.eval()
    with torch.no_grad():
        x = torch.randn(shape, dtype=dtype)
        assert _close(ours(x), ref(x))


@needs_kernels
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    c=st.integers(1, 5),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    relu=st.booleans(),
    affine=st.booleans(),
    momentum=st.sampled_from([0.1, None]),
    double=st.booleans(),
)
def test_equals_batchnorm_then_relu(
    n: int, c: int, h: int, w: int, relu: bool, affine: bool, momentum: Any, double: bool
) -> None:
    if n * h * w < 2:  # one value per channel: PyTorch refuses it (test below)
        n = 2
    ours, ref = _pair(c, relu, affine, momentum=momentum)
    _check_steps(ours, ref, (n, c, h, w), torch.float64 if double else torch.float32)


@needs_kernels
@pytest.mark.parametrize("shape", [(3, 4, 24, 24), (130, 3, 2, 2), (2, 3, 40, 31)])
@pytest.mark.parametrize("relu", [False, True])
def test_equals_batchnorm_on_planes_larger_than_a_block_and_many_planes(
    shape: tuple[int, ...], relu: bool
) -> None:
    # the sums take planes in blocks of 512 positions and 64 pieces at a time: planes larger
    # than a block, and more planes than a flush holds
    ours, ref = _pair(shape[1], relu)
    _check_steps(ours, ref, shape, torch.float32)


def test_without_running_statistics_and_in_eval_with_gradients() -> None:
    # track_running_stats=False normalises with the batch's statistics in eval too; eval with
    # gradients wanted goes to PyTorch's BatchNorm: both as nn.BatchNorm2d
    ours, ref = _pair(3, True, track_running_stats=False)
    _check_steps(ours, ref, (4, 3, 5, 5), torch.float32)
    ours, ref = _pair(3, True)
    ours.eval()
    ref.eval()
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), ref(x_ref)
    y.sum().backward()
    y_ref.sum().backward()
    assert _close(y, y_ref)
    assert _close(x.grad, x_ref.grad)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_channels_last_and_the_torch_backend_give_pytorchs_results(backend: str) -> None:
    ours, ref = _pair(4, True)
    ours.backend = backend
    x = torch.randn(3, 4, 6, 5).to(memory_format=torch.channels_last)
    assert _close(ours(x), ref(x))
    assert _close(ours.running_var, ref[0].running_var)


@needs_kernels
def test_one_thread_gives_the_same_bits_as_all() -> None:
    # each channel is summed by one thread in one order
    x0, g = torch.randn(16, 24, 20, 20), torch.randn(16, 24, 20, 20)
    results: list[tuple[torch.Tensor, ...]] = []
    for threads in (1, 2):  # the thread count is restored after each test (conftest)
        torch.set_num_threads(threads)
        bn = BatchNorm2d(24, relu=True)
        x = x0.clone().requires_grad_()
        y = bn(x)
        y.backward(g)
        assert x.grad is not None
        assert bn.weight.grad is not None
        results.append((y, x.grad, bn.weight.grad, bn.running_var))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@needs_kernels
def test_relu_keeps_nan_and_its_gradient_stops_where_the_output_is_zero() -> None:
    ops = BoundKernels(torch.ones(1), "cpp")
    x = torch.tensor([[[[-1.0, 0.5, float("nan"), 2.0]]]])
    y = ops.batch_norm_apply(x, torch.ones(1), torch.zeros(1), True)
    assert torch.equal(y[..., :2], torch.tensor([[[[0.0, 0.5]]]]))
    assert torch.isnan(y[..., 2])
    bn = BatchNorm2d(1, relu=True, affine=False)
    x = torch.tensor([[[[-1.0, 1.0, -2.0, 2.0]]]], requires_grad=True)
    bn(x).backward(torch.ones(1, 1, 1, 4))
    assert x.grad is not None
    # the output gradient passes where the output is positive, then through the statistics
    ref = nn.BatchNorm2d(1, affine=False)
    x_ref = x.detach().clone().requires_grad_()
    torch.relu(ref(x_ref)).backward(torch.ones(1, 1, 1, 4))
    assert _close(x.grad, x_ref.grad)


def test_state_dict_and_type_are_batchnorms() -> None:
    ours, ref = _pair(5, True)
    assert isinstance(ours, nn.BatchNorm2d)
    assert list(ours.state_dict()) == list(ref[0].state_dict())
    plain = nn.BatchNorm2d(5)
    plain.load_state_dict(copy.deepcopy(ours.state_dict()))
    assert torch.equal(plain.weight, ours.weight)
    assert "relu=True" in repr(ours)


def test_one_value_per_channel_and_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        BatchNorm2d(3, relu=True)(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match="backend must be"):
        BatchNorm2d(3, backend="gpu")
    with pytest.raises(ValueError, match="relu must be True or False"):
        BatchNorm2d(3, relu=1)
    with pytest.raises(ValueError, match="expected 4D input"):
        BatchNorm2d(3)(torch.randn(2, 3, 4))
