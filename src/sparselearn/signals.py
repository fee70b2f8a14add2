"""Moved to :mod:`sparselearn.engine.signals`; this import path keeps working."""

from __future__ import annotations

from .engine.signals import keeps_momentum, optimizer_momentum, reset_state

__all__ = ["keeps_momentum", "optimizer_momentum", "reset_state"]
