"""IDX files (MNIST / Fashion-MNIST format)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from sparselearn.data import read_idx, write_idx


@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.float32, torch.float64]
)
@pytest.mark.parametrize("compress", [False, True])
def test_round_trip(tmp_path: Path, dtype: torch.dtype, compress: bool) -> None:
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(5, 3, 4, generator=g) * 50).to(dtype)
    path = tmp_path / "x.idx"
    write_idx(t, path, compress=compress)
    out = read_idx(path)
    assert out.dtype == dtype
    assert torch.equal(out, t)


def test_reads_the_standard_header_by_hand(tmp_path: Path) -> None:
    # magic 0x00000803 (uint8, 3 dims), dims 2x2x3 big-endian, then the pixels
    raw = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3, *range(12)])
    (tmp_path / "images.gz").write_bytes(gzip.compress(raw))
    out = read_idx(tmp_path / "images.gz")
    assert out.shape == (2, 2, 3)
    assert out.flatten().tolist() == list(range(12))
    labels = bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 1, 9])
    (tmp_path / "labels").write_bytes(labels)
    assert read_idx(tmp_path / "labels").tolist() == [7, 1, 9]


def test_big_endian_values(tmp_path: Path) -> None:
    raw = (
        bytes([0, 0, 0x0C, 1, 0, 0, 0, 2])
        + (258).to_bytes(4, "big")
        + (-1).to_bytes(4, "big", signed=True)
    )
    (tmp_path / "ints").write_bytes(raw)
    assert read_idx(tmp_path / "ints").tolist() == [258, -1]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x01\x02\x08\x01", "bad magic"),
        (bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 0]), "unknown IDX type"),
        (bytes([0, 0, 8, 2, 0, 0]), "truncated"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]), "expected 5 bytes"),
    ],
)
def test_corrupt_files(tmp_path: Path, raw: bytes, message: str) -> None:
    (tmp_path / "bad").write_bytes(raw)
    with pytest.raises(ValueError, match=message):
        read_idx(tmp_path / "bad")
