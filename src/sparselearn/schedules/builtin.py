"""The built-in mask schedules: dense, fixed, one_shot, periodic, gradual."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..criteria import PRUNE
from .base import (
    CALENDAR_OPTIONS,
    MASK_OPTIONS,
    SCHEDULE_OPTIONS,
    MaskOps,
    MaskSchedule,
    MaskUpdate,
    ScheduleConfig,
    register_schedule,
)
from .prune_rate import gradual_fraction


@register_schedule("dense")
class Dense(MaskSchedule):
    """Every weight active, nothing ever pruned (the reference)."""

    starts_dense = True
    masks = False

    def check(self, config: ScheduleConfig) -> None:
        if config.density != 1.0:
            raise ValueError(f"method {config.method!r} trains every weight; density must be 1.0")


@register_schedule("fixed")
class Fixed(MaskSchedule):
    """Masks drawn from ``init`` at the start and never changed (static sparse)."""

    options = frozenset({"init", "layer_density", "dense_first", "dense_last", "structure"})


@register_schedule("one_shot")
class OneShot(MaskSchedule):
    """Dense until the first optimizer step; before that step is applied, the ``prune``
    criterion cuts the model to the budget using its gradient (SNIP); fixed afterwards."""

    options = MASK_OPTIONS
    starts_dense = True
    before_first_step = True

    def unused_options(self, passed: set[str], options: Mapping[str, Any]) -> list[str]:
        unused = super().unused_options(passed, options)
        prune = options.get("prune")
        if "init" in passed and prune and PRUNE.get(prune).scope == "global":
            unused.append("init")  # a global cut ignores the initial split across layers
        return unused

    def first_step(self, masks: MaskOps, config: ScheduleConfig) -> MaskUpdate:
        return masks.prune_to(1.0)


@register_schedule("periodic")
class Periodic(MaskSchedule):
    """Constant budget; every ``update_every`` steps between ``start_at`` and ``stop_at``,
    prune, redistribute and regrow (sparse momentum, SET, DSR, RigL)."""

    options = SCHEDULE_OPTIONS
    updates = True

    def needs_total_steps(self, config: ScheduleConfig) -> bool:
        return not (
            config.prune_rate_schedule == "constant"
            and config.start_at == 0.0
            and config.stop_at == 1.0
        )

    def due(self, config: ScheduleConfig, step: int) -> bool:
        every = config.interval
        if every == 0:
            return False
        start, stop = config.window()
        return step % every == 0 and start <= step < stop

    def update(
        self, masks: MaskOps, config: ScheduleConfig, step: int, prune_rate: float | None = None
    ) -> MaskUpdate:
        rate = config.prune_rate_at(step) if prune_rate is None else prune_rate
        if not 0 <= rate < 1:
            raise ValueError(f"prune_rate must be in [0, 1), got {rate}")
        return masks.regrow(rate)

    def prune_rate(self, config: ScheduleConfig, step: int) -> float | None:
        return config.prune_rate_at(step)


@register_schedule("gradual")
class Gradual(MaskSchedule):
    """Dense start; every ``update_every`` steps prune towards the target along a cubic
    schedule that reaches it at ``stop_at`` (Zhu & Gupta 2017); no regrowth."""

    options = CALENDAR_OPTIONS | MASK_OPTIONS | {"ema_decay"}
    starts_dense = True
    updates = True

    def needs_total_steps(self, config: ScheduleConfig) -> bool:
        return True

    def due(self, config: ScheduleConfig, step: int) -> bool:
        every = config.interval
        if every == 0:
            return False
        start, stop = config.window()
        # every interval inside the window, and once more at its end to land exactly
        return step >= start and (step % every == 0 or step >= stop)

    def update(
        self, masks: MaskOps, config: ScheduleConfig, step: int, prune_rate: float | None = None
    ) -> MaskUpdate:
        if prune_rate is not None:
            raise ValueError("gradual pruning follows its cubic schedule; prune_rate is unused")
        return masks.prune_to(gradual_fraction(config.progress(step)))
