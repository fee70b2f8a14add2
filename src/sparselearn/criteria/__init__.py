"""Prune, growth and redistribution criteria: small pure functions of a :class:`LayerView`.

A prune or growth criterion returns a *score* tensor of the weight's shape. The engine alone turns
scores into masks: pruning removes the active positions with the lowest scores, growth activates
the inactive positions with the highest scores, ties are broken with the engine's seeded generator,
and the budget is kept exact. A redistribution criterion returns one non-negative number per layer;
the engine shares the regrowth across layers in proportion to it.

Register your own with one decorator::

    import sparselearn as sl

    @sl.register_growth("gradient_x_weight", needs=("grad",))
    def gradient_x_weight(layer: sl.LayerView) -> torch.Tensor:
        return (layer.grad * layer.weight).abs()

    sl.sparsify(model, optimizer, method="rigl", density=0.1, total_steps=n,
                growth="gradient_x_weight")
"""

from __future__ import annotations

from . import growth, prune, redistribution
from .growth import global_momentum, gradient, momentum, momentum_neuron, random
from .prune import global_magnitude, magnitude, saliency, set_rule
from .redistribution import (
    magnitude_redistribution,
    momentum_redistribution,
    nonzero_redistribution,
    survivors_redistribution,
)
from .registry import (
    GROWTH,
    PRUNE,
    REDISTRIBUTION,
    Criterion,
    Redistribution,
    Scope,
    ScoreFn,
    StatFn,
    register_growth,
    register_prune,
    register_redistribution,
)
from .view import SIGNALS, LayerView, Reduction

__all__ = [
    "GROWTH",
    "PRUNE",
    "REDISTRIBUTION",
    "SIGNALS",
    "Criterion",
    "LayerView",
    "Redistribution",
    "Reduction",
    "Scope",
    "ScoreFn",
    "StatFn",
    "global_magnitude",
    "global_momentum",
    "gradient",
    "growth",
    "magnitude",
    "magnitude_redistribution",
    "momentum",
    "momentum_neuron",
    "momentum_redistribution",
    "nonzero_redistribution",
    "prune",
    "random",
    "redistribution",
    "register_growth",
    "register_prune",
    "register_redistribution",
    "saliency",
    "set_rule",
    "survivors_redistribution",
]
