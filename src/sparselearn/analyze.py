"""Moved to :mod:`sparselearn.experiments.analyze`; this import path
keeps working."""

from __future__ import annotations

from .experiments.analyze import (
    END,
    START,
    LayerSpecialisation,
    analyze,
    selectivity,
    specialisation,
)

__all__ = [
    "END",
    "START",
    "LayerSpecialisation",
    "analyze",
    "selectivity",
    "specialisation",
]
