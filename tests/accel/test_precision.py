"""Accelerated layers under CPU autocast (bfloat16, float16) and with bfloat16 weights: they
compute in float32 and return the dtype the dense layer would, with its numbers to the
precision of that dtype; sl.accelerate times bfloat16 layers like any other."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import sparselearn as sl
from sparselearn.accel import SparseConv1D, SparseConv2d, SparseLinear
from sparselearn.kernels import extension
from tests.helpers import masked

BACKENDS = ["torch"] + (["cpp"] if extension() is not None else [])
HALF = [torch.bfloat16, torch.float16]


# (dense layer, its input): a Linear on a 3-D input, GPT-2's Conv1D, convolutions on planes
# (stride 1 and 2, over phase planes) and on a small output (the unfolded product)
LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "linear": (lambda: nn.Linear(40, 24), (3, 5, 40)),
    "conv1d": (lambda: Conv1D(24, 40), (3, 5, 40)),
    "conv": (lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 10, 10)),
    "conv-stride-2": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), (2, 6, 10, 10)),
    "conv-unfold": (lambda: nn.Conv2d(6, 8, 3), (2, 6, 4, 4)),
}


def pair(kind: str, backend: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    dense = masked(make())
    w = dense.weight
    assert isinstance(w, torch.Tensor)
    sparse: nn.Module
    if isinstance(dense, nn.Conv2d):
        sparse = SparseConv2d(dense, w != 0, backend)
    elif isinstance(dense, nn.Linear):
        sparse = SparseLinear(dense, w != 0, backend)
    else:
        sparse = SparseConv1D(dense, w != 0, backend)
    return dense, sparse, torch.randn(shape)


def loose(dtype: torch.dtype) -> dict[str, float]:
    """Tolerances of one rounding to ``dtype`` (the dense layer's half-precision product
    against the float32 one returned in ``dtype``)."""
    return {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 2e-3, "atol": 2e-3}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", list(LAYERS))
def test_autocast_gives_the_dense_layers_dtype_and_numbers(
    kind: str, dtype: torch.dtype, backend: str
) -> None:
    dense, sparse, x = pair(kind, backend)
    with torch.autocast("cpu", dtype=dtype):
        want = dense(x)
        got = sparse(x)
    assert got.dtype == want.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), **loose(dtype))
    # float32 values in float32: their gradient is the float32 layer's, to half precision
    got.float().pow(2).sum().backward()
    want.float().pow(2).sum().backward()
    values = sparse.weight_sparse.values
    assert values.grad is not None
    assert values.grad.dtype == torch.float32
    w = dense.weight
    assert isinstance(w, torch.Tensor)
    assert w.grad is not None
    mask = (w != 0).t() if kind == "conv1d" else w != 0
    grad = w.grad.t() if kind == "conv1d" else w.grad
    scale = float(grad.abs().max())
    torch.testing.assert_close(values.grad, grad[mask], rtol=5e-2, atol=5e-2 * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(LAYERS))
def test_bfloat16_weights_compute_like_the_bfloat16_dense_layer(kind: str, backend: str) -> None:
    dense, sparse, x = pair(kind, backend)
    dense, sparse, x = dense.bfloat16(), sparse.bfloat16(), x.bfloat16()
    got, want = sparse(x), dense(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), **loose(torch.bfloat16))
    got.float().sum().backward()
    values = sparse.weight_sparse.values
    assert values.dtype == torch.bfloat16
    assert values.grad is not None
    assert values.grad.dtype == torch.bfloat16


def test_a_backward_called_under_autocast_computes_as_the_forward() -> None:
    grads = []
    for inside in (False, True):
        _, sparse, x = pair("linear", "torch")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = sparse(x).float().pow(2).sum()
            if inside:
                y.backward()
        if not inside:
            y.backward()
        grads.append(sparse.weight_sparse.values.grad)
    assert torch.equal(grads[0], grads[1])


def test_an_input_of_another_dtype_than_the_weights_is_refused_by_name() -> None:
    _, sparse, x = pair("linear", "torch")
    sparse = sparse.bfloat16()
    with pytest.raises(RuntimeError, match=r"SparseLinear: the input is torch.float32 but the "):
        sparse(x)


def bfloat16_mlp() -> tuple[nn.Module, sl.SparseEngine]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).bfloat16()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, sl.sparsify(model, opt, "static", 0.2)


def test_accelerate_times_bfloat16_layers() -> None:
    model, engine = bfloat16_mlp()
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    report = sl.accelerate(model, engine, example_input=x, repeats=2)
    for choice in report.layers:
        assert choice.dense_ms is not None, choice
        assert choice.sparse_ms is not None, choice

    model, engine = bfloat16_mlp()
    want = model(x)
    forced = sl.accelerate(model, engine, mode="sparse")
    assert forced.accelerated == list(engine.masks)
    got = model(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), **loose(torch.bfloat16))
    if extension() is not None:  # the float32 kernels compute the bfloat16 layers
        assert {c.backend for c in forced.layers} == {"cpp"}
