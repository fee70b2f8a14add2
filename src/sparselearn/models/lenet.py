"""LeNet-300-100 and LeNet-5 (Caffe variant), as in the sparse momentum and SNIP code."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..accel.pooling import max_pool2d
from ._registry import InputShape, register_model
from ._shapes import output_features


class LeNet300100(nn.Module):
    """Fully connected: input -> 300 -> 100 -> classes, ReLU; ``width`` multiplies both hidden
    layers (2: input -> 600 -> 200 -> classes)."""

    def __init__(self, input_shape: InputShape, num_classes: int, width: int = 1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(math.prod(input_shape), 300 * width)
        self.fc2 = nn.Linear(300 * width, 100 * width)
        self.fc3 = nn.Linear(100 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x.flatten(1)))  # (B, 300 * width)
        x = F.relu(self.fc2(x))  # (B, 100 * width)
        return self.fc3(x)  # (B, classes) logits


class LeNet5Caffe(nn.Module):
    """Caffe's LeNet-5: conv 20@5x5 (no padding), pool, conv 50@5x5, pool, fc 500, fc classes."""

    def __init__(self, input_shape: InputShape, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        features = nn.Sequential(self.conv1, nn.MaxPool2d(2), self.conv2, nn.MaxPool2d(2))
        self.fc3 = nn.Linear(output_features(features, input_shape), 500)  # 50*4*4 for 28x28
        self.fc4 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 20, 12, 12) for 28x28
        x = max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 50, 4, 4)
        x = F.relu(self.fc3(x.flatten(1)))  # (B, 500)
        return self.fc4(x)


@register_model("lenet300-100")
def lenet300_100(input_shape: InputShape, num_classes: int) -> nn.Module:
    return LeNet300100(input_shape, num_classes)


def _wide_lenet(width: int) -> None:
    # the same network made wider, for comparisons at equal non-zero weights
    @register_model(f"lenet300-100-x{width}")
    def build(input_shape: InputShape, num_classes: int) -> nn.Module:
        return LeNet300100(input_shape, num_classes, width)


for _width in (2, 4):
    _wide_lenet(_width)


@register_model("lenet5")
def lenet5(input_shape: InputShape, num_classes: int) -> nn.Module:
    return LeNet5Caffe(input_shape, num_classes)
