"""VGG16-C and VGG16-D as in the SNIP / sparse momentum code: BatchNorm after every
convolution, a 512-512 classifier with BatchNorm instead of dropout.

VGG-C's 1x1 convolutions keep the original code's padding of 1, which grows the feature map by
two pixels each time (hence its 2048 classifier inputs on 32x32 images); reproduced on purpose.
"""

from __future__ import annotations

import torch
from torch import nn

from ..accel.norm import BatchNorm2d
from ..accel.pooling import MaxPool2d
from ._registry import InputShape, register_model
from ._shapes import output_features

# numbers: 3x3 conv channels; (k, c): k x k conv with c channels; "M": 2x2 max-pool
_CONFIGS: dict[str, list[int | str | tuple[int, int]]] = {
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "C": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        (1, 256),
        "M",
        512,
        512,
        (1, 512),
        "M",
        512,
        512,
        (1, 512),
        "M",
    ],
}


class VGG16(nn.Module):
    def __init__(self, input_shape: InputShape, num_classes: int, config: str) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = input_shape[0]
        for v in _CONFIGS[config]:
            if v == "M":
                layers.append(MaxPool2d(2))
                continue
            k, c_out = v if isinstance(v, tuple) else (3, int(v))
            # the ReLU runs inside the BatchNorm (one pass); the Identity keeps the layers'
            # indices, and so their names in state dicts, those of Conv, BatchNorm, ReLU
            layers += [
                nn.Conv2d(c_in, c_out, k, padding=1),
                BatchNorm2d(c_out, relu=True),
                nn.Identity(),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        n = output_features(self.features, input_shape)  # D: 512, C: 2048 for 32x32
        self.classifier = nn.Sequential(
            nn.Linear(n, 512),
            nn.ReLU(True),
            nn.BatchNorm1d(512),
            nn.Linear(512, 512),
            nn.ReLU(True),
            nn.BatchNorm1d(512),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


@register_model("vgg-c")
def vgg_c(input_shape: InputShape, num_classes: int) -> nn.Module:
    return VGG16(input_shape, num_classes, "C")


@register_model("vgg-d")
def vgg_d(input_shape: InputShape, num_classes: int) -> nn.Module:
    return VGG16(input_shape, num_classes, "D")
