"""Mask schedules: how masks evolve over training, as registered objects.

A schedule says where the masks start (dense, or drawn by ``init`` at the budget), when they
change, and what a change does, by calling the engine's mask-update mechanics
(:class:`MaskOps`: ``regrow`` keeps the budget, ``prune_to`` moves towards it). It owns its
options: the options of :data:`SCHEDULE_OPTIONS` it does not list mean nothing under it, and
passing one to ``sparsify`` is an error. The engine keeps the calendar's state (steps, whether
masks are frozen) and the budget exact; a schedule is stateless.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

from .._registry import Registry

# The options whose meaning depends on the schedule, grouped by the machinery that reads them.
CALENDAR_OPTIONS = frozenset({"update_every", "steps_per_epoch", "start_at", "stop_at"})
REGROWTH_OPTIONS = frozenset(
    {
        "growth",
        "redistribution",
        "prune_rate",
        "prune_rate_schedule",
        "prune_rate_min",
        "optimizer_state",
        "momentum_window",
        "neuron_ablation",
    }
)
MASK_OPTIONS = frozenset(
    {"init", "prune", "layer_density", "dense_first", "dense_last", "structure"}
)
SCHEDULE_OPTIONS = CALENDAR_OPTIONS | REGROWTH_OPTIONS | MASK_OPTIONS | {"ema_decay"}


@dataclass
class MaskUpdate:
    """What one mask update did (``engine.history`` holds them all, ``engine.last_update`` the
    latest)."""

    step: int
    kind: str  # "regrow", "prune" or "skipped"
    prune_rate: float | None
    pruned: dict[str, int] = field(default_factory=dict)
    grown: dict[str, int] = field(default_factory=dict)
    density: float = 0.0
    seconds: float = 0.0
    reason: str = ""

    @property
    def total_pruned(self) -> int:
        return sum(self.pruned.values())

    @property
    def total_grown(self) -> int:
        return sum(self.grown.values())


class ScheduleConfig(Protocol):
    """What the built-in schedules read of the configuration; the engine passes its
    :class:`~sparselearn.ScheduleConfig`, which has every option (a schedule of your own may
    read any of them)."""

    @property
    def method(self) -> str: ...

    @property
    def density(self) -> float: ...

    @property
    def total_steps(self) -> int | None: ...

    @property
    def prune_rate(self) -> float: ...

    @property
    def prune_rate_schedule(self) -> str: ...

    @property
    def start_at(self) -> float: ...

    @property
    def stop_at(self) -> float: ...

    @property
    def interval(self) -> int: ...

    def window(self) -> tuple[float, float]: ...

    def progress(self, step: int) -> float: ...

    def prune_rate_at(self, step: int) -> float: ...


class MaskOps(Protocol):
    """The mask-update mechanics a schedule calls; each returns what the update did."""

    def regrow(self, rate: float) -> MaskUpdate:
        """Prune ``rate`` of each layer's active weights, share the regrowth across layers,
        regrow: the budget stays the same."""
        ...

    def prune_to(self, fraction: float) -> MaskUpdate:
        """Prune each layer towards its budget: ``fraction`` 0 is dense, 1 the target."""
        ...


class MaskSchedule:
    """A mask schedule. Subclass it, set the class attributes, override what applies, and
    register it with :func:`register_schedule`; select it with ``schedule="name"``.

    Class attributes:
        options: the options of :data:`SCHEDULE_OPTIONS` this schedule reads. ``"prune"``
            among them means it needs a prune criterion, ``"growth"`` a growth criterion,
            ``"redistribution"`` that its regrowth is shared by a redistribution.
        starts_dense: masks start with every weight active (else drawn by ``init``).
        masks: False for a schedule that trains every weight (nothing is ever masked).
        updates: masks change during training (at steps where :meth:`due` is true, and when
            ``engine.update_masks()`` is called).
        before_first_step: :meth:`first_step` runs once, before the first optimizer step
            is applied (with that step's gradient).
    """

    name: str = ""  # set by register_schedule
    description: ClassVar[str] = ""
    options: ClassVar[frozenset[str]] = frozenset()
    starts_dense: ClassVar[bool] = False
    masks: ClassVar[bool] = True
    updates: ClassVar[bool] = False
    before_first_step: ClassVar[bool] = False

    @property
    def prunes(self) -> bool:
        return "prune" in self.options

    @property
    def grows(self) -> bool:
        return "growth" in self.options

    def check(self, config: ScheduleConfig) -> None:
        """Raise ``ValueError`` for a configuration this schedule cannot run."""

    def needs_total_steps(self, config: ScheduleConfig) -> bool:
        """Whether the calendar depends on ``config.total_steps``."""
        return False

    def unused_options(self, passed: set[str], options: Mapping[str, Any]) -> list[str]:
        """The options among ``passed`` that change nothing here (``options``: every option
        in effect, the preset's and the user's)."""
        return sorted(passed & (SCHEDULE_OPTIONS - self.options))

    def due(self, config: ScheduleConfig, step: int) -> bool:
        """Whether a mask update follows optimizer step ``step`` (1-based)."""
        return False

    def update(
        self, masks: MaskOps, config: ScheduleConfig, step: int, prune_rate: float | None = None
    ) -> MaskUpdate:
        """The update after step ``step``, scheduled or asked for by ``engine.update_masks``
        (``prune_rate``: the caller's override)."""
        raise RuntimeError(f"method {config.method!r} (schedule {self.name!r}) never updates masks")

    def first_step(self, masks: MaskOps, config: ScheduleConfig) -> MaskUpdate:
        """The update before the first optimizer step (``before_first_step`` schedules)."""
        raise NotImplementedError

    def prune_rate(self, config: ScheduleConfig, step: int) -> float | None:
        """The prune rate an update at ``step`` would use, where the schedule has one."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


MASK_SCHEDULE: Registry[MaskSchedule] = Registry("schedule")

S = TypeVar("S", bound=type[MaskSchedule])


def register_schedule(name: str) -> Callable[[S], S]:
    """Register a mask schedule class under ``name`` (an instance of it is what is stored)::

    @sl.register_schedule("twice")
    class Twice(sl.MaskSchedule):
        options = frozenset({"prune", "growth", "prune_rate", "optimizer_state"})
        updates = True

        def due(self, config, step):
            return step in (config.total_steps // 4, config.total_steps // 2)

        def update(self, masks, config, step, prune_rate=None):
            return masks.regrow(config.prune_rate if prune_rate is None else prune_rate)
    """

    def decorator(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, MaskSchedule)):
            raise TypeError(f"register_schedule decorates a MaskSchedule subclass, got {cls!r}")
        unknown = sorted(cls.options - SCHEDULE_OPTIONS)
        if unknown:
            raise ValueError(
                f"schedule {name!r} lists options {unknown} that no schedule reads; choose from "
                f"{sorted(SCHEDULE_OPTIONS)}"
            )
        schedule = cls()
        schedule.name = name
        MASK_SCHEDULE.register(name, schedule)
        return cls

    return decorator
