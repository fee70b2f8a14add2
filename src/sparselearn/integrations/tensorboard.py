"""TensorBoard event files of sparse training, for any loop.

Example::

    from sparselearn.integrations.tensorboard import TensorBoardLogger

    with TensorBoardLogger("runs/tb") as tb:
        tb.watch(engine)                       # every mask update, as it happens
        for epoch in range(epochs):
            ...
            tb.log_metrics({"train_loss": loss, "test_acc": acc}, step=epoch + 1)

Per mask update (at the engine's optimizer step): ``sparsity/density`` (the whole model),
``sparsity/pruned``, ``sparsity/regrown``, ``sparsity/ever_active`` (the fraction of the
sparsified weights that have been active at any time since :meth:`~TensorBoardLogger.watch`),
and per layer ``density/<layer>``, ``pruned/<layer>`` and ``regrown/<layer>``. Metrics go under
``metrics/<name>``. ``sparselearn train --tensorboard`` writes them into ``RUN/tensorboard``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from ..engine import MaskUpdate, SparseEngine
from ._common import update_log

__all__ = ["TensorBoardLogger"]


class TensorBoardLogger:
    """Writes event files under ``log_dir`` (created if missing)."""

    def __init__(self, log_dir: str | os.PathLike[str], **writer_options: Any) -> None:
        self.writer = SummaryWriter(log_dir=str(log_dir), **writer_options)
        self._ever: dict[str, Tensor] = {}
        self._handles: list[Any] = []

    def watch(self, engine: SparseEngine, ever_active: Mapping[str, Tensor] | None = None) -> None:
        """Log every mask update of ``engine``. ``ever_active`` continues the record of weights
        ever active (from :meth:`ever_active`, e.g. after a resume); by default it starts from
        the current masks."""
        start = ever_active if ever_active is not None else engine.masks
        for name, mask in engine.masks.items():
            seen = start.get(name)
            if seen is None or seen.shape != mask.shape:
                raise ValueError(
                    f"ever_active has no mask of shape {tuple(mask.shape)} for {name}; pass "
                    "what TensorBoardLogger.ever_active() returned for this engine"
                )
            self._ever[name] = seen.to(mask.device, torch.bool) | mask
        self._handles.append(engine.register_update_hook(self._on_update))

    def ever_active(self) -> dict[str, Tensor]:
        """Per layer, which weights have been active at any time (to continue after a resume)."""
        return {name: seen.clone() for name, seen in self._ever.items()}

    def _on_update(self, engine: SparseEngine, update: MaskUpdate) -> None:
        step = update.step
        masks = engine.masks
        for name, mask in masks.items():
            self._ever[name] |= mask.to(self._ever[name].device)
        total = sum(m.numel() for m in self._ever.values())
        ever = sum(int(m.sum()) for m in self._ever.values())
        w = self.writer
        for key, value in update_log(update).items():  # the trainers' log entries
            w.add_scalar(key, value, step)
        w.add_scalar("sparsity/ever_active", ever / total if total else 0.0, step)
        for name, density in engine.layer_densities().items():
            w.add_scalar(f"density/{name}", density, step)
        for name, count in update.pruned.items():
            w.add_scalar(f"pruned/{name}", count, step)
        for name, count in update.grown.items():
            w.add_scalar(f"regrown/{name}", count, step)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Each number in ``metrics`` as ``metrics/<name>`` at ``step`` (other values skipped:
        TensorBoard scalars are numbers)."""
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(f"metrics/{name}", value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
