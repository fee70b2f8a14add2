"""A character-level corpus built from text already on the machine: the docstrings and comments
of the running Python's standard library.

Nothing is downloaded and nothing is copied into the repository. The corpus is built once and
cached in the data directory (``--data-dir``, else ``$SPARSELEARN_DATA``, else
``~/.cache/sparselearn``) under ``stdlib-text/``: the text of each split and ``manifest.json``,
which lists the source files, the Python version and a sha256 of each split. Building it again
on the same Python gives the same bytes.

Splits are by source file, so that no file's text is in two of them: a file goes to ``test``
when a hash of its path falls in the first tenth (the same files for every run), to
``val`` with probability ``val_fraction`` (by ``split_seed``), else to ``train``.

Characters: the printable ASCII set and the newline, 96 of them, plus one symbol for every other
character: a vocabulary of 97 that does not depend on the text.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import math
import os
import platform
import sysconfig
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._io import write_atomic
from .base import Batch, DatasetInfo, seed_of, writable_home

NAME = "stdlib-text"
BLOCK_SIZE = 128  # characters of context
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
UNKNOWN = len(ALPHABET)  # every other character
VOCAB = len(ALPHABET) + 1
_SKIPPED = {"test", "tests", "idlelib", "turtledemo", "lib2to3", "site-packages", "__pycache__"}
_CODE = {ch: i for i, ch in enumerate(ALPHABET)}
BUILDER = 1  # bumped when the corpus is built differently: a cache of another version is rebuilt

INFO = DatasetInfo(
    NAME,
    (BLOCK_SIZE,),
    VOCAB,
    (0.0,),
    (1.0,),
    folders=(NAME,),
    files=("manifest.json",),
    how_to_get="nothing to get: it is built from this Python's standard library on first use",
    task="language",
)


def encode(text: str) -> Tensor:
    """Characters -> token ids (uint8)."""
    return torch.tensor([_CODE.get(ch, UNKNOWN) for ch in text], dtype=torch.uint8)


def decode(ids: Tensor) -> str:
    return "".join(ALPHABET[i] if i < UNKNOWN else "\ufffd" for i in ids.tolist())


def _sources(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*.py") if not _SKIPPED & set(p.relative_to(root).parts[:-1])
    )


def file_text(source: str) -> str:
    """A module's docstrings and comments, in the order they appear (empty if it does not
    parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    pieces: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                line = node.body[0].lineno if node.body else 0
                pieces.append((line, doc))
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comment = tok.string.lstrip("#").strip()
                if comment:
                    pieces.append((tok.start[0], comment))
    except (tokenize.TokenError, SyntaxError):
        pass
    return "\n".join(text for _, text in sorted(pieces, key=lambda p: p[0]))


def _split_of(relative: str, val_fraction: float, split_seed: int) -> str:
    h = int.from_bytes(hashlib.sha256(relative.encode()).digest()[:8], "big")
    if h % 10 == 0:
        return "test"
    v = int.from_bytes(hashlib.sha256(f"{split_seed}:{relative}".encode()).digest()[:8], "big")
    return "val" if v / 2**64 < val_fraction else "train"


def build(folder: Path, val_fraction: float, split_seed: int) -> dict[str, Any]:
    """Build the corpus into ``folder``; returns its manifest."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    files: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for path in _sources(root):
        relative = path.relative_to(root).as_posix()
        text = file_text(path.read_text(encoding="utf-8", errors="replace"))
        if not text:
            continue
        split = _split_of(relative, val_fraction, split_seed)
        texts[split].append(text + "\n\n")
        files[split].append(relative)
    manifest: dict[str, Any] = {
        "builder": BUILDER,
        "source": str(root),
        "python": platform.python_version(),
        "val_fraction": val_fraction,
        "split_seed": split_seed,
        "files": files,
        "sha256": {},
        "characters": {},
    }
    for split, parts in texts.items():
        data = "".join(parts).encode()
        write_atomic(folder / f"{split}.txt", data)
        manifest["sha256"][split] = hashlib.sha256(data).hexdigest()
        manifest["characters"][split] = len(data)
    write_atomic(folder / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return manifest


def corpus_folder(data_dir: str | os.PathLike[str] | None) -> Path:
    return writable_home(data_dir) / NAME


def load_text(
    data_dir: str | os.PathLike[str] | None, val_fraction: float, split_seed: int
) -> TextData:
    """The corpus, built where it is not cached yet (or was built with another split)."""
    folder = corpus_folder(data_dir)
    manifest: dict[str, Any] | None = None
    if (folder / "manifest.json").exists():
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except json.JSONDecodeError:
            manifest = None  # damaged: rebuilt below
    if (
        manifest is None
        or manifest.get("builder") != BUILDER
        or manifest.get("val_fraction") != val_fraction
        or manifest.get("split_seed") != split_seed
        or manifest.get("python") != platform.python_version()
    ):
        manifest = build(folder, val_fraction, split_seed)
    splits = {}
    for split in ("train", "val", "test"):
        data = (folder / f"{split}.txt").read_bytes()
        if hashlib.sha256(data).hexdigest() != manifest["sha256"][split]:
            raise ValueError(
                f"{folder / f'{split}.txt'} does not match its manifest (damaged or edited); "
                f"delete {folder} to rebuild the corpus"
            )
        splits[split] = encode(data.decode())
    return TextData(INFO, splits, manifest)


@dataclass
class TextData:
    """Token ids per split, served as windows of ``block_size + 1`` characters: inputs are the
    first ``block_size``, targets the same shifted by one."""

    info: DatasetInfo
    splits: dict[str, Tensor]  # (characters,) uint8
    manifest: dict[str, Any]

    @property
    def block_size(self) -> int:
        return self.info.input_shape[0]

    @property
    def provenance(self) -> dict[str, Any]:
        """What the run records about its data."""
        return {
            "python": self.manifest["python"],
            "files": {k: len(v) for k, v in self.manifest["files"].items()},
            "sha256": self.manifest["sha256"],
        }

    def size(self, split: str) -> int:
        """Windows in ``split`` (the same for every epoch's offset)."""
        t = self.block_size
        return max(0, (len(self.splits[split]) - t - 1) // t)

    def batches(
        self, split: str, batch_size: int, *, shuffle: bool, seed: int, epoch: int, augment: bool
    ) -> Iterator[Batch]:
        ids, t, n = self.splits[split], self.block_size, self.size(split)
        if shuffle:  # another offset every epoch, windows in a seeded order
            gen = torch.Generator().manual_seed(seed_of(seed, epoch))
            offset = int(torch.randint(0, t, (1,), generator=gen))
            order = torch.randperm(n, generator=gen)
        else:
            offset, order = 0, torch.arange(n)
        starts = offset + order * t
        span = torch.arange(t + 1)
        for i in range(0, n, batch_size):
            windows = ids[starts[i : i + batch_size, None] + span].long()  # (B, T + 1)
            yield windows[:, :-1], windows[:, 1:]


def bits_per_character(loss: float) -> float:
    """A per-character cross-entropy in nats, in bits."""
    return loss / math.log(2)
