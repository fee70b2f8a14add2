"""The check of an accelerated layer's choice in the run itself.

``sl.accelerate`` chooses between a layer's sparse kernels and the dense product by timing each
layer alone before training. On a busy machine that timing can be wrong, and a wrong choice
then costs every step of the run. So each layer it accelerates also times its own training
steps, during the first steps of the run: in turns, a step with each of its ways of computing
(the sparse kernels on every thread, on one thread, and the dense product of the same weights),
and keeps the fastest by the median of several rounds. A slower way is never kept once the run
is under way, and a load that comes and goes weighs on all ways alike, as they alternate.

A step's time is the layer's forward and its backward: from the moment the output's gradient
arrives to the moment the values' gradient is computed (tensor hooks; backward runs a layer's
nodes one after another). The ways of computing agree to rounding (those of the kernels bit
for bit), so the check changes the run's results by rounding at most.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle


class _HasValues(Protocol):
    @property
    def values(self) -> Tensor: ...


class Checked(Protocol):
    """What the check uses of the layer it times (a sparse layer of ``layers.py``)."""

    threads: int | None
    live: LiveCheck | None

    @property
    def weight_sparse(self) -> _HasValues: ...

    @property
    def steps(self) -> str: ...

    @steps.setter
    def steps(self, how: str) -> None: ...

    def _compute(self, x: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class Way:
    """A way for an accelerated layer to compute its training steps."""

    steps: str  # "sparse" (its kernels) or "dense" (the dense product of its weights)
    threads: int | None = None  # the sparse kernels' thread cap (None: every thread)

    def __str__(self) -> str:
        if self.steps == "dense":
            return "dense"
        return "sparse" if self.threads is None else f"sparse ({self.threads} thread)"


Verdict = Callable[[Way, dict[Way, float]], None]


class LiveCheck:
    """Times ``ways`` of one layer in turns over its first training steps and keeps the
    fastest: ``warmup`` untimed rounds, then ``rounds`` timed ones (a round is one step with
    each way). Then ``on_verdict(way, medians_ms)`` is called and the check ends (the layer
    drops it)."""

    def __init__(
        self, ways: list[Way], on_verdict: Verdict, *, rounds: int = 6, warmup: int = 2
    ) -> None:
        if len(ways) < 2:
            raise ValueError("a live check needs at least two ways to compare")
        if rounds < 1 or warmup < 0:
            raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds} and {warmup}")
        self.ways = ways
        self.rounds, self.warmup = rounds, warmup
        self.on_verdict = on_verdict
        self.times: dict[Way, list[float]] = {w: [] for w in ways}
        self._calls = 0
        # the step under way: its way, forward time, the time its backward began
        self._pending: list[Any] | None = None
        self._handles: list[RemovableHandle] = []

    def step(self, layer: Checked, x: Tensor) -> Tensor:
        """``layer``'s forward on ``x`` the way this step is to be computed, timed."""
        self._discard()  # a step whose backward never came (or a second forward) counts not
        way = self.ways[self._calls % len(self.ways)]
        timed = self._calls >= self.warmup * len(self.ways)
        self._calls += 1
        layer.steps, layer.threads = way.steps, way.threads
        values = layer.weight_sparse.values
        t0 = _now(x)
        y: Tensor = layer._compute(x)
        forward = _now(y) - t0
        if y._is_view():
            # an in-place operation on a view (a ReLU(inplace=True) after a reshaped output)
            # rebases the view's history and its hook would never fire: a copy of its own, for
            # the few steps of the check
            y = y.clone()
        if timed and y.requires_grad and values.requires_grad:
            pending = self._pending = [way, forward, None]
            self._handles = [
                y.register_hook(lambda g: self._began(pending, g)),  # type: ignore[no-untyped-call]
                values.register_hook(lambda g: self._ended(pending, g)),  # type: ignore[no-untyped-call]
            ]
        return y

    def _began(self, pending: list[Any], grad: Tensor) -> None:
        if pending is self._pending:
            pending[2] = _now(grad)

    def _ended(self, pending: list[Any], grad: Tensor) -> None:
        if pending is not self._pending or pending[2] is None:
            return
        way, forward, began = pending
        self.times[way].append(1e3 * (forward + _now(grad) - began))
        self._pending = None  # the hooks stay until the next step (not removed while running)

    def _discard(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._pending = None

    def finish(self, layer: Checked) -> None:
        """Decide once the last timed step's backward has run (the layer calls it before its
        next forward)."""
        if self._calls >= (self.warmup + self.rounds) * len(self.ways):
            self._discard()
            self._decide(layer)

    def _decide(self, layer: Checked) -> None:
        medians = {w: statistics.median(t) for w, t in self.times.items() if t}
        if len(medians) == len(self.ways):
            best = min(medians, key=medians.__getitem__)
        else:  # steps without a backward (frozen weights): the ways were not compared
            best = self.ways[0]
        layer.steps, layer.threads = best.steps, best.threads
        layer.live = None
        self.on_verdict(best, medians)


def _now(t: Tensor) -> float:
    """The time once ``t``'s device has done its queued work (CUDA runs asynchronously)."""
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)
    return time.perf_counter()


def no_live_check() -> bool:
    """Whether this call cannot time itself: no gradient is recorded, or it is being traced
    (a compiled graph runs the way the layer had chosen when it was compiled)."""
    return not torch.is_grad_enabled() or torch.compiler.is_compiling()
