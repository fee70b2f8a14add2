"""The sparse kernels as PyTorch operators, ``torch.ops.sparselearn.<name>``, each declared once.

An operator is declared here by its Python signature (its schema) and has:

- the PyTorch implementation (:class:`.torch_backend.TorchOps`): every device and dtype, and
  the CPU where the compiled kernels are not to be had;
- on the CPU, the compiled implementation ``torch.ops.sparselearn_cpu.<name>``, which the
  extension registers as it loads (``TORCH_LIBRARY_FRAGMENT`` beside each kernel in ``csrc/``),
  for float32 and float64;
- a fake implementation, the shapes of its outputs, for ``torch.compile`` and ``torch.export``
  (PyTorch sees each operator as one step it need not look into).

The last argument of every operator, ``kernels``, says what computes it on the CPU:
:data:`REFERENCE` (-1) the PyTorch implementation, 0 the compiled one on every thread, n > 0
the compiled one on at most n threads (the results are the same bit for bit on any number).
:func:`kernels_for` gives it for a tensor, a backend and a thread cap. The instruction set the
kernels were built for (``$SPARSELEARN_MARCH``) lies beneath the operators: of all it changes,
only the compiled panel width shows, and the fake implementations ask the kernels for it.

Autograd is the layers' (``accel.layers``): they call the forward and backward operators.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import build
from .protocol import panel_width as reference_panel_width
from .torch_backend import TorchOps

REFERENCE = -1  # ``kernels``: the PyTorch implementation

_REF = TorchOps()
_COMPILED_DTYPES = (torch.float32, torch.float64)


class Operator:
    """A kernel operator: ``torch.ops.sparselearn.<name>`` (:attr:`op`, what ``torch.compile``
    and ``torch.export`` see), called as a function. Run eagerly, a call goes straight to the
    implementation ``kernels`` names: the operator's own dispatch (its autograd, device and
    aliasing checks, each in Python) costs tens of microseconds per call, as much as a small
    layer's whole product, and gives the same result."""

    def __init__(self, fn: Callable[..., Any], fake: Callable[..., Any]) -> None:
        self.name = fn.__name__
        self.reference = fn
        self.op = torch.library.custom_op(f"sparselearn::{self.name}", fn, mutates_args=())
        self.op.register_fake(fake)
        self.op.register_kernel("cpu", self._cpu)
        self.__doc__ = fn.__doc__
        self._compiled: Any = None  # the compiled implementation, once the extension is loaded

    def _cpu(self, *args: Any) -> Any:
        """The CPU implementation ``kernels`` (the last argument) names."""
        kernels = args[-1]
        if kernels == REFERENCE:
            return self.reference(*args)
        if kernels < REFERENCE:
            raise ValueError(
                f"kernels must be -1 (PyTorch), 0 (all threads) or a thread cap, got {kernels}"
            )
        compiled = self._compiled
        if compiled is None:
            if build.loaded() is None:
                raise RuntimeError(
                    "the compiled kernels are not loaded: take `kernels` from kernels_for(), "
                    "which builds them (or says -1 where they cannot be had)"
                )
            compiled = self._compiled = getattr(torch.ops.sparselearn_cpu, self.name).default
        out = compiled(*args)
        return tuple(out) if isinstance(out, list) else out

    def __call__(self, *args: Any) -> Any:
        if torch.compiler.is_compiling():
            return self.op(*args)
        if args[-1] == REFERENCE:
            return self.reference(*args)
        return self._cpu(*args)


def _operator(fake: Callable[..., Any]) -> Callable[[Callable[..., Any]], Operator]:
    """Declare ``sparselearn::<name>`` from the PyTorch implementation ``fn`` (its signature is
    the schema), with ``fake`` for the shapes and the compiled implementation on the CPU."""

    def define(fn: Callable[..., Any]) -> Operator:
        return Operator(fn, fake)

    return define


def kernels_for(t: Tensor, backend: str = "auto", threads: int | None = None) -> int:
    """The ``kernels`` argument for operators on tensors like ``t``: the compiled kernels (0, or
    ``threads``) on the CPU for float32 and float64 where they build and ``backend`` allows,
    else :data:`REFERENCE` (see :func:`~sparselearn.kernels.ops_for` for ``backend``). Under
    ``torch.compile`` it is decided as the model is traced (a constant of the graph)."""
    return _constant_kernels(t.device.type, t.dtype, backend, threads)


def _kernels(device: str, dtype: torch.dtype, backend: str, threads: int | None) -> int:
    from . import _ops

    return _ops(device, dtype, backend, threads).kernels


_constant_kernels: Callable[[str, torch.dtype, str, int | None], int] = (
    torch.compiler.assume_constant_result(_kernels)  # type: ignore[no-untyped-call]
)


def panel_width(batch: int, kernels: int) -> int:
    """The ``W`` of the panels that ``pack`` makes of a batch of ``batch`` rows."""
    ext = build.loaded()
    if kernels == REFERENCE or ext is None:
        return reference_panel_width(batch)
    return int(ext.panel_width(batch))


def _panels(x: Tensor, kernels: int) -> Tensor:
    batch, features = x.shape
    w = panel_width(batch, kernels)
    return x.new_empty((-(-batch // w), features, w))


# ---------------------------------------------------------------------------- Linear


def _pack_fake(x: Tensor, kernels: int) -> Tensor:
    return _panels(x, kernels)


@_operator(_pack_fake)
def pack(x: Tensor, kernels: int) -> Tensor:
    """Activations (batch, features) as panels (nb, features, W): batch rows ``p*W ..
    p*W+W-1`` transposed, zero-padded, so that each non-zero weight scales one contiguous,
    cache-resident row of W values."""
    return _REF.pack(x)


def _pack_sum_fake(x: Tensor, kernels: int) -> tuple[Tensor, Tensor]:
    return _panels(x, kernels), x.new_empty(x.shape[1:])


@_operator(_pack_sum_fake)
def pack_sum(x: Tensor, kernels: int) -> tuple[Tensor, Tensor]:
    """:func:`pack`, and the column sums of ``x`` (a bias gradient) from the same pass."""
    return _REF.pack_sum(x)


def _spmm_fake(
    crow: Tensor,
    col: Tensor,
    val: Tensor,
    xp: Tensor,
    rows: int,
    batch: int,
    perm: Tensor | None,
    bias: Tensor | None,
    kernels: int,
) -> Tensor:
    return xp.new_empty((batch, rows))


@_operator(_spmm_fake)
def spmm(
    crow: Tensor,
    col: Tensor,
    val: Tensor,
    xp: Tensor,
    rows: int,
    batch: int,
    perm: Tensor | None,
    bias: Tensor | None,
    kernels: int,
) -> Tensor:
    """``X @ W.T (+ bias)`` (batch, rows) from the panels of X, W's values read through
    ``perm`` when given (the transposed product reuses W's values)."""
    # row-major, as the compiled kernels write it (the fake implementation says so)
    return _REF.spmm(crow, col, val, xp, rows, batch, perm, bias).contiguous()


def _sampled_fake(crow: Tensor, col: Tensor, gp: Tensor, xp: Tensor, kernels: int) -> Tensor:
    return gp.new_empty(col.shape)


@_operator(_sampled_fake)
def sampled(crow: Tensor, col: Tensor, gp: Tensor, xp: Tensor, kernels: int) -> Tensor:
    """``G.T @ X`` at the non-zeros of W only (in W's CSR order), from the panels of both."""
    return _REF.sampled(crow, col, gp, xp)


def _linear_forward_fake(
    x: Tensor, crow: Tensor, col: Tensor, val: Tensor, rows: int, bias: Tensor | None, kernels: int
) -> tuple[Tensor, Tensor]:
    return x.new_empty((x.shape[0], rows)), _panels(x, kernels)


@_operator(_linear_forward_fake)
def linear_forward(
    x: Tensor, crow: Tensor, col: Tensor, val: Tensor, rows: int, bias: Tensor | None, kernels: int
) -> tuple[Tensor, Tensor]:
    """(``x @ W.T (+ bias)``, the panels of x): :func:`pack` and :func:`spmm` in one parallel
    region of the compiled kernels (under ``OMP_WAIT_POLICY=PASSIVE`` each region, and each
    barrier in one, wakes the sleeping threads)."""
    y, xp = _REF.linear_forward(x, crow, col, val, rows, bias)
    return y.contiguous(), xp


def _linear_backward_fake(
    crow: Tensor,
    col: Tensor,
    crow_t: Tensor,
    col_t: Tensor,
    perm: Tensor,
    perm_inv: Tensor,
    val: Tensor,
    grad_y: Tensor,
    xp: Tensor,
    want_bias: bool,
    kernels: int,
) -> tuple[Tensor, Tensor, Tensor]:
    rows = crow.shape[0] - 1
    return (
        grad_y.new_empty((grad_y.shape[0], crow_t.shape[0] - 1)),
        val.new_empty(val.shape),
        grad_y.new_empty((rows if want_bias else 0,)),
    )


@_operator(_linear_backward_fake)
def linear_backward(
    crow: Tensor,
    col: Tensor,
    crow_t: Tensor,
    col_t: Tensor,
    perm: Tensor,
    perm_inv: Tensor,
    val: Tensor,
    grad_y: Tensor,
    xp: Tensor,
    want_bias: bool,
    kernels: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Every gradient of ``y = x @ W.T + bias`` from the output gradient: (grad_x, the values'
    gradient in W's CSR order, the bias gradient, empty unless ``want_bias``). The compiled
    kernel packs ``grad_y`` and walks W^T's CSR once, reading each row of the gradient's panels
    once for both products, in one parallel region."""
    grad_x, dval, grad_bias = _REF.linear_backward(
        crow, col, crow_t, col_t, perm, perm_inv, val, grad_y, xp, want_bias
    )
    grad_bias = grad_y.new_empty((0,)) if grad_bias is None else grad_bias
    return grad_x.contiguous(), dval, grad_bias
