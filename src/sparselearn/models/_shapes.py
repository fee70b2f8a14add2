"""Shape inference for adapting architectures to an input size."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def output_features(features: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Number of features ``features`` produces for one input of ``input_shape`` (C, H, W)."""
    was_training = features.training
    features.eval()
    try:
        out = features(torch.zeros(1, *input_shape))
    except (RuntimeError, ValueError) as err:  # a pooling or convolution ran out of pixels
        raise ValueError(
            f"inputs of shape {tuple(input_shape)} are too small for this model ({err})"
        ) from None
    finally:
        features.train(was_training)
    if out.numel() == 0:
        raise ValueError(f"inputs of shape {tuple(input_shape)} are too small for this model")
    return math.prod(out.shape[1:])
