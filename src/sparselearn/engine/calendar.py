"""The calendar of a sparse run: which optimizer steps end in a mask update, and which need
the dense gradient (update steps of criteria that read it, and the momentum window before
each update)."""

from __future__ import annotations

from ..config import SparsityConfig
from ..schedules import MaskSchedule


class Calendar:
    """When masks change, from the schedule and the configuration.

    Its state is two flags, saved with the engine: ``finished`` (masks are frozen for good:
    schedules that never update, or a pruning schedule that reached its target) and
    ``pending_first_step`` (the schedule's first-step update has not run yet).
    """

    def __init__(
        self, config: SparsityConfig, schedule: MaskSchedule, needs: frozenset[str]
    ) -> None:
        self.config, self.schedule, self.needs = config, schedule, needs
        self.finished = not schedule.updates
        self.pending_first_step = schedule.before_first_step

    def update_due(self, step: int) -> bool:
        """Whether a scheduled mask update follows optimizer step ``step`` (1-based)."""
        if self.finished:
            return False
        return self.schedule.due(self.config, step)

    def in_window(self, step: int) -> bool:
        """Whether optimizer step ``step`` is one of the last ``momentum_window`` before an
        update (whose dense gradients feed the momentum of the missing weights)."""
        w = self.config.momentum_window
        if w is None:
            return False
        every = self.config.interval
        nxt = -(-step // every) * every  # the next scheduled update at or after `step`
        return nxt - step < w and self.update_due(nxt)

    def wants_dense_grad(self, upcoming: int) -> bool:
        """Whether optimizer step ``upcoming`` must see the dense gradient."""
        if self.in_window(upcoming):
            return True
        if "grad" not in self.needs:
            return False
        return self.pending_first_step or self.update_due(upcoming)

    def dense_gradient_share(self) -> float:
        """Fraction of training steps on which the dense weight gradient is needed: every step
        for growth by momentum without a momentum window, update and window steps for the
        others, none where masks never change."""
        cfg = self.config
        if "momentum" in self.needs and cfg.momentum_window is None:
            return 1.0
        if cfg.interval == 0 or not self.schedule.updates:
            return 0.0
        steps = (
            cfg.total_steps if cfg.total_steps and cfg.total_steps <= 1_000_000 else cfg.interval
        )
        wanted = sum(
            1
            for s in range(1, steps + 1)
            if self.in_window(s) or ("grad" in self.needs and self.update_due(s))
        )
        return float(wanted / steps)
