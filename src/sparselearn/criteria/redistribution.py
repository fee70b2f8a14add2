"""The built-in redistributions: one number per layer, the regrowth shared in proportion."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .registry import REDISTRIBUTION, Redistribution, register_redistribution
from .view import LayerView

REDISTRIBUTION.register(
    "none",
    Redistribution(
        "none", None, frozenset(), "Each layer regrows exactly what it lost (no redistribution)."
    ),
)


def _ratio(totals: Sequence[float]) -> float:
    return totals[0] / totals[1]


def _total(totals: Sequence[float]) -> float:
    return totals[0]


def _active_sum(t: Tensor, mask: Tensor) -> list[float]:
    return [float(t[mask].abs().double().sum()), float(torch.count_nonzero(mask))]


@register_redistribution(
    "momentum",
    needs=("momentum",),
    sums=lambda layer: _active_sum(layer.momentum, layer.mask),
    combine=_ratio,
)
def momentum_redistribution(layer: LayerView) -> float:
    """Sparse momentum: mean |momentum| over the layer's active weights."""
    return float(layer.momentum[layer.mask].abs().float().mean())


@register_redistribution(
    "magnitude", sums=lambda layer: _active_sum(layer.weight, layer.mask), combine=_ratio
)
def magnitude_redistribution(layer: LayerView) -> float:
    """Mean |w| over the layer's active weights."""
    return float(layer.weight[layer.mask].abs().float().mean())


@register_redistribution(
    "nonzero", sums=lambda layer: [float(torch.count_nonzero(layer.mask))], combine=_total
)
def nonzero_redistribution(layer: LayerView) -> float:
    """Number of active weights before the update (the 2019 library's ``nonzero``)."""
    return float(torch.count_nonzero(layer.mask))


@register_redistribution(
    "survivors",
    sums=lambda layer: [float(torch.count_nonzero(_kept(layer)))],
    combine=_total,
)
def survivors_redistribution(layer: LayerView) -> float:
    """DSR: number of weights that survived this update's pruning."""
    return float(torch.count_nonzero(_kept(layer)))


def _kept(layer: LayerView) -> Tensor:
    assert layer.kept is not None
    return layer.kept
