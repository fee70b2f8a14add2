"""Run directories: what ``sparselearn train`` writes, and how ``report``, ``analyze`` and
``study`` find and read it. Every file is written atomically (:func:`sparselearn._io.atomic_file`).

A run directory holds ``config.yaml`` (reload it with ``--config``), ``sparsity.yaml`` (the
engine's resolved options), ``metrics.jsonl`` (one row per epoch), ``checkpoint.pt``,
``summary.json`` and ``plots/``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_file, write_atomic

__all__ = [
    "dump_yaml",
    "iter_runs",
    "load_yaml",
    "read_metrics",
    "save_checkpoint",
    "write_atomic",
    "write_metrics",
]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_file(path) as f:
        torch.save(state, f)


def dump_yaml(values: Mapping[str, Any]) -> str:
    import yaml

    return str(yaml.safe_dump(dict(values), sort_keys=False, default_flow_style=None))


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    import yaml

    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def write_metrics(run: str | os.PathLike[str], rows: list[dict[str, Any]]) -> None:
    """``metrics.jsonl``: one JSON row per epoch, row 0 the untrained model."""
    write_atomic(Path(run) / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def read_metrics(run: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(run) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def iter_runs(paths: list[str | os.PathLike[str]]) -> Iterator[Path]:
    """Run directories (those holding a summary.json) under ``paths``."""
    for p in map(Path, paths):
        if (p / "summary.json").exists():
            yield p
        else:
            yield from sorted(s.parent for s in p.rglob("summary.json"))
