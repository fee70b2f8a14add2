"""Moved to :mod:`sparselearn.experiments.demo`; this import path
keeps working."""

from __future__ import annotations

from .experiments.demo import demo

__all__ = [
    "demo",
]
