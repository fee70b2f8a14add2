"""Prune-rate schedules: how much of each layer an update prunes, over training.

A prune-rate schedule maps training progress in [0, 1] to the fraction of each layer's active
weights pruned at a mask update. Progress runs over the period in which masks change
(``start_at`` to ``stop_at`` of ``total_steps``) and is evaluated at every optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .._registry import Registry

RateFn = Callable[[float, float, float], float]
"""``fn(initial_rate, min_rate, progress) -> rate``."""

PRUNE_RATE_SCHEDULE: Registry[RateFn] = Registry("prune_rate_schedule")


def register_prune_rate_schedule(name: str) -> Callable[[RateFn], RateFn]:
    """Register a schedule ``fn(initial_rate, min_rate, progress) -> rate``."""
    return PRUNE_RATE_SCHEDULE.decorator(name)


@register_prune_rate_schedule("cosine")
def cosine(initial: float, minimum: float, progress: float) -> float:
    """Cosine decay from ``initial`` to ``minimum`` (sparse momentum, RigL)."""
    return minimum + (initial - minimum) * 0.5 * (1.0 + math.cos(math.pi * progress))


@register_prune_rate_schedule("linear")
def linear(initial: float, minimum: float, progress: float) -> float:
    """Linear decay from ``initial`` to ``minimum``."""
    return initial + (minimum - initial) * progress


@register_prune_rate_schedule("constant")
def constant(initial: float, minimum: float, progress: float) -> float:
    """The same rate at every update (SET)."""
    return initial


def gradual_fraction(progress: float) -> float:
    """Zhu & Gupta (2017): fraction of the way from dense to the target, ``1 - (1 - p)^3``."""
    p = min(max(progress, 0.0), 1.0)
    return 1.0 - (1.0 - p) ** 3
