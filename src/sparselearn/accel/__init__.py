"""Real speed from sparsity: layers that compute with sparse weights (imported on first use)."""

from __future__ import annotations

from .accelerate import AccelerationReport, LayerChoice, accelerate
from .compact import CompactedLayer, CompactResult, compact
from .dropout import Dropout, dropout
from .layers import SparseConv1D, SparseConv2d, SparseLinear, SparseWeight
from .norm import BatchNorm2d
from .pooling import MaxPool2d, max_pool2d

__all__ = [
    "AccelerationReport",
    "BatchNorm2d",
    "CompactResult",
    "CompactedLayer",
    "Dropout",
    "LayerChoice",
    "MaxPool2d",
    "SparseConv1D",
    "SparseConv2d",
    "SparseLinear",
    "SparseWeight",
    "accelerate",
    "compact",
    "dropout",
    "max_pool2d",
]
