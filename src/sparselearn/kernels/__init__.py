"""Sparse compute kernels: compiled CPU kernels and a pure-PyTorch implementation of each, as
PyTorch operators.

- ``ops.py``: the kernels as operators (``torch.ops.sparselearn.*``), each declared once, with
  its PyTorch implementation, its compiled one on the CPU and its shapes for ``torch.compile``
  and ``torch.export``;
- ``build.py``: the extension, built on first use from ``csrc/`` (C++ with OpenMP:
  ``linear.cpp``, ``conv.cpp``, ``layouts.cpp``, ``dropout.cpp``, ``pool.cpp``, ``norm.cpp``,
  each registering its operators, and ``bindings.cpp`` for the rest, sharing ``common.h``) and
  cached;
- ``torch_backend.py``: the PyTorch implementations (CUDA, other dtypes, no compiler).

:func:`kernels_for` says which implementation computes for a tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .build import BACKENDS, HOW_TO_BUILD, backend_setting, extension, unavailable_reason
from .torch_backend import TorchOps, panel_width

__all__ = [
    "BACKENDS",
    "REFERENCE",
    "TorchOps",
    "backend_setting",
    "check_threads",
    "extension",
    "kernels_for",
    "panel_width",
    "release_cached_blocks",
    "unavailable_reason",
]

REFERENCE = -1  # ``kernels``: the PyTorch implementation (ops.py)


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


def kernels_for(t: Tensor, backend: str = "auto", threads: int | None = None) -> int:
    """Which kernels compute for tensors like ``t``: the ``kernels`` argument of the operators
    (``ops.py``). ``backend``: ``auto`` (the compiled kernels on CPU float32/float64 where they
    build, else PyTorch; ``$SPARSELEARN_BACKEND`` can make it ``cpp`` or ``torch``), ``cpp``
    (an error where they are unavailable) or ``torch``. Returns :data:`REFERENCE` (-1) for the
    PyTorch implementation, else ``threads`` or 0 (all threads).

    ``threads`` caps the threads of the compiled kernels (None: all; the result is the same bit
    for bit on any number). PyTorch's own operations, and so the ``torch`` backend, run on
    PyTorch's thread pool: ``torch.set_num_threads``. Under ``torch.compile`` the choice is
    made as the model is traced (a constant of the graph).
    """
    return _constant_kernels(t.device.type, t.dtype, backend, threads)


def _kernels(device: str, dtype: torch.dtype, backend: str, threads: int | None) -> int:
    """:func:`kernels_for` of a tensor on ``device`` (its type) of ``dtype``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'cpp' or 'torch', got {backend!r}")
    check_threads(threads)
    if backend == "auto":
        backend = backend_setting()
    if backend == "torch":
        return REFERENCE
    usable = device == "cpu" and dtype in (torch.float32, torch.float64)
    if usable and extension() is not None:
        return threads or 0
    if backend == "cpp":
        if not usable:
            raise RuntimeError(
                f"the compiled kernels compute float32 and float64 on the CPU, not {dtype} on "
                f"{device}; use backend='auto' or 'torch' for these tensors"
            )
        raise RuntimeError(
            f"the compiled kernels are unavailable ({unavailable_reason()}); {HOW_TO_BUILD}"
        )
    return REFERENCE


_constant_kernels: Callable[[str, torch.dtype, str, int | None], int] = (
    torch.compiler.assume_constant_result(_kernels)  # type: ignore[no-untyped-call]
)
