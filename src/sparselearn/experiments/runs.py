"""Run directories: what ``sparselearn train`` writes, and how ``report``, ``analyze`` and
``study`` find and read it. Every file is written atomically (:func:`sparselearn._io.atomic_file`).

A run directory holds ``config.yaml`` (reload it with ``--config``), ``sparsity.yaml`` (the
engine's resolved options), ``metrics.jsonl`` (one row per epoch), ``checkpoint.pt``,
``summary.json`` and ``plots/``.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .. import checkpoint
from .._io import remove_stale_temps, write_atomic

logger = logging.getLogger("sparselearn")

__all__ = [
    "RunDirectoryBusyError",
    "dump_yaml",
    "iter_runs",
    "load_yaml",
    "lock_run_dir",
    "read_metrics",
    "save_checkpoint",
    "write_atomic",
    "write_metrics",
]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """A run's checkpoint, atomically and with a checksum (:mod:`sparselearn.checkpoint`)."""
    checkpoint.save(path, state)


def dump_yaml(values: Mapping[str, Any]) -> str:
    import yaml

    return str(yaml.safe_dump(dict(values), sort_keys=False, default_flow_style=None))


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML mapping with ``-`` in its keys read as ``_``; a file that is not one is an error
    that names it."""
    import yaml

    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{path} is not valid YAML{where}: {problem}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def read_json(path: Path) -> Any:
    """A JSON file; a damaged one is an error that names it."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is damaged (not valid JSON: {err})") from None


def write_metrics(run: str | os.PathLike[str], rows: list[dict[str, Any]]) -> None:
    """``metrics.jsonl``: one JSON row per epoch, row 0 the untrained model."""
    write_atomic(Path(run) / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def read_metrics(run: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(run) / "metrics.jsonl"
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is damaged: line {i} is not valid JSON ({err})") from None
        if not isinstance(row, dict) or "epoch" not in row:
            raise ValueError(f"{path} is damaged: line {i} is not a metrics row")
        rows.append(row)
    return rows


def iter_runs(paths: list[str | os.PathLike[str]]) -> Iterator[Path]:
    """Run directories (those holding a summary.json) under ``paths``."""
    for p in map(Path, paths):
        if (p / "summary.json").exists():
            yield p
        else:
            yield from sorted(s.parent for s in p.rglob("summary.json"))


class RunDirectoryBusyError(FileExistsError):
    """Another process holds a run directory's lock."""


@contextlib.contextmanager
def lock_run_dir(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock while a run writes there: a second writer is refused, naming the
    holder. The lock is an OS lock on ``out/.lock``, released when its holder ends, however it
    ends; a lock file left by a killed process is taken over (and its temporary files cleared).
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            raise RunDirectoryBusyError(
                f"{out} is in use by another run ({holder}); wait for it to end, or choose "
                "another --out"
            ) from None
        previous = _holder(fd)
        if previous != "no record":
            logger.info("%s: took over the lock left by %s, which has ended", out, previous)
        for tmp in remove_stale_temps(out):
            logger.info("removed %s, left by an interrupted write", tmp)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        try:
            yield
        finally:
            # the file stays (removing it would let a waiting opener and a new one both lock)
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"null")
        return f"pid {record['pid']} on {record['host']}, since {record['since']}"
    except (ValueError, KeyError, TypeError):
        return "no record"
