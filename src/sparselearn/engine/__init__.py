"""The sparse training engine (``engine.py``) and its parts: how a layer is stored
(``storage.py``), when masks change (``calendar.py``), what updates read (``signals.py``), how
an update selects and commits (``update.py``), the saved state (``state.py``) and data-parallel
agreement (``distributed.py``)."""

from __future__ import annotations

from ..schedules import MaskUpdate
from .calendar import Calendar
from .engine import SparseEngine, SparsityWarning, sparsify
from .state import STATE_FORMAT
from .storage import CSRStorage, LayerStorage, MaskedDense
from .update import MaskUpdater

__all__ = [
    "STATE_FORMAT",
    "CSRStorage",
    "Calendar",
    "LayerStorage",
    "MaskUpdate",
    "MaskUpdater",
    "MaskedDense",
    "SparseEngine",
    "SparsityWarning",
    "sparsify",
]
