"""Moved to :mod:`sparselearn.experiments.cli`; this import path
keeps working."""

from __future__ import annotations

from .experiments.cli import build_parser, default_run_dir, main, resolve_config

__all__ = [
    "build_parser",
    "default_run_dir",
    "main",
    "resolve_config",
]
