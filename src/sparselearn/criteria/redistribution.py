"""The built-in redistributions: one number per layer, the regrowth shared in proportion."""

from __future__ import annotations

from .registry import REDISTRIBUTION, Redistribution, register_redistribution
from .view import LayerView, Reduction

REDISTRIBUTION.register(
    "none",
    Redistribution(
        "none", None, frozenset(), "Each layer regrows exactly what it lost (no redistribution)."
    ),
)


@register_redistribution("momentum", needs=("momentum",), elementwise=True)
def momentum_redistribution(layer: LayerView) -> Reduction:
    """Sparse momentum: mean |momentum| over the layer's active weights."""
    return layer.mean(layer.momentum[layer.mask].abs())  # indexed first: |.| of the few


@register_redistribution("magnitude", elementwise=True)
def magnitude_redistribution(layer: LayerView) -> Reduction:
    """Mean |w| over the layer's active weights."""
    return layer.mean(layer.weight[layer.mask].abs())


@register_redistribution("nonzero", elementwise=True)
def nonzero_redistribution(layer: LayerView) -> Reduction:
    """Number of active weights before the update (the 2019 library's ``nonzero``)."""
    return layer.total(layer.mask)


@register_redistribution("survivors", elementwise=True)
def survivors_redistribution(layer: LayerView) -> Reduction:
    """DSR: number of weights that survived this update's pruning."""
    assert layer.kept is not None
    return layer.total(layer.kept)
