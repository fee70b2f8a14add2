"""Sparse compute kernels: a compiled CPU extension and a pure-PyTorch fallback.

- ``ops.py``: the Linear kernels as PyTorch operators (``torch.ops.sparselearn.*``), each
  declared once, with its PyTorch implementation, its compiled one on the CPU and its shapes
  for ``torch.compile`` and ``torch.export``;
- ``protocol.py``: the other operations on a CSR weight (convolutions, layouts, dropout,
  pooling), behind one protocol (:class:`Ops`), and the panel layout of activations;
- ``build.py``: the extension, built on first use from ``csrc/`` (C++ with OpenMP: ``linear.cpp``,
  ``conv.cpp``, ``layouts.cpp``, ``dropout.cpp``, ``pool.cpp``, ``norm.cpp``, ``bindings.cpp``,
  sharing ``common.h``) and cached;
- ``torch_backend.py``: the operations with PyTorch ops (CUDA, other dtypes, no compiler);
- ``cpp_backend.py``: the compiled functions, with an optional cap on their threads.

:func:`ops_for` picks the backend for a tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .build import BACKENDS, HOW_TO_BUILD, backend_setting, extension, unavailable_reason
from .cpp_backend import CppOps
from .protocol import Ops, panel_width
from .torch_backend import TorchOps

__all__ = [
    "BACKENDS",
    "CppOps",
    "Ops",
    "TorchOps",
    "backend_setting",
    "check_threads",
    "extension",
    "ops_for",
    "panel_width",
    "release_cached_blocks",
    "unavailable_reason",
]

_TORCH = TorchOps()
_CPP: dict[int | None, CppOps] = {}  # one per thread cap (the layers ask on every call)


def check_threads(threads: int | None) -> int | None:
    """``threads`` if it is None or a positive int, else a ValueError that says so."""
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(
            f"threads must be None (all of torch.get_num_threads()) or a positive int, "
            f"got {threads!r}"
        )
    return threads


def release_cached_blocks() -> int:
    """Frees the memory that the compiled kernels keep for their next large outputs; returns
    its size in bytes (0 where the kernels are not loaded).

    Outputs of 2 MiB and more (padded inputs, convolution outputs, input gradients) live in
    blocks that are kept, up to 1 GiB in all, when PyTorch frees them, and given to the next
    output of the same size: a training step makes the same outputs every step, and reused
    memory spares the page faults and page zeroing of fresh memory (docs/performance.md). Call
    this after training to give that memory back to the system.
    """
    from . import build

    ext = build._extension
    return int(ext.release_cached_blocks()) if ext is not None else 0


def ops_for(t: Tensor, backend: str = "auto", threads: int | None = None) -> Ops:
    """The kernels to use for tensors like ``t``: ``auto`` (compiled on CPU float32/float64 when
    it builds, else PyTorch; ``$SPARSELEARN_BACKEND`` can make it ``cpp`` or ``torch``), ``cpp``
    (error if unavailable) or ``torch``.

    ``threads`` caps the threads of the compiled kernels (None: all; the result is the same bit
    for bit on any number). PyTorch's own operations, and so the ``torch`` backend, run on
    PyTorch's thread pool: ``torch.set_num_threads``.
    """
    return _ops(t.device.type, t.dtype, backend, threads)


def _ops(device: str, dtype: torch.dtype, backend: str, threads: int | None) -> Ops:
    """:func:`ops_for` of a tensor on ``device`` (its type) of ``dtype``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'cpp' or 'torch', got {backend!r}")
    check_threads(threads)
    if backend == "auto":
        backend = backend_setting()
    if backend == "torch":
        return _TORCH
    usable = device == "cpu" and dtype in (torch.float32, torch.float64)
    ext = extension() if usable else None
    if ext is not None:
        ops = _CPP.get(threads)
        if ops is None or ops.extension_module is not ext:
            ops = _CPP[threads] = CppOps(ext, threads)
        return ops
    if backend == "cpp":
        if not usable:
            raise RuntimeError(
                f"the compiled kernels compute float32 and float64 on the CPU, not {dtype} on "
                f"{device}; use backend='auto' or 'torch' for these tensors"
            )
        raise RuntimeError(
            f"the compiled kernels are unavailable ({unavailable_reason()}); {HOW_TO_BUILD}"
        )
    return _TORCH
