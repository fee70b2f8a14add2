"""AlexNet-s and AlexNet-b for small images: the SNIP / sparse momentum variant with
BatchNorm and strided convolutions instead of pooling."""

from __future__ import annotations

import torch
from torch import nn

from ..accel.norm import BatchNorm2d
from ._registry import InputShape, register_model
from ._shapes import output_features


def _conv(c_in: int, c_out: int, k: int, stride: int, pad: int) -> list[nn.Module]:
    # BatchNorm with its ReLU in one pass; the Identity keeps the indices of Conv, BN, ReLU
    return [nn.Conv2d(c_in, c_out, k, stride, pad), BatchNorm2d(c_out, relu=True), nn.Identity()]


class AlexNet(nn.Module):
    """``width`` is 1024 (AlexNet-s) or 2048 (AlexNet-b) hidden units in the classifier."""

    def __init__(self, input_shape: InputShape, num_classes: int, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv(input_shape[0], 96, 11, 2, 2),
            *_conv(96, 256, 5, 2, 2),
            *_conv(256, 384, 3, 2, 1),
            *_conv(384, 384, 3, 2, 1),
            *_conv(384, 256, 3, 2, 1),
        )
        n = output_features(self.features, input_shape)  # 256 for 32x32 inputs
        self.classifier = nn.Sequential(
            nn.Linear(n, width),
            nn.BatchNorm1d(width),
            nn.ReLU(inplace=True),
            nn.Linear(width, width),
            nn.BatchNorm1d(width),
            nn.ReLU(inplace=True),
            nn.Linear(width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


@register_model("alexnet-s")
def alexnet_s(input_shape: InputShape, num_classes: int) -> nn.Module:
    return AlexNet(input_shape, num_classes, 1024)


@register_model("alexnet-b")
def alexnet_b(input_shape: InputShape, num_classes: int) -> nn.Module:
    return AlexNet(input_shape, num_classes, 2048)
