"""What every dataset shares: its description, the loaded-data protocol, seeded splits."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

Batch = tuple[Tensor, Tensor]  # images: (B, C, H, W) float32, (B,) int64; text: (B, T) ids twice


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    input_shape: tuple[int, ...]  # (C, H, W) images; (block_size,) token sequences
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    folders: tuple[str, ...]  # sub-folder names tried under each search root
    files: tuple[str, ...]  # what must exist in a folder for it to count
    system_dirs: tuple[str, ...] = ()
    downloads: tuple[tuple[str, str], ...] = ()  # (url, md5); empty: cannot be downloaded
    how_to_get: str = ""
    augment: bool = False  # pad-crop and flip by default when training
    task: str = "classify"  # or "language": next-token prediction (num_classes: the vocabulary)


class Data(Protocol):
    """A loaded dataset: sizes and batches of its ``train``, ``val`` and ``test`` splits."""

    info: DatasetInfo

    def size(self, split: str) -> int: ...

    def batches(
        self, split: str, batch_size: int, *, shuffle: bool, seed: int, epoch: int, augment: bool
    ) -> Iterator[Batch]: ...


def seed_of(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    s = 0x5EED
    for p in parts:
        s = (s * 1_000_003 + p) % (2**63 - 1)
    return s


def hold_out(
    x: Tensor, y: Tensor, fraction: float, split_seed: int
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    n_val = round(fraction * len(y))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed_of(split_seed)))
    val, train = order[:n_val], order[n_val:]
    return (x[train], y[train]), (x[val], y[val])


def writable_home(data_dir: str | os.PathLike[str] | None) -> Path:
    """Where datasets are written (downloads, built corpora): ``data_dir``, else
    ``$SPARSELEARN_DATA``, else ``~/.cache/sparselearn``."""
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get("SPARSELEARN_DATA"):
        return Path(os.environ["SPARSELEARN_DATA"])
    return Path.home() / ".cache" / "sparselearn"
