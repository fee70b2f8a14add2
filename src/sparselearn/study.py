"""Moved to :mod:`sparselearn.experiments.study`; this import path
keeps working."""

from __future__ import annotations

from .experiments.study import Run, expand, run_study

__all__ = [
    "Run",
    "expand",
    "run_study",
]
