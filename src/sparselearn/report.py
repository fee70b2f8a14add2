"""Moved to :mod:`sparselearn.experiments.report`; this import path
keeps working."""

from __future__ import annotations

from .experiments.cells import Cell
from .experiments.report import END, START, collect, plot, replace_section, report, table

__all__ = [
    "END",
    "START",
    "Cell",
    "collect",
    "plot",
    "replace_section",
    "report",
    "table",
]
