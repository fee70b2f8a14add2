"""Schedules: how masks evolve over training (mask schedules, registered objects) and how much
an update prunes (prune-rate schedules, registered functions).

``base.py`` defines :class:`MaskSchedule` and its registry, ``builtin.py`` the five built-in
schedules (``dense``, ``fixed``, ``one_shot``, ``periodic``, ``gradual``), ``prune_rate.py`` the
prune-rate schedules (``cosine``, ``linear``, ``constant``) and the cubic ``gradual_fraction``.
"""

from __future__ import annotations

from . import builtin
from .base import (
    MASK_SCHEDULE,
    SCHEDULE_OPTIONS,
    MaskOps,
    MaskSchedule,
    MaskUpdate,
    ScheduleConfig,
    register_schedule,
)
from .builtin import Dense, Fixed, Gradual, OneShot, Periodic
from .prune_rate import (
    PRUNE_RATE_SCHEDULE,
    RateFn,
    constant,
    cosine,
    gradual_fraction,
    linear,
    register_prune_rate_schedule,
)

__all__ = [
    "MASK_SCHEDULE",
    "PRUNE_RATE_SCHEDULE",
    "SCHEDULE_OPTIONS",
    "Dense",
    "Fixed",
    "Gradual",
    "MaskOps",
    "MaskSchedule",
    "MaskUpdate",
    "OneShot",
    "Periodic",
    "RateFn",
    "ScheduleConfig",
    "builtin",
    "constant",
    "cosine",
    "gradual_fraction",
    "linear",
    "register_prune_rate_schedule",
    "register_schedule",
]
