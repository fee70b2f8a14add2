"""The IDX format of MNIST and Fashion-MNIST (optionally gzipped).

Layout: two zero bytes, a type code, the number of dimensions, one big-endian uint32 per
dimension, then the values in row-major order, big-endian.
"""

from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path

import torch

from .._io import write_atomic

# IDX type code -> (torch dtype, bytes per value, numpy-style big-endian code)
_TYPES: dict[int, tuple[torch.dtype, int]] = {
    0x08: (torch.uint8, 1),
    0x09: (torch.int8, 1),
    0x0B: (torch.int16, 2),
    0x0C: (torch.int32, 4),
    0x0D: (torch.float32, 4),
    0x0E: (torch.float64, 8),
}


def _from_big_endian(raw: torch.Tensor, size: int) -> torch.Tensor:
    """Reorder the bytes of each ``size``-byte value between big-endian and this machine."""
    if size == 1 or sys.byteorder == "big":
        return raw
    return raw.view(-1, size).flip(1).reshape(-1)


def _open(path: Path) -> bytes:
    with path.open("rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        data: bytes = f.read()
    return data


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an IDX file (``.gz`` or plain) into a tensor of its shape and type."""
    p = Path(path)
    data = _open(p)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{p} is not an IDX file (bad magic number)")
    code, ndim = data[2], data[3]
    if code not in _TYPES:
        raise ValueError(f"{p}: unknown IDX type code 0x{code:02x}")
    dtype, size = _TYPES[code]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{p}: truncated IDX header")
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    count = 1
    for s in shape:
        count *= s
    if len(data) != header + count * size:
        raise ValueError(
            f"{p}: expected {count * size} bytes of data for shape {tuple(shape)}, "
            f"found {len(data) - header}"
        )
    flat = torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8)
    return _from_big_endian(flat, size).view(dtype).reshape(shape).clone()


def write_idx(
    tensor: torch.Tensor, path: str | os.PathLike[str], *, compress: bool = False
) -> None:
    """Write ``tensor`` as an IDX file (atomically: a reader never sees half a file)."""
    codes = {dtype: code for code, (dtype, _) in _TYPES.items()}
    if tensor.dtype not in codes:
        raise ValueError(f"IDX cannot store {tensor.dtype}; use one of {sorted(map(str, codes))}")
    _, size = _TYPES[codes[tensor.dtype]]
    t = tensor.detach().cpu().contiguous()
    header = bytes([0, 0, codes[t.dtype], t.dim()]) + b"".join(
        int(s).to_bytes(4, "big") for s in t.shape
    )
    raw = _from_big_endian(t.reshape(-1).view(torch.uint8), size)  # the swap is symmetric
    payload = header + raw.numpy().tobytes()
    if compress:
        payload = gzip.compress(payload, mtime=0)
    write_atomic(path, payload)
