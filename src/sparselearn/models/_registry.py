"""``register_model`` / ``create_model`` / ``list_models``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from torch import nn

from .._registry import Registry

InputShape = tuple[int, ...]
ModelFn = Callable[[InputShape, int], nn.Module]
"""``fn(input_shape, num_classes) -> nn.Module``: ``(C, H, W)`` and classes for images,
``(block_size,)`` and the vocabulary size for language models."""

MODELS: Registry[ModelFn] = Registry("model")
INPUTS = {"image": 3, "sequence": 1}  # what a model reads: (C, H, W) images, token sequences
_INPUTS: dict[str, str] = {}


def register_model(name: str, *, inputs: str = "image") -> Callable[[ModelFn], ModelFn]:
    """Register ``fn(input_shape, num_classes) -> nn.Module`` under ``name``; ``inputs``:
    ``"image"`` (input_shape (C, H, W)) or ``"sequence"`` (token ids, input_shape
    (block_size,), num_classes the vocabulary size)."""
    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {', '.join(INPUTS)}, got {inputs!r}")

    def register(fn: ModelFn) -> ModelFn:
        MODELS.register(name, fn)
        _INPUTS[name] = inputs
        return fn

    return register


def model_inputs(name: str) -> str:
    """What a registered model reads: ``"image"`` or ``"sequence"``."""
    MODELS.get(name)
    return _INPUTS.get(name, "image")


def create_model(
    name: str, input_shape: InputShape = (3, 32, 32), num_classes: int = 10
) -> nn.Module:
    """Build a registered model for inputs of ``input_shape`` ((C, H, W) for images,
    (block_size,) for language models) and ``num_classes`` (the vocabulary size of a language
    model)."""
    fn = MODELS.get(name)
    kind = model_inputs(name)
    if (
        not isinstance(input_shape, (tuple, list))
        or len(input_shape) != INPUTS[kind]
        or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in input_shape)
    ):
        expected = "(channels, height, width)" if kind == "image" else "(block_size,)"
        raise ValueError(f"input_shape must be {expected} for {name}, got {input_shape!r}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return fn(tuple(input_shape), num_classes)


def list_models(pattern: str = "*", inputs: str | None = None) -> list[str]:
    """Registered model names matching a shell-style ``pattern`` (and reading ``inputs``)."""
    return [
        n
        for n in MODELS.names()
        if fnmatch.fnmatch(n, pattern) and (inputs is None or model_inputs(n) == inputs)
    ]
