"""What a report is made of: a cell of results over seeds, and the metrics it can hold."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# what each summary metric is called, how it is shown, and which way is better
METRICS = {
    "test_acc": ("Test accuracy (%)", 100.0, 2, True),
    "test_ppl": ("Test perplexity (lower is better)", 1.0, 3, False),
    "wall_time": ("Training wall time (s)", 1.0, 0, False),
}


@dataclass(frozen=True)
class Cell:
    values: tuple[float, ...]  # one per seed
    metric: str = "test_acc"

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def se(self) -> float:
        """Standard error of the mean (0 for a single seed)."""
        return statistics.stdev(self.values) / math.sqrt(self.n) if self.n > 1 else 0.0

    def text(self) -> str:
        _, scale, digits, _ = METRICS[self.metric]
        if self.n == 1:
            return f"{scale * self.mean:.{digits}f} (n=1)"
        return f"{scale * self.mean:.{digits}f} ± {scale * self.se:.{digits}f} ({self.n})"


Key = tuple[str, str]  # (data, model)


def is_dense(row: str) -> bool:
    """A report row of dense runs (their one density is 100%)."""
    return row == "dense" or row.startswith("dense (")
