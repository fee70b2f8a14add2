"""A one-line progress bar for ``sparselearn train``."""

from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, total_steps: int, enabled: bool | None = None) -> None:
        self.total = total_steps
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._last = 0.0

    def update(
        self, epoch: int, epochs: int, step: int, loss: float, acc: float, density: float
    ) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self._last < 0.2 and step < self.total):
            return
        self._last = now
        frac = step / self.total
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        sys.stderr.write(
            f"\r[{bar}] epoch {epoch}/{epochs} step {step}/{self.total} "
            f"loss {loss:.4f} acc {100 * acc:.2f}% density {density:.4f}"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
