"""The built-in redistributions: one number per layer, the regrowth shared in proportion."""

from __future__ import annotations

import torch

from .registry import REDISTRIBUTION, Redistribution, register_redistribution
from .view import LayerView

REDISTRIBUTION.register(
    "none",
    Redistribution(
        "none", None, frozenset(), "Each layer regrows exactly what it lost (no redistribution)."
    ),
)


@register_redistribution("momentum", needs=("momentum",))
def momentum_redistribution(layer: LayerView) -> float:
    """Sparse momentum: mean |momentum| over the layer's active weights."""
    return float(layer.momentum[layer.mask].abs().float().mean())


@register_redistribution("magnitude")
def magnitude_redistribution(layer: LayerView) -> float:
    """Mean |w| over the layer's active weights."""
    return float(layer.weight[layer.mask].abs().float().mean())


@register_redistribution("nonzero")
def nonzero_redistribution(layer: LayerView) -> float:
    """Number of active weights before the update (the 2019 library's ``nonzero``)."""
    return float(torch.count_nonzero(layer.mask))


@register_redistribution("survivors")
def survivors_redistribution(layer: LayerView) -> float:
    """DSR: number of weights that survived this update's pruning."""
    assert layer.kept is not None
    return float(torch.count_nonzero(layer.kept))
