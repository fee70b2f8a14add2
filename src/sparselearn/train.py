"""Moved to :mod:`sparselearn.experiments.train` (and its neighbours ``config``, ``optim``,
``progress``, ``runs``); this import path keeps working."""

from __future__ import annotations

from .experiments.config import SPARSITY_OPTIONS, TrainConfig, engine_options
from .experiments.optim import lr_at, make_optimizer
from .experiments.progress import Progress
from .experiments.runs import (
    dump_yaml,
    iter_runs,
    load_yaml,
    read_metrics,
    save_checkpoint,
    write_atomic,
)
from .experiments.train import CHECKPOINT_FORMAT, evaluate, resolve_device, summarize, train

__all__ = [
    "CHECKPOINT_FORMAT",
    "SPARSITY_OPTIONS",
    "Progress",
    "TrainConfig",
    "dump_yaml",
    "engine_options",
    "evaluate",
    "iter_runs",
    "load_yaml",
    "lr_at",
    "make_optimizer",
    "read_metrics",
    "resolve_device",
    "save_checkpoint",
    "summarize",
    "train",
    "write_atomic",
]
