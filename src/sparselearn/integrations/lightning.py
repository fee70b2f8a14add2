"""Sparse training with Lightning: one callback.

Example::

    from sparselearn.integrations.lightning import SparseTraining

    trainer = L.Trainer(max_epochs=10, callbacks=[SparseTraining(method="rigl", density=0.1)])
    trainer.fit(module, train_loader)              # or fit(..., ckpt_path="last.ckpt")

When training starts the callback sparsifies the LightningModule with the trainer's optimizer
and ``total_steps = trainer.estimated_stepping_batches`` (optimizer steps, so gradient
accumulation is counted right). Lightning's gradient clipping, accumulation and precision
settings work unchanged: gradients are masked as they accumulate, before clipping.

The engine state (masks, step, RNG states, history) is the callback's state in Lightning's
checkpoints. On ``fit(ckpt_path=...)`` Lightning restores the weights, the callbacks and then the
optimizer before training starts; the engine adopts the checkpoint's masks without applying
freshly drawn ones first, after checking them against the restored weights.

Each mask update logs ``sparsity/density``, ``sparsity/pruned`` and ``sparsity/regrown`` with
``self.log``. ``callback.engine`` is the engine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl

from ..engine import SparseEngine, sparsify
from ._common import (
    check_arguments,
    check_weights_match,
    inner_optimizer,
    update_log,
    with_epoch,
)

__all__ = ["SparseTraining"]

_OWNER = "SparseTraining"


def _steps_per_epoch(trainer: pl.Trainer) -> int:
    """Optimizer steps per epoch: a last, shorter accumulation steps too."""
    batches = trainer.num_training_batches
    if math.isinf(batches):
        return 0  # an iterable without a length: no epochs to count
    return math.ceil(int(batches) / max(1, trainer.accumulate_grad_batches))


class SparseTraining(pl.Callback):
    """Keep the LightningModule sparse with ``method`` at ``density``.

    Args:
        method: a method from :func:`sparselearn.methods`.
        density: fraction of weights kept active.
        **options: engine options, as for :func:`sparselearn.sparsify` (``total_steps`` is the
            trainer's; ``update_every="epoch"`` counts the trainer's optimizer steps per epoch).
    """

    def __init__(
        self, method: str = "sparse_momentum", density: float | None = None, **options: Any
    ) -> None:
        check_arguments(_OWNER, method, density, options)
        self.method = method
        self.density = density
        self.options = options
        self.engine: SparseEngine | None = None
        self._restored: dict[str, Any] | None = None
        self._logged = 0

    @property
    def state_key(self) -> str:
        return f"{_OWNER}[method={self.method}, density={self.density}]"

    # training starts after Lightning restored the weights, the callbacks and the optimizer
    # (some strategies restore only after `on_fit_start`), so the engine is made here
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise RuntimeError(
                f"{_OWNER} sparsifies with one optimizer; configure_optimizers returned "
                f"{len(optimizers)}"
            )
        optimizer = inner_optimizer(optimizers[0], _OWNER)
        if self.engine is not None and self.engine.attached:
            self.engine.remove()  # a second fit(): a new run
        saved, self._restored = self._restored, None
        if saved is None and trainer.global_step > 0:
            raise RuntimeError(
                f"{_OWNER}: training resumes at step {trainer.global_step}, but the checkpoint "
                "holds no sparselearn engine state (it was written without this callback, or "
                "with another method or density); resume from a checkpoint of a run trained "
                "with the same SparseTraining callback, or train from the start"
            )
        if saved is not None:
            check_weights_match(pl_module, saved["masks"], "the checkpoint's SparseTraining state")
        self.engine = sparsify(
            pl_module,
            optimizer,
            self.method,
            self.density,
            total_steps=int(trainer.estimated_stepping_batches),
            state=saved,
            **with_epoch(self.options, _steps_per_epoch(trainer)),
        )
        self._logged = len(self.engine.history)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.engine is None:
            return
        for update in self.engine.history[self._logged :]:
            for key, value in update_log(update).items():
                pl_module.log(key, value, on_step=True, on_epoch=False)
        self._logged = len(self.engine.history)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.engine is None else {"engine": self.engine.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        engine = state_dict.get("engine")
        self._restored = dict(engine) if engine is not None else None
