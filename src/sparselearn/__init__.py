"""sparselearn: train neural networks that stay sparse from the first step to the last.

Quick start::

    import sparselearn as sl
    engine = sl.sparsify(model, optimizer, method="sparse_momentum", density=0.05,
                         total_steps=epochs * len(train_loader))
    # ... your own training loop, calling optimizer.step() as usual

Code written for the 2019 sparse momentum library: ``from sparselearn.compat import Masking,
CosineDecay``.
"""

from __future__ import annotations

from typing import Any

from ._registry import Registry
from .accel import AccelerationReport, CompactResult, accelerate, compact
from .budget import INIT, register_init
from .config import SparsityConfig
from .criteria import (
    GROWTH,
    PRUNE,
    REDISTRIBUTION,
    LayerView,
    register_growth,
    register_prune,
    register_redistribution,
)
from .engine import MaskUpdate, SparseEngine, SparsityWarning, sparsify
from .export import export, load_exported, sparse_state_dict
from .flops import TrainingFlopReport, flops
from .methods import METHODS, Method, methods, register_method
from .saving import load, save
from .schedules import (
    MASK_SCHEDULE,
    PRUNE_RATE_SCHEDULE,
    MaskSchedule,
    register_prune_rate_schedule,
    register_schedule,
)

__version__ = "0.1.0"


_REGISTRIES: dict[str, Registry[Any]] = {
    "method": METHODS,
    "prune": PRUNE,
    "growth": GROWTH,
    "redistribution": REDISTRIBUTION,
    "init": INIT,
    "schedule": MASK_SCHEDULE,
    "prune_rate_schedule": PRUNE_RATE_SCHEDULE,
}


def choices(kind: str) -> list[str]:
    """Registered names of one kind: ``method``, ``prune``, ``growth``, ``redistribution``,
    ``init``, ``schedule`` or ``prune_rate_schedule``."""
    from ._registry import unknown_name_message

    if kind not in _REGISTRIES:
        raise ValueError(unknown_name_message("registry kind", kind, sorted(_REGISTRIES)))
    return _REGISTRIES[kind].names()


__all__ = [
    "GROWTH",
    "INIT",
    "MASK_SCHEDULE",
    "METHODS",
    "PRUNE",
    "PRUNE_RATE_SCHEDULE",
    "REDISTRIBUTION",
    "AccelerationReport",
    "CompactResult",
    "LayerView",
    "MaskSchedule",
    "MaskUpdate",
    "Method",
    "Registry",
    "SparseEngine",
    "SparsityConfig",
    "SparsityWarning",
    "TrainingFlopReport",
    "__version__",
    "accelerate",
    "choices",
    "compact",
    "export",
    "flops",
    "load",
    "load_exported",
    "methods",
    "register_growth",
    "register_init",
    "register_method",
    "register_prune",
    "register_prune_rate_schedule",
    "register_redistribution",
    "register_schedule",
    "save",
    "sparse_state_dict",
    "sparsify",
]
