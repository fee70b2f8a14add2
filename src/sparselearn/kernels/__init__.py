"""Sparse compute kernels: a compiled CPU extension and a pure-PyTorch fallback.

Both backends implement the same operations on a CSR weight (``crow``, ``col``, ``val``):

- ``pack(x) -> xp``: activations (batch, features) as panels (nb, features, W): batch rows
  ``p*W .. p*W+W-1`` transposed, zero-padded (``W = panel_width(batch)``), so that each
  non-zero weight scales one contiguous, cache-resident row of W floats; ``pack_sum(x)`` also
  returns the column sums of ``x`` (a bias gradient) from the same pass;
- ``spmm(crow, col, val, xp, rows, batch, perm=None, bias=None) -> Y``: ``Y = X @ W.T (+ bias)``
  (batch, rows), the values read through ``perm`` when given (the transposed product reuses W's
  values);
- ``sampled(crow, col, gp, xp) -> dval``: ``(G.T @ X)`` at the non-zeros of W only;
- ``linear_forward(x, crow, col, val, rows, bias=None) -> (y, xp)``: ``pack`` and ``spmm`` (in
  one parallel region of the compiled kernels: each region, and each barrier in one, wakes the
  sleeping threads under ``OMP_WAIT_POLICY=PASSIVE``, about 0.03 ms each here);
- ``linear_backward(crow, col, crow_t, col_t, perm, perm_inv, val, grad_y, xp, want_bias) ->
  (grad_x, dval, grad_bias or None)``: every gradient of ``y = x @ W.T + bias`` from the output
  gradient (``dval`` in W's CSR order); the compiled kernel packs ``grad_y``, walks W^T's CSR
  once, reading each row of the gradient panel once for both products, and puts ``dval`` back in
  W's order with a gather through ``perm_inv`` (2-4x faster than scattering through ``perm``),
  all in one parallel region;
- ``conv2d_forward / conv2d_backward``: direct sparse convolution on a padded NCHW input (the
  forward adds an optional bias as it writes the output; the backward gives the gradients of
  the padded input and of the non-zeros, each when asked, sharing what they both need);
- ``phase_planes(x, stride, ph, pw, hq, wq) -> planes`` and its adjoint ``phase_planes_grad``:
  the ``stride**2`` phase planes of the padded input, over which a strided convolution is a
  stride-1 one (``accel.layers``);
- ``patches(x, kh, kw, stride, ph, pw, oh, ow) -> rows`` (im2col: each output position's input
  patch as a row of ``C * kh * kw``) and its adjoint ``patches_grad``.

The extension (C++ with OpenMP, through ``torch.utils.cpp_extension``) is built on first use
from the sources shipped in the package (``csrc/``) and cached in ``$SPARSELEARN_CACHE`` (default
``~/.cache/sparselearn``), keyed by its source, the torch version and the CPU. Where it cannot be
had (sources missing, no compiler, a failed build), one warning says why and how to get it, and
the PyTorch backend computes the same results; on CUDA tensors the PyTorch backend is used.
``SPARSELEARN_BACKEND`` chooses: ``auto`` (the default), ``cpp`` (the compiled kernels or an
error) or ``torch`` (always the fallback).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.grad import conv2d_input, conv2d_weight

logger = logging.getLogger("sparselearn")

_SOURCES = (Path(__file__).parent / "csrc" / "sparse_cpu.cpp",)
_lock = threading.Lock()
_extension: Any = None
_extension_error: str | None = None

BACKENDS = ("auto", "cpp", "torch")
_HOW_TO_BUILD = (
    "the compiled kernels need the package's C++ sources, a C++ compiler with OpenMP (g++) and "
    "ninja (e.g. `apt install g++ ninja-build` or `pip install ninja`); see the README's Install "
    "section"
)


def panel_width(batch: int) -> int:
    """Batch rows per panel: 64, or 32/16 for small batches (less padding)."""
    return 64 if batch >= 64 else 32 if batch > 16 else 16


class Ops(Protocol):
    name: str

    def pack(self, x: Tensor) -> Tensor: ...

    def pack_sum(self, x: Tensor) -> tuple[Tensor, Tensor]: ...

    def spmm(
        self,
        crow: Tensor,
        col: Tensor,
        val: Tensor,
        xp: Tensor,
        rows: int,
        batch: int,
        perm: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> Tensor: ...

    def sampled(self, crow: Tensor, col: Tensor, gp: Tensor, xp: Tensor) -> Tensor: ...

    def linear_forward(
        self,
        x: Tensor,
        crow: Tensor,
        col: Tensor,
        val: Tensor,
        rows: int,
        bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]: ...

    def linear_backward(
        self,
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
    ) -> tuple[Tensor, Tensor, Tensor | None]: ...

    def conv2d_forward(
        self,
        crow: Tensor,
        col: Tensor,
        val: Tensor,
        xp: Tensor,
        out_channels: int,
        kh: int,
        kw: int,
        stride: int,
        oh: int,
        ow: int,
        bias: Tensor | None = None,
    ) -> Tensor: ...

    def conv2d_backward(
        self,
        crow: Tensor,
        col: Tensor,
        crow_t: Tensor,
        col_t: Tensor,
        val_t: Tensor,
        g: Tensor,
        xp: Tensor,
        kh: int,
        kw: int,
        stride: int,
        want_input: bool,
        want_weight: bool,
    ) -> tuple[Tensor | None, Tensor | None]: ...

    def phase_planes(
        self, x: Tensor, stride: int, ph: int, pw: int, hq: int, wq: int
    ) -> Tensor: ...

    def phase_planes_grad(
        self, g: Tensor, stride: int, ph: int, pw: int, h: int, w: int
    ) -> Tensor: ...

    def patches(
        self, x: Tensor, kh: int, kw: int, stride: int, ph: int, pw: int, oh: int, ow: int
    ) -> Tensor: ...

    def patches_grad(
        self,
        g: Tensor,
        shape: tuple[int, int, int, int],
        kh: int,
        kw: int,
        stride: int,
        ph: int,
        pw: int,
        oh: int,
        ow: int,
    ) -> Tensor: ...


def backend_setting() -> str:
    """``$SPARSELEARN_BACKEND``: ``auto`` (unset or empty), ``cpp`` or ``torch``."""
    value = os.environ.get("SPARSELEARN_BACKEND", "").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"SPARSELEARN_BACKEND must be one of {', '.join(BACKENDS)} (or unset), got "
            f"{os.environ['SPARSELEARN_BACKEND']!r}"
        )
    return value


def _cpu_key() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        flags = platform.processor()
    text = b"".join(s.read_bytes() for s in _SOURCES) + torch.__version__.encode() + flags.encode()
    return hashlib.sha256(text).hexdigest()[:16]


def _ninja_on_path() -> dict[str, str]:
    """The environment for the build: PATH extended by the ``ninja`` package's binary where no
    ninja is on PATH (torch's builder calls ``ninja`` by name)."""
    env = dict(os.environ)
    if shutil.which("ninja") is None:
        try:
            import ninja  # type: ignore[import-not-found, unused-ignore]

            env["PATH"] = os.pathsep.join([str(ninja.BIN_DIR), env.get("PATH", "")])
        except ImportError:
            pass
    return env


def _build() -> Any:
    missing = [str(s) for s in _SOURCES if not s.is_file()]
    if missing:
        raise FileNotFoundError(
            "the kernel sources are not installed with sparselearn (missing "
            f"{', '.join(missing)}); reinstall it from a wheel or sdist that ships them"
        )
    if shutil.which("ninja", path=_ninja_on_path().get("PATH")) is None:
        raise RuntimeError("ninja is not installed")
    cache = Path(os.environ.get("SPARSELEARN_CACHE", Path.home() / ".cache" / "sparselearn"))
    build = cache / f"ext-{_cpu_key()}"
    build.mkdir(parents=True, exist_ok=True)
    from torch.utils.cpp_extension import load

    logger.info("building the sparse CPU kernels in %s (once)", build)
    saved_path = os.environ.get("PATH")
    os.environ["PATH"] = _ninja_on_path()["PATH"]
    try:
        return load(
            name="sparselearn_cpu",
            sources=[str(s) for s in _SOURCES],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            verbose=False,
        )
    finally:
        if saved_path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = saved_path


def _summary(err: BaseException) -> str:
    """One line for a build failure: a compiler's own error where the log holds one (the log
    of a failed build starts with the compile command, which says little)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    for line in lines:
        if not line.startswith("Error building extension") and any(
            k in line for k in ("error:", "Error:", "not found", "No such file")
        ):
            return f"the C++ build failed: {line[:300]}"
    return f"{type(err).__name__}: {(lines[0] if lines else '')[:300]}"


def extension() -> Any:
    """The compiled extension, built on first call; None if it cannot be had here (the reason
    is in :func:`unavailable_reason`, and logged once as a warning)."""
    global _extension, _extension_error
    with _lock:
        if _extension is not None or _extension_error is not None:
            return _extension
        setting = backend_setting()
        if setting == "torch":
            _extension_error = "disabled by SPARSELEARN_BACKEND=torch"
            return None
        try:
            _extension = _build()
        except Exception as err:  # sources missing, no compiler, a failed build: say why
            _extension_error = _summary(err)
            logger.debug("building the sparse CPU kernels failed", exc_info=True)
            if setting == "auto":  # with "cpp", ops_for raises instead
                logger.warning(
                    "sparse CPU kernels unavailable (%s); using the PyTorch backend, which gives "
                    "the same results more slowly. To get them: %s",
                    _extension_error,
                    _HOW_TO_BUILD,
                )
    return _extension


def unavailable_reason() -> str | None:
    """Why the compiled kernels are not available (None: they are, or were not tried yet)."""
    return _extension_error


class TorchOps:
    """The fallback: torch's CSR matmul and sampled matmul; dense convolution routines."""

    name = "torch"

    @staticmethod
    def _csr(crow: Tensor, col: Tensor, val: Tensor, shape: tuple[int, int]) -> Tensor:
        with warnings.catch_warnings():  # torch's "CSR support is in beta" note, once per user
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            # torch wants the row pointers and column indices of one dtype
            return torch.sparse_csr_tensor(
                crow.to(col.dtype), col, val, shape, check_invariants=False
            )

    def pack(self, x: Tensor) -> Tensor:
        b, f = x.shape
        w = panel_width(b)
        nb = -(-b // w)
        padded = F.pad(x, (0, 0, 0, nb * w - b))
        return padded.view(nb, w, f).transpose(1, 2).contiguous()

    def pack_sum(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.pack(x), x.sum(0)

    @staticmethod
    def _unpanel(xp: Tensor) -> Tensor:
        """Panels (nb, F, W) -> (F, nb * W): the transposed, padded activations."""
        return xp.permute(1, 0, 2).reshape(xp.shape[1], -1)

    def spmm(
        self,
        crow: Tensor,
        col: Tensor,
        val: Tensor,
        xp: Tensor,
        rows: int,
        batch: int,
        perm: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> Tensor:
        values = val if perm is None else val[perm]
        xt = self._unpanel(xp)
        y = (self._csr(crow, col, values, (rows, xt.shape[0])) @ xt)[:, :batch].t()
        return y if bias is None else y + bias

    def sampled(self, crow: Tensor, col: Tensor, gp: Tensor, xp: Tensor) -> Tensor:
        gt, xt = self._unpanel(gp), self._unpanel(xp)
        pattern = self._csr(
            crow, col, torch.zeros_like(col, dtype=gt.dtype), (gt.shape[0], xt.shape[0])
        )
        out: Tensor = torch.sparse.sampled_addmm(pattern, gt, xt.T, beta=0.0)
        return out.values()

    def linear_forward(
        self,
        x: Tensor,
        crow: Tensor,
        col: Tensor,
        val: Tensor,
        rows: int,
        bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        xp = self.pack(x)
        return self.spmm(crow, col, val, xp, rows, x.shape[0], bias=bias), xp

    def linear_backward(
        self,
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
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        batch = grad_y.shape[0]
        gp = self.pack(grad_y)
        grad_x = self.spmm(crow_t, col_t, val, gp, crow_t.numel() - 1, batch, perm)
        return grad_x, self.sampled(crow, col, gp, xp), grad_y.sum(0) if want_bias else None

    def _dense(self, crow: Tensor, col: Tensor, val: Tensor, shape: tuple[int, ...]) -> Tensor:
        rows = shape[0]
        return self._csr(crow, col, val, (rows, math.prod(shape[1:]))).to_dense().view(shape)

    def conv2d_forward(
        self,
        crow: Tensor,
        col: Tensor,
        val: Tensor,
        xp: Tensor,
        out_channels: int,
        kh: int,
        kw: int,
        stride: int,
        oh: int,
        ow: int,
        bias: Tensor | None = None,
    ) -> Tensor:
        w = self._dense(crow, col, val, (out_channels, xp.shape[1], kh, kw))
        return F.conv2d(xp, w, bias, stride=stride)

    def _grad_input(
        self,
        crow_t: Tensor,
        col_t: Tensor,
        val_t: Tensor,
        g: Tensor,
        in_channels: int,
        hp: int,
        wp: int,
        kh: int,
        kw: int,
        stride: int,
    ) -> Tensor:
        wt = self._dense(crow_t, col_t, val_t, (in_channels, g.shape[1], kh, kw))
        w = wt.transpose(0, 1)  # back to (out, in, kh, kw)
        shape = (g.shape[0], in_channels, hp, wp)
        gx: Tensor = conv2d_input(shape, w, g, stride=stride)  # type: ignore[no-untyped-call]
        return gx

    def _grad_weight(
        self, crow: Tensor, col: Tensor, g: Tensor, xp: Tensor, kh: int, kw: int, stride: int
    ) -> Tensor:
        shape = (g.shape[1], xp.shape[1], kh, kw)
        dw: Tensor = conv2d_weight(xp, shape, g, stride=stride)  # type: ignore[no-untyped-call]
        rows = torch.repeat_interleave(torch.arange(g.shape[1], device=crow.device), crow.diff())
        return dw.reshape(g.shape[1], -1)[rows, col]

    def conv2d_backward(
        self,
        crow: Tensor,
        col: Tensor,
        crow_t: Tensor,
        col_t: Tensor,
        val_t: Tensor,
        g: Tensor,
        xp: Tensor,
        kh: int,
        kw: int,
        stride: int,
        want_input: bool,
        want_weight: bool,
    ) -> tuple[Tensor | None, Tensor | None]:
        c_in, hp, wp = xp.shape[1:]
        gxp = (
            self._grad_input(crow_t, col_t, val_t, g, c_in, hp, wp, kh, kw, stride)
            if want_input
            else None
        )
        dval = self._grad_weight(crow, col, g, xp, kh, kw, stride) if want_weight else None
        return gxp, dval

    def phase_planes(self, x: Tensor, stride: int, ph: int, pw: int, hq: int, wq: int) -> Tensor:
        s, (n, c, h, w) = stride, x.shape
        # pad to s*hq x s*wq; what lies past that is never read: crop it
        xp = F.pad(x, (pw, max(0, s * wq - w - pw), ph, max(0, s * hq - h - ph)))
        xp = xp[:, :, : s * hq, : s * wq]
        planes = xp.reshape(n, c, hq, s, wq, s).permute(0, 3, 5, 1, 2, 4)
        return planes.reshape(n, s * s * c, hq, wq)

    def phase_planes_grad(self, g: Tensor, stride: int, ph: int, pw: int, h: int, w: int) -> Tensor:
        s, (n, _, hq, wq) = stride, g.shape
        c = g.shape[1] // (s * s)
        grid = g.reshape(n, s, s, c, hq, wq).permute(0, 3, 4, 1, 5, 2)
        grid = grid.reshape(n, c, s * hq, s * wq)
        # the padded input's gradient: zero past the planes (rows and columns never read)
        full = F.pad(grid, (0, max(0, w + pw - s * wq), 0, max(0, h + ph - s * hq)))
        return full[:, :, ph : ph + h, pw : pw + w].contiguous()

    def patches(
        self, x: Tensor, kh: int, kw: int, stride: int, ph: int, pw: int, oh: int, ow: int
    ) -> Tensor:
        cols = F.unfold(x, (kh, kw), padding=(ph, pw), stride=stride)  # (N, C*kh*kw, oh*ow)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def patches_grad(
        self,
        g: Tensor,
        shape: tuple[int, int, int, int],
        kh: int,
        kw: int,
        stride: int,
        ph: int,
        pw: int,
        oh: int,
        ow: int,
    ) -> Tensor:
        cols = g.reshape(shape[0], oh * ow, -1).transpose(1, 2)
        return F.fold(cols, shape[2:], (kh, kw), padding=(ph, pw), stride=stride)


class _ThreadLimited:
    """The extension's functions, each run with at most ``threads`` OpenMP threads: a limit
    local to the calling thread, set in the extension for the call and restored after it."""

    def __init__(self, ext: Any, threads: int) -> None:
        self._ext, self._threads = ext, threads

    def __getattr__(self, name: str) -> Any:
        fn, set_limit, threads = getattr(self._ext, name), self._ext.set_thread_limit, self._threads

        def run(*args: Any) -> Any:
            previous = set_limit(threads)
            try:
                return fn(*args)
            finally:
                set_limit(previous)

        setattr(self, name, run)  # made once per function: later lookups find the attribute
        return run


class CppOps:
    """The compiled CPU kernels (float32 and float64); ``threads`` caps the OpenMP threads of
    every kernel (None: all of them)."""

    name = "cpp"

    def __init__(self, ext: Any, threads: int | None = None) -> None:
        self.threads, self._ext_module = threads, ext
        self._ext = ext if threads is None else _ThreadLimited(ext, threads)

    def pack(self, x: Tensor) -> Tensor:
        out: Tensor = self._ext.pack(x)
        return out

    def pack_sum(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xp, total = self._ext.pack_sum(x)
        return xp, total

    def spmm(
        self,
        crow: Tensor,
        col: Tensor,
        val: Tensor,
        xp: Tensor,
        rows: int,
        batch: int,
        perm: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> Tensor:
        out: Tensor = self._ext.spmm(crow, col, val, xp, rows, batch, perm, bias)
        return out

    def sampled(self, crow: Tensor, col: Tensor, gp: Tensor, xp: Tensor) -> Tensor:
        out: Tensor = self._ext.sampled(crow, col, gp, xp)
        return out

    def linear_forward(
        self,
        x: Tensor,
        crow: Tensor,
        col: Tensor,
        val: Tensor,
        rows: int,
        bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        y, xp = self._ext.linear_forward(x, crow, col, val, rows, bias)
        return y, xp

    def linear_backward(
        self,
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
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        out = self._ext.linear_backward(crow_t, col_t, perm, perm_inv, val, grad_y, xp, want_bias)
        return out[0], out[1], out[2] if want_bias else None

    def conv2d_forward(
        self,
        crow: Tensor,
        col: Tensor,
        val: Tensor,
        xp: Tensor,
        out_channels: int,
        kh: int,
        kw: int,
        stride: int,
        oh: int,
        ow: int,
        bias: Tensor | None = None,
    ) -> Tensor:
        out: Tensor = self._ext.conv2d_forward(
            crow, col, val, xp, out_channels, kh, kw, stride, oh, ow, bias
        )
        return out

    def conv2d_backward(
        self,
        crow: Tensor,
        col: Tensor,
        crow_t: Tensor,
        col_t: Tensor,
        val_t: Tensor,
        g: Tensor,
        xp: Tensor,
        kh: int,
        kw: int,
        stride: int,
        want_input: bool,
        want_weight: bool,
    ) -> tuple[Tensor | None, Tensor | None]:
        gxp, dval = self._ext.conv2d_backward(
            crow, col, crow_t, col_t, val_t, g, xp, kh, kw, stride, want_input, want_weight
        )
        return gxp, dval

    def phase_planes(self, x: Tensor, stride: int, ph: int, pw: int, hq: int, wq: int) -> Tensor:
        out: Tensor = self._ext.phase_planes(x, stride, ph, pw, hq, wq)
        return out

    def phase_planes_grad(self, g: Tensor, stride: int, ph: int, pw: int, h: int, w: int) -> Tensor:
        out: Tensor = self._ext.phase_planes_grad(g, stride, ph, pw, h, w)
        return out

    def patches(
        self, x: Tensor, kh: int, kw: int, stride: int, ph: int, pw: int, oh: int, ow: int
    ) -> Tensor:
        out: Tensor = self._ext.patches(x, kh, kw, stride, ph, pw, oh, ow)
        return out

    def patches_grad(
        self,
        g: Tensor,
        shape: tuple[int, int, int, int],
        kh: int,
        kw: int,
        stride: int,
        ph: int,
        pw: int,
        oh: int,
        ow: int,
    ) -> Tensor:
        out: Tensor = self._ext.patches_grad(g, *shape, kh, kw, stride, ph, pw, oh, ow)
        return out


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


def ops_for(t: Tensor, backend: str = "auto", threads: int | None = None) -> Ops:
    """The kernels to use for tensors like ``t``: ``auto`` (compiled on CPU float32/float64 when
    it builds, else PyTorch; ``$SPARSELEARN_BACKEND`` can make it ``cpp`` or ``torch``), ``cpp``
    (error if unavailable) or ``torch``.

    ``threads`` caps the threads of the compiled kernels (None: all; the result is the same bit
    for bit on any number). PyTorch's own operations, and so the ``torch`` backend, run on
    PyTorch's thread pool: ``torch.set_num_threads``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'cpp' or 'torch', got {backend!r}")
    check_threads(threads)
    if backend == "auto":
        backend = backend_setting()
    if backend == "torch":
        return _TORCH
    usable = t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)
    ext = extension() if usable else None
    if ext is not None:
        ops = _CPP.get(threads)
        if ops is None or ops._ext_module is not ext:
            ops = _CPP[threads] = CppOps(ext, threads)
        return ops
    if backend == "cpp":
        if not usable:
            raise RuntimeError(
                f"the compiled kernels compute float32 and float64 on the CPU, not {t.dtype} on "
                f"{t.device}; use backend='auto' or 'torch' for these tensors"
            )
        raise RuntimeError(
            f"the compiled kernels are unavailable ({_extension_error}); {_HOW_TO_BUILD}"
        )
    return _TORCH
