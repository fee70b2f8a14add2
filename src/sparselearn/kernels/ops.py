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
:func:`~sparselearn.kernels.kernels_for` gives it for a tensor, a backend and a thread cap.
The instruction set the kernels were built for (``$SPARSELEARN_MARCH``) lies beneath the
operators: of all it changes, only the layouts' shapes show (panel widths, lanes), and the fake
implementations ask the kernels for them.

Autograd is the layers' (``accel.layers``): they call the forward and backward operators.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import REFERENCE, build
from .torch_backend import TorchOps
from .torch_backend import panel_width as reference_panel_width

_REF = TorchOps()
_CPU_KERNELS = torch.library.Library("sparselearn", "IMPL")  # type: ignore[no-untyped-call]
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
        # the CPU kernel registered with the dispatcher as it is (``register_kernel`` would wrap
        # it in checks run in Python at every call of a compiled graph)
        _CPU_KERNELS.impl(self.name, self._cpu, "CPU")  # type: ignore[no-untyped-call]
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


def _linear_rows_fake(
    x: Tensor, crow: Tensor, col: Tensor, val: Tensor, rows: int, bias: Tensor | None, kernels: int
) -> Tensor:
    return x.new_empty((x.shape[0], rows))


@_operator(_linear_rows_fake)
def linear_rows(
    x: Tensor, crow: Tensor, col: Tensor, val: Tensor, rows: int, bias: Tensor | None, kernels: int
) -> Tensor:
    """``x @ W.T (+ bias)`` for a batch of a few samples (inference), without panels: each
    output row a dot product of its non-zeros with the inputs they gather."""
    return _REF.linear_rows(x, crow, col, val, rows, bias).contiguous()


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


# ---------------------------------------------------------------------------- convolutions


def _is_double(t: Tensor) -> bool:
    return t.dtype == torch.float64


def _conv2d_forward_fake(
    crow: Tensor,
    col: Tensor,
    val: Tensor,
    x: Tensor,
    out_channels: int,
    kh: int,
    kw: int,
    stride: int,
    ph: int,
    pw: int,
    bias: Tensor | None,
    kernels: int,
) -> tuple[Tensor, Tensor]:
    b, c, h, w = x.shape
    oh, ow = (h + 2 * ph - kh) // stride + 1, (w + 2 * pw - kw) // stride + 1
    ext = build.loaded()
    if kernels != REFERENCE and ext is not None:
        saved = ext.conv2d_saved_shape(
            b, c, h, w, kh, kw, stride, ph, pw, _is_double(x), x.is_contiguous()
        )
    else:
        saved = [b, c, h + 2 * ph, w + 2 * pw] if ph or pw else [0]
    return x.new_empty((b, out_channels, oh, ow)), x.new_empty(saved)


@_operator(_conv2d_forward_fake)
def conv2d_forward(
    crow: Tensor,
    col: Tensor,
    val: Tensor,
    x: Tensor,
    out_channels: int,
    kh: int,
    kw: int,
    stride: int,
    ph: int,
    pw: int,
    bias: Tensor | None,
    kernels: int,
) -> tuple[Tensor, Tensor]:
    """(The convolution of x (N, C, H, W) padded by (ph, pw) with a CSR weight (+ bias), what
    the backward reads): in a layout of the implementation's (the compiled kernels keep a
    stride-1 batch that fills their vectors as batch panels, ``uses_panels``; else the padded
    input), empty where that is x itself (an operator's outputs never alias its inputs: the
    caller gives x to the backward instead)."""
    y, saved = _REF.conv2d_forward(crow, col, val, x, out_channels, kh, kw, stride, ph, pw, bias)
    return y, x.new_empty((0,)) if saved is x else saved


def _conv2d_forward_phases_fake(
    crow: Tensor,
    col: Tensor,
    val: Tensor,
    x: Tensor,
    out_channels: int,
    kh: int,
    kw: int,
    stride: int,
    ph: int,
    pw: int,
    hq: int,
    wq: int,
    bias: Tensor | None,
    kernels: int,
) -> tuple[Tensor, Tensor]:
    b, c = x.shape[:2]
    ext = build.loaded()
    if kernels != REFERENCE and ext is not None:
        saved = ext.conv2d_phases_saved_shape(b, c, stride, hq, wq, kh, kw, _is_double(x))
    else:
        saved = [b, stride * stride * c, hq, wq]
    y = x.new_empty((b, out_channels, hq - kh + 1, wq - kw + 1))
    return y, x.new_empty(saved)


@_operator(_conv2d_forward_phases_fake)
def conv2d_forward_phases(
    crow: Tensor,
    col: Tensor,
    val: Tensor,
    x: Tensor,
    out_channels: int,
    kh: int,
    kw: int,
    stride: int,
    ph: int,
    pw: int,
    hq: int,
    wq: int,
    bias: Tensor | None,
    kernels: int,
) -> tuple[Tensor, Tensor]:
    """:func:`conv2d_forward` of the ``stride**2`` (hq, wq) phase planes of the padded input
    at stride 1 without padding (a strided convolution as a stride-1 one, ``accel.layers``;
    the compiled kernels pack the planes into batch panels straight from x)."""
    return _REF.conv2d_forward_phases(
        crow, col, val, x, out_channels, kh, kw, stride, ph, pw, hq, wq, bias
    )


def _conv2d_backward_fake(
    crow: Tensor,
    col: Tensor,
    crow_t: Tensor,
    col_t: Tensor,
    val_t: Tensor,
    g: Tensor,
    saved: Tensor,
    in_channels: int,
    h: int,
    w: int,
    kh: int,
    kw: int,
    stride: int,
    ph: int,
    pw: int,
    want_input: bool,
    want_weight: bool,
    kernels: int,
) -> tuple[Tensor, Tensor]:
    gx = (g.shape[0], in_channels, h, w) if want_input else (0,)
    return g.new_empty(gx), g.new_empty(col.shape if want_weight else (0,))


@_operator(_conv2d_backward_fake)
def conv2d_backward(
    crow: Tensor,
    col: Tensor,
    crow_t: Tensor,
    col_t: Tensor,
    val_t: Tensor,
    g: Tensor,
    saved: Tensor,
    in_channels: int,
    h: int,
    w: int,
    kh: int,
    kw: int,
    stride: int,
    ph: int,
    pw: int,
    want_input: bool,
    want_weight: bool,
    kernels: int,
) -> tuple[Tensor, Tensor]:
    """(The gradient of the (in_channels, h, w) input inside the padding, the gradient at the
    non-zeros), each empty unless asked for, from the output gradient and what
    :func:`conv2d_forward` saved (the same implementation's; x itself where it saved nothing),
    sharing what both need."""
    gx, dval = _REF.conv2d_backward(
        crow, col, crow_t, col_t, val_t, g, saved, kh, kw, stride, ph, pw, want_input, want_weight
    )
    empty = g.new_empty((0,))
    return (empty if gx is None else gx.contiguous()), (empty.clone() if dval is None else dval)


def _phase_planes_fake(
    x: Tensor, stride: int, ph: int, pw: int, hq: int, wq: int, count: int, kernels: int
) -> Tensor:
    return x.new_empty((x.shape[0], count * x.shape[1], hq, wq))


@_operator(_phase_planes_fake)
def phase_planes(
    x: Tensor, stride: int, ph: int, pw: int, hq: int, wq: int, count: int, kernels: int
) -> Tensor:
    """The first ``count`` of the ``stride**2`` (hq, wq) phase planes of x padded by (ph, pw):
    plane (py, px) holds the padded input's rows py, py + s, ... and columns px, px + s, ...
    (zero past it)."""
    return _REF.phase_planes(x, stride, ph, pw, hq, wq, count)


def _phase_planes_grad_fake(
    g: Tensor, stride: int, ph: int, pw: int, h: int, w: int, count: int, kernels: int
) -> Tensor:
    return g.new_empty((g.shape[0], g.shape[1] // count, h, w))


@_operator(_phase_planes_grad_fake)
def phase_planes_grad(
    g: Tensor, stride: int, ph: int, pw: int, h: int, w: int, count: int, kernels: int
) -> Tensor:
    """The adjoint of :func:`phase_planes`: the (h, w) input's gradient from the planes'."""
    return _REF.phase_planes_grad(g, stride, ph, pw, h, w, count)


def _patches_fake(
    x: Tensor, kh: int, kw: int, stride: int, ph: int, pw: int, oh: int, ow: int, kernels: int
) -> Tensor:
    return x.new_empty((x.shape[0] * oh * ow, x.shape[1] * kh * kw))


@_operator(_patches_fake)
def patches(
    x: Tensor, kh: int, kw: int, stride: int, ph: int, pw: int, oh: int, ow: int, kernels: int
) -> Tensor:
    """Each output position's input patch as a row (im2col): (N * oh * ow, C * kh * kw)."""
    return _REF.patches(x, kh, kw, stride, ph, pw, oh, ow).contiguous()


def _patches_grad_fake(
    g: Tensor,
    n: int,
    c: int,
    h: int,
    w: int,
    kh: int,
    kw: int,
    stride: int,
    ph: int,
    pw: int,
    oh: int,
    ow: int,
    kernels: int,
) -> Tensor:
    return g.new_empty((n, c, h, w))


@_operator(_patches_grad_fake)
def patches_grad(
    g: Tensor,
    n: int,
    c: int,
    h: int,
    w: int,
    kh: int,
    kw: int,
    stride: int,
    ph: int,
    pw: int,
    oh: int,
    ow: int,
    kernels: int,
) -> Tensor:
    """The adjoint of :func:`patches`: the (n, c, h, w) input's gradient from the rows'."""
    return _REF.patches_grad(g, (n, c, h, w), kh, kw, stride, ph, pw, oh, ow)


def uses_panels(batch: int, kh: int, kw: int, dtype: torch.dtype, kernels: int) -> bool:
    """Whether a stride-1 convolution of this batch and kernel runs on batch panels (the
    compiled kernels, where a batch fills their vectors; PyTorch's convolutions never do).
    Under ``torch.compile`` it is decided as the model is traced (a constant of the graph)."""
    return _constant_panels(batch, kh, kw, dtype, kernels)


def _panels_used(batch: int, kh: int, kw: int, dtype: torch.dtype, kernels: int) -> bool:
    ext = build.loaded()
    if kernels == REFERENCE or ext is None:
        return False
    return bool(ext.uses_panels(batch, kh, kw, dtype == torch.float64))


_constant_panels: Callable[[int, int, int, torch.dtype, int], bool] = (
    torch.compiler.assume_constant_result(_panels_used)  # type: ignore[no-untyped-call]
)


# ---------------------------------------------------------------------------- dropout, pooling


def _dropout_fake(x: Tensor, keep: float, seed: Tensor, kernels: int) -> Tensor:
    return x.new_empty(x.shape)


@_operator(_dropout_fake)
def dropout(x: Tensor, keep: float, seed: Tensor, kernels: int) -> Tensor:
    """``x * (1 / keep)`` where the hash of (``seed``, a 0-d int64 tensor, and the element's
    index in x made contiguous) falls below ``keep * 2**32``, else 0 (:mod:`..accel.dropout`);
    its own adjoint."""
    return _REF.dropout(x, keep, int(seed))


def _max_pool2d_fake(x: Tensor, k: int, want_index: bool, kernels: int) -> tuple[Tensor, Tensor]:
    b, c, h, w = x.shape
    y = x.new_empty((b, c, h // k, w // k))
    if kernels == REFERENCE or build.loaded() is None:
        return y, x.new_empty(y.shape, dtype=torch.int64)
    return y, x.new_empty(y.shape if want_index else (0,), dtype=torch.uint8)


@_operator(_max_pool2d_fake)
def max_pool2d(x: Tensor, k: int, want_index: bool, kernels: int) -> tuple[Tensor, Tensor]:
    """(The maximum of every non-overlapping k x k window, where it lies in the form of the
    implementation's own, for :func:`max_pool2d_backward`), with PyTorch's choice among equal
    maxima (:mod:`..accel.pooling`)."""
    return _REF.max_pool2d(x, k, want_index)


def _max_pool2d_backward_fake(
    g: Tensor, index: Tensor, h: int, w: int, k: int, kernels: int
) -> Tensor:
    return g.new_empty((g.shape[0], g.shape[1], h, w))


@_operator(_max_pool2d_backward_fake)
def max_pool2d_backward(g: Tensor, index: Tensor, h: int, w: int, k: int, kernels: int) -> Tensor:
    """The (h, w) input's gradient: each window's output gradient at its maximum's place."""
    return _REF.max_pool2d_backward(g, index, h, w, k)


# ---------------------------------------------------------------------------- batch norm


def _batch_norm_forward_fake(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, relu: bool, kernels: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    c = x.shape[1]
    return x.new_empty(x.shape), x.new_empty((c,)), x.new_empty((c,)), x.new_empty((c,))


@_operator(_batch_norm_forward_fake)
def batch_norm_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, relu: bool, kernels: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, biased variance, inverse deviation): batch normalisation over all but the
    channels with the batch's statistics (summed in double), then a ReLU where ``relu``."""
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.double().mean(dims)
    var = x.double().var(dims, unbiased=False)
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * weight.double()
    shift = -mean * scale + (0.0 if bias is None else bias.double())
    y = x * scale.to(x.dtype).view(shape) + shift.to(x.dtype).view(shape)
    return (torch.relu(y) if relu else y), mean.to(x.dtype), var.to(x.dtype), invstd.to(x.dtype)


def _batch_norm_apply_fake(
    x: Tensor, scale: Tensor, shift: Tensor, relu: bool, kernels: int
) -> Tensor:
    return x.new_empty(x.shape)


@_operator(_batch_norm_apply_fake)
def batch_norm_apply(x: Tensor, scale: Tensor, shift: Tensor, relu: bool, kernels: int) -> Tensor:
    """``x * scale + shift`` per channel, then a ReLU where ``relu``."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = x * scale.view(shape) + shift.view(shape)
    return torch.relu(y) if relu else y


def _batch_norm_backward_fake(
    g: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    relu: bool,
    want_input: bool,
    kernels: int,
) -> tuple[Tensor, Tensor, Tensor]:
    c = x.shape[1]
    return x.new_empty(x.shape if want_input else (0,)), x.new_empty((c,)), x.new_empty((c,))


@_operator(_batch_norm_backward_fake)
def batch_norm_backward(
    g: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    relu: bool,
    want_input: bool,
    kernels: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, empty unless ``want_input``; the weight's gradient; the bias'), of
    :func:`batch_norm_forward` (the ReLU's mask recomputed from x)."""
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    xhat = (x - mean.view(shape)) * invstd.view(shape)
    if relu:
        gamma = torch.ones_like(mean) if weight is None else weight
        beta = torch.zeros_like(mean) if bias is None else bias
        g = torch.where(xhat * gamma.view(shape) + beta.view(shape) > 0, g, 0.0)
    gb = g.sum(dims)
    gw = (g * xhat).sum(dims)
    if not want_input:
        return x.new_empty((0,)), gw, gb
    n = x.numel() // x.shape[1]
    scale = invstd if weight is None else invstd * weight
    gx = (g - (gb / n).view(shape) - xhat * (gw / n).view(shape)) * scale.view(shape)
    return gx, gw, gb


# ---------------------------------------------------------------------------- activations


def _relu_grad_fake(g: Tensor, out: Tensor, kernels: int) -> Tensor:
    return g.new_empty(g.shape)


@_operator(_relu_grad_fake)
def relu_grad(g: Tensor, out: Tensor, kernels: int) -> Tensor:
    """The gradient through a ReLU from its output: ``g``, zero where ``out <= 0`` (PyTorch's
    ``threshold_backward``). An operator so that a compiled graph saves the float output for it
    rather than a bool mask (:mod:`..accel.activation`); PyTorch implements it everywhere
    (``kernels`` -1)."""
    return torch.where(out <= 0, 0.0, g)
