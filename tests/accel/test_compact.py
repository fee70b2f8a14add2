"""`sl.compact`: empty channels and neurons removed, outputs unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparselearn as sl
from sparselearn.accel import BatchNorm2d, MaxPool2d, SparseLinear


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(20, 30)
        self.fc2 = nn.Linear(30, 16)
        self.fc3 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


class ConvNet(nn.Module):
    """conv -> BN -> ReLU -> pool -> conv (padded) -> BN -> ReLU -> flatten -> linear; with
    ``own``: sparselearn's BatchNorm2d (with its ReLU) and MaxPool2d, as its models have."""

    def __init__(self, own: bool = False) -> None:
        super().__init__()
        self.own = own
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn1 = BatchNorm2d(12, relu=True) if own else nn.BatchNorm2d(12)
        self.pool = MaxPool2d(2)
        self.conv2 = nn.Conv2d(12, 10, 3, padding=1)
        self.bn2 = BatchNorm2d(10, relu=True) if own else nn.BatchNorm2d(10)
        self.fc = nn.Linear(10 * 4 * 4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.own:
            x = self.bn2(self.conv2(self.pool(self.bn1(self.conv1(x)))))
        else:
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


@pytest.mark.parametrize("own", [False, True])
def test_convolutions_with_batch_norm_and_flatten(own: bool) -> None:
    torch.manual_seed(2)
    model = ConvNet(own)
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


@pytest.mark.parametrize(("name", "layer"), [("vgg-d", "features.7"), ("resnet18", "stem.0")])
def test_the_projects_cnns_trace_and_compact(name: str, layer: str) -> None:
    # their BatchNorm (with its ReLU), max pooling and dropout are sparselearn's modules, which
    # compact traces as single operations, as torch.fx traces torch.nn's
    from sparselearn.models import create_model

    torch.manual_seed(0)
    model = create_model(name, (3, 32, 32), 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sl.sparsify(model, optimizer, method="static", density=0.05)
    with torch.no_grad():  # as if the engine had pruned two whole output channels
        engine.masks[f"{layer}.weight"][[3, 5]] = False
        conv = model.get_submodule(layer)
        conv.weight[[3, 5]] = 0
        if conv.bias is not None:  # a constant that BatchNorm and ReLU make 0: removable
            conv.bias[[3, 5]] = -1.0
    x = torch.randn(2, 3, 32, 32)
    result = sl.compact(model, engine, example_input=x)
    changed = {c.name: (c.channels_before, c.channels_after) for c in result.layers}
    before = model.get_submodule(layer).out_channels
    # the stem feeds a residual addition: it stays whole; VGG-D's layer loses both channels
    assert changed == ({} if name == "resnet18" else {layer: (before, before - 2)})
    assert torch.allclose(result.model(x), model.eval()(x), atol=1e-4)
