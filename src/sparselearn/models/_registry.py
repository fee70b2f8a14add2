"""``register_model`` / ``create_model`` / ``list_models``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from torch import nn

from .._registry import Registry

InputShape = tuple[int, int, int]
ModelFn = Callable[[InputShape, int], nn.Module]
"""``fn(input_shape=(C, H, W), num_classes) -> nn.Module``."""

MODELS: Registry[ModelFn] = Registry("model")


def register_model(name: str) -> Callable[[ModelFn], ModelFn]:
    """Register ``fn(input_shape, num_classes) -> nn.Module`` under ``name``."""
    return MODELS.decorator(name)


def create_model(
    name: str, input_shape: InputShape = (3, 32, 32), num_classes: int = 10
) -> nn.Module:
    """Build a registered model for inputs of ``input_shape`` (C, H, W) and ``num_classes``."""
    if len(input_shape) != 3 or any(not isinstance(d, int) or d < 1 for d in input_shape):
        raise ValueError(f"input_shape must be (channels, height, width), got {input_shape!r}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return MODELS.get(name)(tuple(input_shape), num_classes)  # type: ignore[arg-type]


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``."""
    return [n for n in MODELS.names() if fnmatch.fnmatch(n, pattern)]
