"""ResNet-18 and ResNet-50 (He et al. 2016; ResNet-50's bottleneck is v1.5: the stride sits in
the 3x3 convolution).

For inputs of 64 pixels or less, the stem is a 3x3 stride-1 convolution without max-pooling
(the usual CIFAR adaptation); ImageNet-sized inputs get the standard 7x7 stride-2 stem.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..accel.activation import add_relu_
from ..accel.norm import BatchNorm2d
from ._registry import InputShape, register_model

# one operation for torch.fx (sl.compact traces the models): its inside checks the shapes
torch.fx.wrap("add_relu_")


def _projection(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    """The shortcut's 1x1 convolution and batch norm, where the block changes shape."""
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
        self.bn1 = BatchNorm2d(width, relu=True)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = BatchNorm2d(width)
        nn.init.zeros_(self.bn2.weight)  # each block starts as the identity
        self.downsample = _projection(c_in, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # BatchNorm with its ReLU in one module, the rest in place (BatchNorm's backward reads
        # its input, not its output; an addition's, neither): no fresh activation-sized tensor
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        return add_relu_(out, x if self.downsample is None else self.downsample(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = BatchNorm2d(width, relu=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = BatchNorm2d(width, relu=True)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = BatchNorm2d(c_out)
        nn.init.zeros_(self.bn3.weight)  # each block starts as the identity
        self.downsample = _projection(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(x))  # BatchNorm with its ReLU, as in BasicBlock
        out = self.bn2(self.conv2(out))
        out = self.bn3(self.conv3(out))
        return add_relu_(out, x if self.downsample is None else self.downsample(x))


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks: tuple[int, int, int, int],
        input_shape: InputShape,
        num_classes: int,
    ) -> None:
        super().__init__()
        small = max(input_shape[1:]) <= 64
        if small:
            self.stem = nn.Sequential(
                nn.Conv2d(input_shape[0], 64, 3, 1, 1, bias=False),
                BatchNorm2d(64, relu=True),
                nn.Identity(),  # (the ReLU's place: the stem's names stay conv, norm, ReLU)
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(input_shape[0], 64, 7, 2, 3, bias=False),
                BatchNorm2d(64, relu=True),
                nn.Identity(),
                nn.MaxPool2d(3, 2, 1),
            )
        layers: list[nn.Module] = []
        c_in = 64
        for width, n, stride in zip((64, 128, 256, 512), blocks, (1, 2, 2, 2), strict=True):
            for i in range(n):
                layers.append(block(c_in, width, stride if i == 0 else 1))
                c_in = width * block.expansion
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register_model("resnet18")
def resnet18(input_shape: InputShape, num_classes: int) -> nn.Module:
    return ResNet(BasicBlock, (2, 2, 2, 2), input_shape, num_classes)


@register_model("resnet50")
def resnet50(input_shape: InputShape, num_classes: int) -> nn.Module:
    return ResNet(Bottleneck, (3, 4, 6, 3), input_shape, num_classes)
