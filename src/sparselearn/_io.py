"""Files written so that a reader, or a crash, never sees half of one: the one writer that every
file sparselearn writes goes through (run directories, checkpoints, plots, datasets, downloads).

A file is written to a temporary file beside it (``.<name>.<random>.tmp``), flushed to disk,
renamed over the target, and the directory is flushed too, so that the rename itself survives
a crash. The file gets the permissions the process's umask allows, like any other file it
creates. A writer killed mid-write leaves its temporary file behind: :func:`remove_stale_temps`
clears them (a run does so when it takes its directory's lock).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    try:  # Linux: read it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a platform without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike[str], *, verify: Callable[[Path], None] | None = None
) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content into.

    It is a temporary file beside ``path``; when the block ends without an error, the file is
    flushed to disk, checked by ``verify`` (given the temporary path; it raises to refuse the
    content) and renamed over ``path``. On an error the temporary file is removed and ``path``
    keeps its previous content; an ``OSError`` (a full disk, a read-only folder) says which
    file could not be written.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=TEMP_SUFFIX
        )
    except OSError as err:
        raise _explained(err, target) from err
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600, as if the file were made directly
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
        os.replace(tmp, target)
        _fsync_directory(target.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _explained(err, target) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _explained(err: OSError, target: Path) -> OSError:
    if err.errno is None:
        return err
    what = err.strerror or str(err)
    keep = " (its previous content is unchanged)" if target.exists() else ""
    return OSError(err.errno, f"could not write {target}: {what}{keep}")


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Replace ``path``'s content with ``data`` (text is written as UTF-8), atomically."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that killed writers left in ``folder`` (not recursive);
    returns them. Call it only while no other process writes there."""
    removed = []
    for p in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
