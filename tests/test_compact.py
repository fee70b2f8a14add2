"""`sl.compact`: empty channels and neurons removed, outputs unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparselearn as sl
from sparselearn.accel import SparseLinear


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(20, 30)
        self.fc2 = nn.Linear(30, 16)
        self.fc3 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


class ConvNet(nn.Module):
    """conv -> BN -> ReLU -> pool -> conv (padded) -> BN -> ReLU -> flatten -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 10, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(10)
        self.fc = nn.Linear(10 * 4 * 4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.flatten(1))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.a(x)) + x)


def randomise_norms(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_neurons_and_unread_inputs_are_removed(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = MLP().to(dtype)
    with torch.no_grad():
        model.fc1.weight[[3, 7, 11]] = 0  # three fc1 neurons without weights: constant relu(bias)
        model.fc2.weight[:, [0, 1]] = 0  # two fc1 neurons that fc2 never reads
        model.fc2.weight[5] = 0  # one fc2 neuron without weights
    x = torch.randn(9, 20, dtype=dtype)
    result = sl.compact(model, example_input=x)
    changed = {c.name: (c.channels_before, c.channels_after) for c in result.layers}
    assert changed == {"fc1": (30, 25), "fc2": (16, 15)}
    assert result.removed == 6
    assert torch.allclose(result.model(x), model.eval()(x), atol=1e-5)
    assert model.fc1.out_features == 30  # the original is untouched


def test_engine_masks_decide_what_is_active() -> None:
    torch.manual_seed(1)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sl.sparsify(model, opt, method="static", density=0.5, init="uniform")
    with torch.no_grad():
        engine.masks["fc2.weight"][4] = False  # as if the engine had pruned a whole neuron
        model.fc2.weight[4] = 0
    x = torch.randn(5, 20)
    masks = engine.masks
    empty_rows = ~masks["fc2.weight"].any(1)
    unread = ~masks["fc3.weight"].any(0)
    assert empty_rows[4]
    result = sl.compact(model, engine, x)
    after = {c.name: c.channels_after for c in result.layers}
    assert after["fc2"] == 16 - int((empty_rows | unread).sum())
    assert torch.allclose(result.model(x), model.eval()(x), atol=1e-5)


def test_convolutions_with_batch_norm_and_flatten() -> None:
    torch.manual_seed(2)
    model = ConvNet()
    randomise_norms(model)
    with torch.no_grad():
        model.conv1.weight[[0, 4]] = 0  # empty: constant relu(bn(bias)) everywhere
        model.conv1.bias[0] = -10.0  # ... which is 0 for channel 0 if bn keeps it negative
        model.bn1.running_mean[0], model.bn1.running_var[0] = 0.0, 1.0
        model.bn1.weight[0], model.bn1.bias[0] = 1.0, 0.0
        model.bn1.running_mean[4], model.bn1.running_var[4] = 0.0, 1.0
        model.bn1.weight[4], model.bn1.bias[4] = 1.0, 5.0  # channel 4: a positive constant
        model.conv2.weight[:, 7] = 0  # conv1 channel 7 is never read
        model.conv2.weight[3] = 0  # conv2 channel 3: constant, folded into the linear bias
    x = torch.randn(4, 3, 8, 8)
    result = sl.compact(model, example_input=x)
    changed = {c.name: (c.channels_before, c.channels_after) for c in result.layers}
    # channel 4's constant is not zero and conv2 pads with zeros: it must stay
    assert changed == {"conv1": (12, 10), "conv2": (10, 9)}
    assert torch.allclose(result.model(x), model.eval()(x), atol=1e-4)


def test_residual_connections_keep_the_layer_whole() -> None:
    model = Residual()
    with torch.no_grad():
        model.a.weight[2] = 0
    x = torch.randn(3, 8)
    result = sl.compact(model, example_input=x)
    assert result.layers == []
    assert torch.allclose(result.model(x), model.eval()(x))


def test_accelerated_layers_are_compacted_too() -> None:
    torch.manual_seed(3)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sl.sparsify(model, opt, method="static", density=0.3, init="uniform")
    with torch.no_grad():
        engine.masks["fc1.weight"][:4] = False
        model.fc1.weight[:4] = 0
    x = torch.randn(6, 20)
    expected = model.eval()(x)
    sl.accelerate(model, engine, mode="sparse")
    assert isinstance(model.fc1, SparseLinear)
    result = sl.compact(model, engine, x)
    assert result.removed >= 4
    assert torch.allclose(result.model(x), expected, atol=1e-5)


def test_compact_needs_an_example_input() -> None:
    with pytest.raises(ValueError, match="example_input"):
        sl.compact(MLP())
