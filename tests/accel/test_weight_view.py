"""An accelerated layer answers what model code asks of the dense layer it replaced: ``.weight``
(shape, dtype, device, isinstance, requires_grad; values built only when something computes
with it), the attributes of nn.Conv2d, and refuses writes that would edit a copy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import sparselearn as sl
from sparselearn.accel import SparseConv1D, SparseConv2d, SparseLinear, SparseWeight
from sparselearn.accel.weight_view import SparseWeightView
from tests.helpers import masked


def sparse_twin(dense: nn.Module) -> nn.Module:
    """The accelerated layer with ``dense``'s non-zeros."""
    w = dense.weight
    assert isinstance(w, torch.Tensor)
    if isinstance(dense, nn.Conv2d):
        return SparseConv2d(dense, w != 0)
    if isinstance(dense, nn.Linear):
        return SparseLinear(dense, w != 0)
    return SparseConv1D(dense, w != 0)


LAYERS: dict[str, Callable[[], nn.Module]] = {
    "linear": lambda: nn.Linear(12, 7),
    "conv1d": lambda: Conv1D(7, 12),  # (in 12, out 7), weight stored (12, 7)
    "conv2d": lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_weight_answers_as_the_dense_weight_without_building_it(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    dense = masked(LAYERS[kind]())
    sparse = sparse_twin(dense)
    built: list[int] = []
    real = SparseWeight.dense_from

    def counted(self: SparseWeight, values: torch.Tensor) -> torch.Tensor:
        built.append(1)
        return real(self, values)

    monkeypatch.setattr(SparseWeight, "dense_from", counted)
    w = sparse.weight
    assert isinstance(w, torch.Tensor)
    assert w.shape == dense.weight.shape
    assert w.dtype == torch.float32
    assert w.device == dense.weight.device
    assert w.requires_grad
    assert (w.dim(), w.numel(), w.size(0), len(w)) == (
        dense.weight.dim(),
        dense.weight.numel(),
        dense.weight.size(0),
        len(dense.weight),
    )
    assert not built  # asking costs nothing
    assert torch.equal(w + 0, dense.weight.detach())  # computing with it: the dense weight
    assert built
    sparse.weight_sparse.values.requires_grad_(False)
    assert not sparse.weight.requires_grad


def test_weight_follows_the_dtype_and_the_values() -> None:
    torch.manual_seed(0)
    dense = masked(nn.Linear(12, 7))
    sparse = sparse_twin(dense).to(torch.bfloat16)
    assert sparse.weight.dtype == torch.bfloat16
    with torch.no_grad():
        sparse.weight_sparse.values.mul_(2)
    assert torch.equal(sparse.weight.float(), 2 * dense.weight.detach().bfloat16().float())


def test_gradients_through_weight_reach_the_values() -> None:
    torch.manual_seed(0)
    dense = masked(nn.Linear(12, 7))
    sparse = sparse_twin(dense)
    assert sparse.weight.grad is None
    x = torch.randn(4, 12)
    (x @ dense.weight.t()).pow(2).sum().backward()
    (x @ sparse.weight.t()).pow(2).sum().backward()
    grad = sparse.weight_sparse.values.grad
    assert grad is not None
    active = dense.weight != 0
    torch.testing.assert_close(grad, dense.weight.grad[active])
    # .grad reads as the dense layer's gradient at the active weights, zero elsewhere
    torch.testing.assert_close(sparse.weight.grad, dense.weight.grad * active)


def test_a_conv1d_weight_reads_in_its_in_out_shape() -> None:
    torch.manual_seed(0)
    dense = masked(Conv1D(7, 12))
    sparse = sparse_twin(dense)
    x = torch.randn(3, 12)
    dense(x).sum().backward()
    sparse(x).sum().backward()
    assert torch.equal(sparse.weight + 0, dense.weight.detach())
    torch.testing.assert_close(sparse.weight.grad, dense.weight.grad * (dense.weight != 0))


WRITES: dict[str, Callable[[nn.Module], Any]] = {
    "assignment": lambda m: setattr(m, "weight", nn.Parameter(torch.zeros(7, 12))),
    "in place": lambda m: m.weight.zero_(),
    "init": lambda m: nn.init.normal_(m.weight),
    "item assignment": lambda m: m.weight.__setitem__(0, 1.0),
    "data": lambda m: setattr(m.weight, "data", torch.zeros(7, 12)),
    "out=": lambda m: torch.add(torch.ones(7, 12), 1, out=m.weight),
    "freezing it": lambda m: m.weight.requires_grad_(False),
}


@pytest.mark.parametrize("write", list(WRITES))
def test_writes_to_weight_are_refused_and_change_nothing(write: str) -> None:
    torch.manual_seed(0)
    sparse = sparse_twin(masked(nn.Linear(12, 7)))
    before = sparse.weight_sparse.values.detach().clone()
    with (
        pytest.raises((RuntimeError, AttributeError), match=r"weight_sparse\.values"),
        torch.no_grad(),
    ):
        WRITES[write](sparse)
    assert torch.equal(sparse.weight_sparse.values, before)
    # reading it into another tensor is no write
    target = torch.zeros(7, 12)
    target.add_(sparse.weight)
    assert torch.equal(target, sparse.weight_sparse.dense())


def test_conv_answers_nn_conv2d_attributes() -> None:
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    sparse = sparse_twin(masked(conv))
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                 "groups", "padding_mode"):  # fmt: skip
        assert getattr(sparse, name) == getattr(conv, name), name


def test_to_dense_module_rebuilds_each_layer_kind() -> None:
    torch.manual_seed(0)
    for kind, make in LAYERS.items():
        dense = masked(make())
        rebuilt = sparse_twin(dense).to_dense_module()
        assert type(rebuilt) is type(dense), kind
        assert rebuilt.state_dict().keys() == dense.state_dict().keys(), kind
        for key, value in dense.state_dict().items():
            assert torch.equal(rebuilt.state_dict()[key], value), (kind, key)


def encoder() -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


def test_transformer_encoder_fast_path_is_left_for_the_sparse_layers() -> None:
    # in eval mode without gradients nn.TransformerEncoderLayer hands linear1.weight and
    # linear2.weight to a fused kernel; accelerated, it must compute the same numbers
    model = encoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sl.sparsify(model, opt, "static", 0.2)
    x = torch.randn(3, 5, 32)
    model.eval()
    with torch.no_grad():
        want = model(x)
    report = sl.accelerate(model, engine, mode="sparse")
    assert "layers.0.linear1.weight" in report.accelerated
    calls: list[int] = []
    model.layers[0].linear1.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        got = model(x)
    assert calls  # the sparse layer computed (the fused path would not call it)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_view_below_autograd_is_refused_with_the_reason() -> None:
    sparse = sparse_twin(masked(nn.Linear(12, 7)))
    w = sparse.weight
    assert isinstance(w, SparseWeightView)
    with (
        torch._C.DisableTorchFunctionSubclass(),
        pytest.raises(RuntimeError, match="below autograd"),
    ):
        torch.add(w, 1)
