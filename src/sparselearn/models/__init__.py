"""Model registry: the architectures of the sparse momentum paper and its peers.

``create_model(name, input_shape=(C, H, W), num_classes=K)`` adapts each model to the dataset
(``tiny-gpt``: ``input_shape=(block_size,)``, ``num_classes`` the vocabulary size).
"""

from __future__ import annotations

from . import alexnet as _alexnet  # noqa: F401
from . import gpt as _gpt  # noqa: F401
from . import lenet as _lenet  # noqa: F401  (registers)
from . import resnet as _resnet  # noqa: F401
from . import vgg as _vgg  # noqa: F401
from . import wide_resnet as _wide_resnet  # noqa: F401
from ._registry import (
    MODELS,
    ModelFn,
    create_model,
    list_models,
    model_inputs,
    register_model,
)

__all__ = ["MODELS", "ModelFn", "create_model", "list_models", "model_inputs", "register_model"]
