"""CIFAR-10 in its standard "python version" layout (``cifar-10-batches-py``)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]

# the only globals a CIFAR batch pickle needs: numpy's array reconstruction
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2: str -> bytes, harmless
}


class _SafeUnpickler(pickle.Unpickler):
    """The batches are pickles; load them without ever calling arbitrary constructors."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a CIFAR batch must not reference {module}.{name}")


def read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one batch file."""
    with path.open("rb") as f:
        batch = _SafeUnpickler(f, encoding="bytes").load()
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path} is not a CIFAR-10 batch (no data/labels)")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: expected rows of 3072 pixels, got shape {data.shape}")
    labels = torch.as_tensor(np.asarray(batch[b"labels"], dtype=np.int64))
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    return torch.from_numpy(data.copy()).view(-1, 3, 32, 32), labels


def read_split(folder: Path, files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [read_batch(folder / name) for name in files]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
