"""Sparse compute kernels: a compiled CPU extension and a pure-PyTorch fallback.

Both backends implement the same operations on a CSR weight (``crow``, ``col``, ``val``):

- ``spmm(crow, col, val, XT, rows) -> YT``: ``YT = W @ XT``, activations stored
  (features, batch) so that the batch is contiguous;
- ``sampled(crow, col, GT, XT) -> dval``: ``(GT @ XT.T)`` at the non-zeros of W only;
- ``conv2d_forward / conv2d_grad_input / conv2d_grad_weight``: direct sparse convolution on a
  padded NCHW input.

The extension (C++ with OpenMP, through ``torch.utils.cpp_extension``) is built on first use and
cached in ``$SPARSELEARN_CACHE`` (default ``~/.cache/sparselearn``), keyed by its source, the torch
version and the CPU; without a compiler, or on CUDA tensors, the PyTorch backend is used.
``SPARSELEARN_BACKEND=torch`` forces the fallback.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger("sparselearn")

_SOURCE = Path(__file__).parent / "csrc" / "sparse_cpu.cpp"
_lock = threading.Lock()
_extension: Any = None
_extension_error: str | None = None


class Ops(Protocol):
    name: str

    def spmm(  # noqa: N803
        self, crow: Tensor, col: Tensor, val: Tensor, XT: Tensor, rows: int, perm: Tensor | None = None
    ) -> Tensor: ...

    def sampled(self, crow: Tensor, col: Tensor, GT: Tensor, XT: Tensor) -> Tensor: ...  # noqa: N803

    def conv2d_forward(
        self, crow: Tensor, col: Tensor, val: Tensor, xp: Tensor, out_channels: int, kh: int,
        kw: int, stride: int, oh: int, ow: int,
    ) -> Tensor: ...

    def conv2d_grad_input(
        self, crowT: Tensor, colT: Tensor, valT: Tensor, g: Tensor, in_channels: int,  # noqa: N803
        hp: int, wp: int, kh: int, kw: int, stride: int,
    ) -> Tensor: ...

    def conv2d_grad_weight(
        self, crow: Tensor, col: Tensor, g: Tensor, xp: Tensor, kh: int, kw: int, stride: int
    ) -> Tensor: ...


def _cpu_key() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        flags = platform.processor()
    text = _SOURCE.read_bytes() + torch.__version__.encode() + flags.encode()
    return hashlib.sha256(text).hexdigest()[:16]


def extension() -> Any:
    """The compiled extension, built on first call; None if it cannot be built here."""
    global _extension, _extension_error
    if _extension is not None or _extension_error is not None:
        return _extension
    with _lock:
        if _extension is not None or _extension_error is not None:
            return _extension
        if os.environ.get("SPARSELEARN_BACKEND", "") == "torch":
            _extension_error = "disabled by SPARSELEARN_BACKEND=torch"
            return None
        cache = Path(os.environ.get("SPARSELEARN_CACHE", Path.home() / ".cache" / "sparselearn"))
        build = cache / f"ext-{_cpu_key()}"
        build.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.cpp_extension import load

            logger.info("building the sparse CPU kernels in %s (once)", build)
            _extension = load(
                name="sparselearn_cpu",
                sources=[str(_SOURCE)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build),
                verbose=False,
            )
        except Exception as err:  # no compiler, no headers, ...: fall back, say why
            _extension_error = f"{type(err).__name__}: {err}"
            logger.warning("sparse CPU kernels unavailable (%s); using PyTorch ops", _extension_error)
    return _extension


class TorchOps:
    """The fallback: torch's CSR matmul and sampled matmul; dense convolution routines."""

    name = "torch"

    @staticmethod
    def _csr(crow: Tensor, col: Tensor, val: Tensor, shape: tuple[int, int]) -> Tensor:
        return torch.sparse_csr_tensor(crow, col, val, shape, check_invariants=False)

    def spmm(  # noqa: N803
        self, crow: Tensor, col: Tensor, val: Tensor, XT: Tensor, rows: int, perm: Tensor | None = None
    ) -> Tensor:
        values = val if perm is None else val[perm]
        return self._csr(crow, col, values, (rows, XT.shape[0])) @ XT

    def sampled(self, crow: Tensor, col: Tensor, GT: Tensor, XT: Tensor) -> Tensor:  # noqa: N803
        pattern = self._csr(crow, col, torch.zeros_like(col, dtype=GT.dtype), (GT.shape[0], XT.shape[0]))
        return torch.sparse.sampled_addmm(pattern, GT, XT.T, beta=0.0).values()

    def _dense(self, crow: Tensor, col: Tensor, val: Tensor, shape: tuple[int, ...]) -> Tensor:
        rows = shape[0]
        return self._csr(crow, col, val, (rows, col.new_tensor(shape[1:]).prod().item())).to_dense().view(shape)

    def conv2d_forward(
        self, crow: Tensor, col: Tensor, val: Tensor, xp: Tensor, out_channels: int, kh: int,
        kw: int, stride: int, oh: int, ow: int,
    ) -> Tensor:
        w = self._dense(crow, col, val, (out_channels, xp.shape[1], kh, kw))
        return F.conv2d(xp, w, stride=stride)

    def conv2d_grad_input(
        self, crowT: Tensor, colT: Tensor, valT: Tensor, g: Tensor, in_channels: int,  # noqa: N803
        hp: int, wp: int, kh: int, kw: int, stride: int,
    ) -> Tensor:
        wt = self._dense(crowT, colT, valT, (in_channels, g.shape[1], kh, kw))
        w = wt.transpose(0, 1)  # back to (out, in, kh, kw)
        return torch.nn.grad.conv2d_input((g.shape[0], in_channels, hp, wp), w, g, stride=stride)

    def conv2d_grad_weight(
        self, crow: Tensor, col: Tensor, g: Tensor, xp: Tensor, kh: int, kw: int, stride: int
    ) -> Tensor:
        shape = (g.shape[1], xp.shape[1], kh, kw)
        dw = torch.nn.grad.conv2d_weight(xp, shape, g, stride=stride)
        rows = torch.repeat_interleave(
            torch.arange(g.shape[1], device=crow.device), crow.diff()
        )
        return dw.reshape(g.shape[1], -1)[rows, col]


class CppOps:
    """The compiled CPU kernels (float32 and float64)."""

    name = "cpp"

    def __init__(self, ext: Any) -> None:
        self._ext = ext

    def spmm(  # noqa: N803
        self, crow: Tensor, col: Tensor, val: Tensor, XT: Tensor, rows: int, perm: Tensor | None = None
    ) -> Tensor:
        return self._ext.spmm(crow, col, val, XT, rows, perm)  # type: ignore[no-any-return]

    def sampled(self, crow: Tensor, col: Tensor, GT: Tensor, XT: Tensor) -> Tensor:  # noqa: N803
        return self._ext.sampled(crow, col, GT, XT)  # type: ignore[no-any-return]

    def conv2d_forward(
        self, crow: Tensor, col: Tensor, val: Tensor, xp: Tensor, out_channels: int, kh: int,
        kw: int, stride: int, oh: int, ow: int,
    ) -> Tensor:
        return self._ext.conv2d_forward(crow, col, val, xp, out_channels, kh, kw, stride, oh, ow)  # type: ignore[no-any-return]

    def conv2d_grad_input(
        self, crowT: Tensor, colT: Tensor, valT: Tensor, g: Tensor, in_channels: int,  # noqa: N803
        hp: int, wp: int, kh: int, kw: int, stride: int,
    ) -> Tensor:
        return self._ext.conv2d_grad_input(crowT, colT, valT, g, in_channels, hp, wp, kh, kw, stride)  # type: ignore[no-any-return]

    def conv2d_grad_weight(
        self, crow: Tensor, col: Tensor, g: Tensor, xp: Tensor, kh: int, kw: int, stride: int
    ) -> Tensor:
        return self._ext.conv2d_grad_weight(crow, col, g, xp, kh, kw, stride)  # type: ignore[no-any-return]


_TORCH = TorchOps()


def ops_for(t: Tensor, backend: str = "auto") -> Ops:
    """The kernels to use for tensors like ``t``: ``auto`` (compiled on CPU float32/float64 when
    it builds, else PyTorch), ``cpp`` (error if unavailable) or ``torch``."""
    if backend not in ("auto", "cpp", "torch"):
        raise ValueError(f"backend must be 'auto', 'cpp' or 'torch', got {backend!r}")
    if backend == "torch":
        return _TORCH
    usable = t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)
    ext = extension() if usable else None
    if ext is not None:
        return CppOps(ext)
    if backend == "cpp":
        reason = _extension_error or f"{t.dtype} on {t.device} is not supported by it"
        raise RuntimeError(f"the compiled kernels are unavailable: {reason}")
    return _TORCH
