"""Files written so that a reader, or a crash, never sees half of one: the one writer that every
file sparselearn writes goes through (run directories, checkpoints, plots, datasets, downloads).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike[str], *, verify: Callable[[Path], None] | None = None
) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content into.

    It is a temporary file beside ``path``; when the block ends without an error, the file is
    flushed to disk, checked by ``verify`` (given the temporary path; it raises to refuse the
    content) and renamed over ``path``. On an error the temporary file is removed and ``path``
    keeps its previous content.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Replace ``path``'s content with ``data`` (text is written as UTF-8), atomically."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)
