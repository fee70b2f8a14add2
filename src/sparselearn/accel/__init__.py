"""Real speed from sparsity: layers that compute with sparse weights (imported on first use)."""

from __future__ import annotations

from .accelerate import AccelerationReport, LayerChoice, accelerate
from .layers import SparseConv2d, SparseLinear, SparseWeight

__all__ = [
    "AccelerationReport",
    "LayerChoice",
    "SparseConv2d",
    "SparseLinear",
    "SparseWeight",
    "accelerate",
]
