"""Checkpoint files that say when they are damaged.

A checkpoint is a ``torch.save`` file of plain tensors and Python values, written atomically
(:mod:`sparselearn._io`), read with ``weights_only=True`` (no code runs on load), and carrying a
sha256 digest of its content: the bytes of every tensor and every value, in a canonical order.
PyTorch's own format does not check what it reads, so a flipped byte in a tensor would load as a
wrong number; here it is reported, with the file's name. Files without a digest (written before
it existed) load unchecked.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._io import atomic_file

DIGEST_KEY = "sparselearn_digest"


class DamagedFileError(ValueError):
    """A file that cannot be what it claims to be: truncated, overwritten, or foreign."""


def digest(obj: Any) -> str:
    """sha256 over ``obj``'s structure and content (dicts in key order, tensors by bytes)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # its bytes, not a copy
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            h.update(repr(key).encode() + b":")
            _feed(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for item in obj:
            _feed(h, item)
        h.update(b"]")
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def save(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Write ``state`` (a mapping of plain values and tensors) with its digest, atomically."""
    if DIGEST_KEY in state:
        raise ValueError(f"{DIGEST_KEY!r} is the checkpoint's own key; rename that entry")
    content = dict(state)
    content[DIGEST_KEY] = digest(state)
    with atomic_file(path) as f:
        torch.save(content, f)


def load(path: str | os.PathLike[str], map_location: Any = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save`, checking its digest; a damaged, truncated or
    foreign file raises :class:`DamagedFileError` naming it."""
    path = Path(path)
    try:
        content = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        text = str(err).strip()
        first = text.splitlines()[0][:200] if text else type(err).__name__
        raise DamagedFileError(
            f"{path} is damaged or truncated, and cannot be read ({first})"
        ) from None
    if not isinstance(content, dict):
        raise DamagedFileError(
            f"{path} is not a sparselearn checkpoint (it holds a {type(content)})"
        )
    recorded = content.pop(DIGEST_KEY, None)
    if recorded is not None and recorded != digest(content):
        raise DamagedFileError(
            f"{path} is damaged: its content does not match the checksum it was written with"
        )
    return content
