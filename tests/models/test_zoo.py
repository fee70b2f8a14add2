"""Every registered model builds for its datasets, trains a sparse step, and is what it says."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparselearn as sl
from sparselearn.models import create_model, list_models, register_model

PAPER_MODELS = [
    "lenet300-100",
    "lenet5",
    "alexnet-s",
    "alexnet-b",
    "vgg-c",
    "vgg-d",
    "wrn-16-8",
    "wrn-16-10",
    "wrn-22-2",
    "wrn-22-8",
    "wrn-28-2",
    "resnet50",
]


def test_the_papers_models_are_registered() -> None:
    assert set(PAPER_MODELS) <= set(list_models())
    assert list_models("wrn-*") == [
        "wrn-16-10",
        "wrn-16-2",
        "wrn-16-8",
        "wrn-22-2",
        "wrn-22-8",
        "wrn-28-2",
    ]


@pytest.mark.parametrize("name", list_models(inputs="image"))
def test_builds_and_trains_a_sparse_step(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, (3, 32, 32), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    engine = sl.sparsify(model, opt, method="static", density=0.1)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    out = model(x)
    assert out.shape == (2, 10)
    nn.functional.cross_entropy(out, y).backward()
    opt.step()
    params = dict(model.named_parameters())
    for n, m in engine.masks.items():
        assert torch.count_nonzero(params[n].detach()[~m]) == 0


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_architectures() -> None:
    # LeNet-300-100: 784*300+300 + 300*100+100 + 100*10+10
    assert count(create_model("lenet300-100", (1, 28, 28), 10)) == 266_610
    # LeNet-5 (Caffe): conv 20@5x5, conv 50@5x5, fc 800->500, fc 500->10
    assert count(create_model("lenet5", (1, 28, 28), 10)) == 520 + 25_050 + 400_500 + 5_010
    # WRN-28-2 has about 1.5M parameters, WRN-16-8 about 11M, VGG-D about 15M (CIFAR-10)
    assert 1.4e6 < count(create_model("wrn-28-2", (3, 32, 32), 10)) < 1.5e6
    assert 10.9e6 < count(create_model("wrn-16-8", (3, 32, 32), 10)) < 11.0e6
    assert 15.2e6 < count(create_model("vgg-d", (3, 32, 32), 10)) < 15.3e6
    # ResNet-18 for CIFAR-10 (3x3 stem, 1x1 projection shortcuts): 11,173,962
    assert count(create_model("resnet18", (3, 32, 32), 10)) == 11_173_962
    # LeNet-300-100 made wider: 784*600+600 + 600*200+200 + 200*10+10, and 1200-400
    assert count(create_model("lenet300-100-x2", (1, 28, 28), 10)) == 593_210
    assert count(create_model("lenet300-100-x4", (1, 28, 28), 10)) == 1_426_410

    # WRN-16-k on one channel: a 3x3 stem to 16 channels, three stages of two pre-activation
    # blocks (two BatchNorms and 3x3 convolutions, a 1x1 shortcut where the width changes),
    # a last BatchNorm and the classifier
    def wrn_block(c_in: int, c_out: int) -> int:
        shortcut = c_in * c_out if c_in != c_out else 0
        return 2 * c_in + 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out + shortcut

    for k in (2, 8):
        stages = [(16, 16 * k), (16 * k, 32 * k), (32 * k, 64 * k)]
        blocks = sum(wrn_block(c_in, c_out) + wrn_block(c_out, c_out) for c_in, c_out in stages)
        expected = 9 * 16 + blocks + 2 * 64 * k + 64 * k * 10 + 10
        assert count(create_model(f"wrn-16-{k}", (1, 28, 28), 10)) == expected
    # tiny-gpt of width d (97 characters, 128 positions, 4 blocks, the head tied): the
    # embeddings, per block two norms and the q/k/v, output and MLP Linear layers, a last norm
    for name, d in (("tiny-gpt", 128), ("tiny-gpt-256", 256), ("tiny-gpt-512", 512)):
        linear = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
        block = 2 * 2 * d + linear
        assert count(create_model(name, (128,), 97)) == 97 * d + 128 * d + 4 * block + 2 * d
        heads = {m.heads for m in create_model(name, (128,), 97).modules() if hasattr(m, "heads")}
        assert heads == {d // 32}  # heads of the same size


def test_input_shapes_adapt() -> None:
    assert create_model("lenet5", (3, 32, 32), 100)(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert create_model("wrn-22-2", (1, 28, 28), 10)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"inputs of shape \(1, 28, 28\) are too small"):
        create_model("vgg-d", (1, 28, 28), 10)


def test_registry_errors() -> None:
    with pytest.raises(ValueError, match="unknown model 'lenet-5'; did you mean 'lenet5'"):
        create_model("lenet-5")
    with pytest.raises(ValueError, match=r"input_shape must be \(channels, height, width\)"):
        create_model("lenet5", (28, 28), 10)
    with pytest.raises(ValueError, match=r"input_shape must be \(block_size,\) for tiny-gpt"):
        create_model("tiny-gpt", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="already registered"):
        register_model("lenet5")(lambda shape, k: nn.Linear(1, 1))
