"""Wide residual networks (Zagoruyko & Komodakis 2016) as in the sparse momentum code:
pre-activation basic blocks, dropout 0.3 between the convolutions, He initialisation.

The dropout is sparselearn's hashed one (:func:`sparselearn.accel.dropout`): the same
distribution as ``F.dropout``, whose sequential random stream on the CPU costs more than the
sparse convolutions around it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..accel.dropout import dropout
from ..accel.norm import BatchNorm2d
from ._registry import InputShape, register_model


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, drop: float) -> None:
        super().__init__()
        self.bn1 = BatchNorm2d(c_in, relu=True)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = BatchNorm2d(c_out, relu=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.drop = drop
        self.shortcut = (
            nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)
            if c_in != c_out or stride != 1
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # BatchNorm with its ReLU in one module; the addition in place (a convolution's and an
        # addition's backward do not read their output): no fresh activation-sized tensor
        pre = self.bn1(x)
        out = self.bn2(self.conv1(pre))
        out = dropout(out, p=self.drop, training=self.training)
        out = self.conv2(out)
        # the shortcut of a widening block sees the pre-activated input, as in the original
        return out.add_(x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    def __init__(
        self, input_shape: InputShape, num_classes: int, depth: int, width: int, drop: float = 0.3
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(input_shape[0], channels[0], 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        for stage, stride in enumerate((1, 2, 2)):
            for i in range(n):
                c_in = channels[stage] if i == 0 else channels[stage + 1]
                blocks.append(BasicBlock(c_in, channels[stage + 1], stride if i == 0 else 1, drop))
        self.blocks = nn.Sequential(*blocks)
        self.bn = BatchNorm2d(channels[3], relu=True)
        self.fc = nn.Linear(channels[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.blocks(self.conv1(x)))  # (B, 64*width, H/4, W/4)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # the original's 8x8 pool on 32x32
        return self.fc(out)


def _wrn(depth: int, width: int) -> None:
    @register_model(f"wrn-{depth}-{width}")
    def build(input_shape: InputShape, num_classes: int) -> nn.Module:
        return WideResNet(input_shape, num_classes, depth, width)


# the sparse momentum paper's, and WRN-16-2: the small dense partner of WRN-16-8 in the
# same-cost study (docs/results.md)
for _depth, _width in [(16, 2), (16, 8), (16, 10), (22, 2), (22, 8), (28, 2)]:
    _wrn(_depth, _width)
