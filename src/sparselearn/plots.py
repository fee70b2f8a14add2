"""Moved to :mod:`sparselearn.experiments.plots`; this import path
keeps working."""

from __future__ import annotations

from .experiments.plots import plot_run, save_figure

__all__ = [
    "plot_run",
    "save_figure",
]
