"""Sparse compute: kernels against dense references, gradients, the accelerated training path."""

from __future__ import annotations

import copy
import gc
import importlib
import io
import math
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import sparselearn as sl
from sparselearn.accel import SparseConv1D, SparseConv2d, SparseLinear, SparseWeight, accelerate
from sparselearn.accel.layers import PANEL_UNFOLD_MAX_POSITIONS, UNFOLD_MAX_POSITIONS
from sparselearn.engine import CSRStorage
from sparselearn.kernels import (
    REFERENCE,
    build,
    extension,
    kernels_for,
    release_cached_blocks,
)
from sparselearn.kernels import ops as kops
from tests.helpers import BoundKernels

BACKENDS = ["torch"] + (["cpp"] if extension() is not None else [])


def masked_linear(
    n_in: int, n_out: int, density: float, dtype: torch.dtype
) -> tuple[nn.Linear, torch.Tensor]:
    lin = nn.Linear(n_in, n_out).to(dtype)
    mask = torch.rand(n_out, n_in) < density
    with torch.no_grad():
        lin.weight.mul_(mask)
    return lin, mask


def masked_conv(
    c_in: int,
    c_out: int,
    k: int,
    stride: int,
    pad: int | tuple[int, int],
    density: float,
    dtype: torch.dtype,
) -> tuple[nn.Conv2d, torch.Tensor]:
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad).to(dtype)
    mask = torch.rand(conv.weight.shape) < density
    with torch.no_grad():
        conv.weight.mul_(mask)
    return conv, mask


def test_the_compiled_kernels_build_here() -> None:
    # this machine kind has g++ and OpenMP: the extension must build (elsewhere: the fallback)
    assert extension() is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 5, 20, 64, 100, 130])  # panel widths 16, 32, 64; padding
@pytest.mark.parametrize("density", [0.15, 0.6])  # 0.6: rows of > 16 non-zeros (blocked path)
def test_linear_matches_the_dense_masked_layer(backend: str, batch: int, density: float) -> None:
    # the sparse layer gets its own copy of the parameters (it would share the bias otherwise,
    # and the bias gradients compared below would be one tensor)
    torch.manual_seed(batch)
    lin, mask = masked_linear(70, 50, density, torch.float32)
    sparse = SparseLinear(copy.deepcopy(lin), mask, backend)
    x = torch.randn(batch, 70, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(batch, 50)
    sparse(x).backward(g)
    y_ref = lin(x_ref)
    y_ref.backward(g)
    # float32: sums of at most 70 products in another order; 1e-5 relative is ample
    assert torch.allclose(sparse(x), y_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(
        sparse.weight_sparse.values.grad, lin.weight.grad[mask], rtol=1e-4, atol=1e-5
    )
    assert torch.allclose(sparse.bias.grad, lin.bias.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wanted", ["input", "weight", "bias", "input+weight"])
def test_linear_gradients_when_only_some_are_wanted(backend: str, wanted: str) -> None:
    # the backward takes different kernels for one gradient and for both: each must be right
    torch.manual_seed(3)
    lin, mask = masked_linear(40, 30, 0.2, torch.float32)
    sparse = SparseLinear(copy.deepcopy(lin), mask, backend)
    sparse.weight_sparse.values.requires_grad_("weight" in wanted)
    assert sparse.bias is not None
    sparse.bias.requires_grad_("bias" in wanted)
    x = torch.randn(70, 40, requires_grad="input" in wanted)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(70, 30)
    sparse(x).backward(g)
    lin(x_ref).backward(g)
    assert (x.grad is not None) == ("input" in wanted)
    if x.grad is not None:
        assert torch.allclose(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    values = sparse.weight_sparse.values
    assert (values.grad is not None) == ("weight" in wanted)
    if values.grad is not None:
        assert torch.allclose(values.grad, lin.weight.grad[mask], rtol=1e-4, atol=1e-5)
    assert (sparse.bias.grad is not None) == ("bias" in wanted)
    if sparse.bias.grad is not None:
        assert torch.allclose(sparse.bias.grad, lin.bias.grad, rtol=1e-5, atol=1e-5)


def packed(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` (batch, features) as panels of ``width`` rows, transposed and zero-padded: the
    protocol's layout, written out."""
    b, f = x.shape
    nb = -(-b // width)
    padded = F.pad(x, (0, 0, 0, nb * width - b))
    return padded.view(nb, width, f).transpose(1, 2).contiguous()


def avx512_here() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and "avx512f" in cpuinfo.read_text()


@pytest.mark.parametrize("backend", BACKENDS)
def test_panel_widths_follow_the_batch(backend: str) -> None:
    kernels = kernels_for(torch.empty(0), backend)
    widest = kops.panel_width(10_000, kernels)
    assert widest in (32, 64)
    assert [kops.panel_width(b, kernels) for b in (1, 16, 17, 32, 33)] == [16, 16, 32, 32, 32]
    assert kops.panel_width(widest, kernels) == widest
    if backend == "torch":
        assert widest == 64
    elif build.march() == "x86-64-v3":  # AVX2: 32, so that a panel row stays in registers
        assert widest == 32
    elif build.march() == "native" and avx512_here():
        assert widest == 64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "layout", ["expanded", "transposed", "sliced", "row_broadcast", "column_broadcast"]
)
def test_pack_reads_any_strides(backend: str, layout: str) -> None:
    # what autograd hands the backward (sum().backward() gives an expanded tensor) is packed
    # as it is, without a copy first: panels and column sums equal those of a contiguous copy
    torch.manual_seed(4)
    x = {
        "expanded": torch.tensor(2.5).expand(70, 33),
        "transposed": torch.randn(33, 70).t(),
        "sliced": torch.randn(70, 66)[:, ::2],
        "row_broadcast": torch.randn(33).expand(70, 33),
        "column_broadcast": torch.randn(70, 1).expand(70, 33),  # constant along the features
    }[layout]
    assert not x.is_contiguous()
    kernels = kernels_for(x, backend)
    xp, total = kops.pack_sum(x, kernels)
    ref = packed(x.contiguous(), kops.panel_width(x.shape[0], kernels))
    assert torch.equal(xp, ref)
    assert torch.equal(kops.pack(x, kernels), ref)
    assert torch.allclose(total, x.contiguous().sum(0), rtol=1e-6, atol=1e-5)


@given(
    batch=st.integers(1, 200),
    features=st.integers(1, 150),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_pack_property(batch: int, features: int, dtype: torch.dtype, seed: int) -> None:
    # any batch (panel padding) and width (16-wide blocks and their remainder): the panels are
    # the same data moved, so equal exactly; the column sums equal the batch sums
    x = torch.randn(batch, features, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    for backend in BACKENDS:
        kernels = kernels_for(x, backend)
        xp, total = kops.pack_sum(x, kernels)
        assert torch.equal(xp, packed(x, kops.panel_width(batch, kernels)))
        assert torch.allclose(total, x.sum(0), rtol=1e-5, atol=1e-4)


@given(
    hw=st.tuples(st.integers(1, 24), st.integers(1, 24)),
    batch=st.integers(1, 6),
    k=st.sampled_from([1, 3]),
    pad=st.integers(0, 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
# planes of 22, 33 and 61 positions (four samples at once, two at once, one at a time)
@example(hw=(4, 4), batch=5, k=3, pad=1, dtype=torch.float32, seed=1)
@example(hw=(5, 5), batch=3, k=3, pad=1, dtype=torch.float64, seed=2)
@example(hw=(7, 7), batch=2, k=3, pad=1, dtype=torch.float32, seed=3)
@settings(max_examples=40, deadline=None)
@pytest.mark.skipif(extension() is None, reason="needs the compiled kernels")
def test_stride_one_conv_on_any_plane_size(
    hw: tuple[int, int], batch: int, k: int, pad: int, dtype: torch.dtype, seed: int
) -> None:
    # stride 1 runs over each plane in chunks of 64 positions, the last ending at the plane's end
    # and overlapping the one before; a plane under 64 in chunks of 32 or 16 positions of two or
    # four samples at once (the samples left over one by one), a plane under 16 position by
    # position: every plane size and batch gives the dense masked layer's output and gradients
    if k > min(hw) + 2 * pad:
        return
    torch.manual_seed(seed)
    conv, mask = masked_conv(5, 7, k, 1, pad, 0.3, dtype)
    sparse = SparseConv2d(copy.deepcopy(conv), mask, "cpp", "planes")
    x = torch.randn(batch, 5, *hw, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = sparse(x), conv(x_ref)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert torch.allclose(y, y_ref, rtol=tol, atol=tol)
    assert x.grad is not None
    assert x_ref.grad is not None
    assert torch.allclose(x.grad, x_ref.grad, rtol=tol, atol=tol)
    assert conv.weight.grad is not None
    assert torch.allclose(
        sparse.weight_sparse.values.grad, conv.weight.grad[mask], rtol=10 * tol, atol=10 * tol
    )


def check_conv_against_dense(
    sparse: SparseConv2d, conv: nn.Conv2d, mask: torch.Tensor, x: torch.Tensor
) -> None:
    """A forward of the sparse layer and of the dense masked ``conv`` from ``x``, and a backward
    from one random output gradient: the outputs and every gradient agree."""
    x = x.requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = sparse(x), conv(x_ref)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(
        sparse.weight_sparse.values.grad, conv.weight.grad[mask], rtol=1e-4, atol=1e-4
    )
    assert torch.allclose(sparse.bias.grad, conv.bias.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("k", "stride", "pad"), [(3, 1, 1), (3, 2, 1), (3, 1, 0), (1, 1, 0), (1, 2, 0), (5, 1, 2)]
)
@pytest.mark.parametrize("size", [9, 21])  # stride 1 works on whole planes in 64-wide chunks
@pytest.mark.parametrize("algorithm", ["planes", "unfold"])
def test_conv_matches_the_dense_masked_layer(
    backend: str, k: int, stride: int, pad: int, size: int, algorithm: str
) -> None:
    torch.manual_seed(k * 10 + stride)
    conv, mask = masked_conv(6, 8, k, stride, pad, 0.2, torch.float32)
    sparse = SparseConv2d(copy.deepcopy(conv), mask, backend, algorithm)  # a bias of its own
    check_conv_against_dense(sparse, conv, mask, torch.randn(3, 6, size, size))


@given(
    stride=st.integers(2, 3),
    pad=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    hw=st.tuples(st.integers(1, 11), st.integers(1, 11)),
    extra=st.tuples(st.integers(-2, 2), st.integers(-2, 2)),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
@settings(max_examples=40, deadline=None)
def test_phase_planes_property(
    stride: int,
    pad: tuple[int, int],
    hw: tuple[int, int],
    extra: tuple[int, int],
    seed: int,
    data: st.DataObject,
) -> None:
    # plane (py, px) of channel c holds the padded input's rows py, py + s, ... and columns
    # px, px + s, ... (zeros past it; planes smaller than the padded input crop it), and the
    # gradient is the adjoint: <planes(x), g> = <x, planes_grad(g)>; with ``count``, the first
    # ``count`` planes alone, and the adjoint of those
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, *hw, dtype=torch.float64, generator=gen)
    s, (ph, pw) = stride, pad
    count = data.draw(st.sampled_from([None, *range(1, s * s + 1)]), label="count")
    built = s * s if count is None else count
    padded_hw = [size + 2 * p for size, p in zip(hw, pad, strict=True)]
    hq, wq = (max(1, -(-size // s) + e) for size, e in zip(padded_hw, extra, strict=True))
    big = F.pad(x, (pw, pw + s * wq, ph, ph + s * hq))  # the padded input, then more zeros
    g = torch.randn(2, built * 3, hq, wq, dtype=torch.float64, generator=gen)
    for backend in BACKENDS:
        ops = BoundKernels(x, backend)
        planes = ops.phase_planes(x, s, ph, pw, hq, wq, built)
        assert planes.shape == (2, built * 3, hq, wq)
        for f in range(built):
            py, px = divmod(f, s)
            want = big[:, :, py::s, px::s][:, :, :hq, :wq]
            assert torch.equal(planes[:, f * 3 : (f + 1) * 3], want), (backend, py, px)
        gx = ops.phase_planes_grad(g, s, ph, pw, *hw, built)
        assert gx.shape == x.shape
        assert torch.allclose((planes * g).sum(), (x * gx).sum(), rtol=1e-12, atol=1e-12)


@given(
    k=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.integers(1, 3),
    pad=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    hw=st.tuples(st.integers(4, 9), st.integers(4, 9)),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_patches_property(
    k: tuple[int, int],
    stride: int,
    pad: tuple[int, int],
    hw: tuple[int, int],
    seed: int,
) -> None:
    # row (n, oy, ox) is the input patch under output (oy, ox), as F.unfold lays it out, and
    # the gradient is the adjoint: <patches(x), g> = <x, patches_grad(g)>
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, *hw, dtype=torch.float64, generator=gen)
    oh, ow = ((size + 2 * p - kk) // stride + 1 for size, p, kk in zip(hw, pad, k, strict=True))
    want = F.unfold(x, k, padding=pad, stride=stride).transpose(1, 2).reshape(-1, 3 * k[0] * k[1])
    g = torch.randn(want.shape, dtype=torch.float64, generator=gen)
    for backend in BACKENDS:
        ops = BoundKernels(x, backend)
        rows = ops.patches(x, *k, stride, *pad, oh, ow)
        assert torch.equal(rows, want), backend
        gx = ops.patches_grad(g, 2, 3, *hw, *k, stride, *pad, oh, ow)
        assert gx.shape == x.shape
        assert torch.allclose((rows * g).sum(), (x * gx).sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("k", "stride", "pad", "hw"),
    [((3, 3), 2, (1, 1), (16, 16)), ((3, 3), 2, (1, 1), (9, 7)), ((1, 1), 2, (0, 0), (9, 8)),
     ((3, 1), 2, (1, 0), (10, 5)), ((5, 5), 3, (2, 2), (13, 11)), ((2, 2), 2, (0, 0), (7, 7))],
)  # fmt: skip
# batches of 16 and 31 run on batch panels packed from the input (31: a panel with empty lanes)
@pytest.mark.parametrize(
    ("batch", "dtype"),
    [(3, torch.float32), (16, torch.float32), (31, torch.float32), (16, torch.float64)],
)
def test_strided_conv_on_phase_planes(
    backend: str,
    k: tuple[int, int],
    stride: int,
    pad: tuple[int, int],
    hw: tuple[int, int],
    batch: int,
    dtype: torch.dtype,
) -> None:
    # a strided layer computes as a stride-1 one on the phase planes: outputs and gradients
    # equal the dense masked layer's, and a mask change rebuilds the planes' structure
    torch.manual_seed(sum(k) + stride + hw[0])
    conv = nn.Conv2d(5, 7, k, stride=stride, padding=pad).to(dtype)
    mask = torch.rand(conv.weight.shape) < 0.4
    with torch.no_grad():
        conv.weight.mul_(mask)
    sparse = SparseConv2d(copy.deepcopy(conv), mask, backend, algorithm="planes")
    for step in range(2):
        check_conv_against_dense(sparse, conv, mask, torch.randn(batch, 5, *hw, dtype=dtype))
        if k != (1, 1):  # (a pointwise one reads a single phase plane as its input)
            assert sparse.phases().shape[1] == 5 * stride * stride
        if step == 0:  # a new mask: the layer and the reference change the same way
            mask = torch.rand(conv.weight.shape) < 0.4
            sparse.weight_sparse.restructure(mask)
            with torch.no_grad():
                conv.weight.copy_(sparse.weight_sparse.dense())
            conv.zero_grad()
            sparse.zero_grad()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("stride", "hw"), [(2, (9, 8)), (2, (16, 16)), (3, (10, 7))])
@pytest.mark.parametrize("batch", [3, 16])
def test_pointwise_strided_conv_reads_one_phase(
    backend: str, stride: int, hw: tuple[int, int], batch: int
) -> None:
    # a 1x1 convolution at stride s reads rows and columns 0, s, 2s, ... only: it runs as a
    # stride-1 one over that one phase plane (the s * s planes are never built), with the
    # dense masked layer's outputs and gradients, also on steps that hand over the dense
    # weight gradient
    torch.manual_seed(stride + hw[1] + batch)
    conv, mask = masked_conv(6, 5, 1, stride, 0, 0.5, torch.float32)
    sparse = SparseConv2d(copy.deepcopy(conv), mask, backend, algorithm="planes")
    for step in range(2):
        sparse.weight_sparse.arm_dense_grad(step == 1)
        check_conv_against_dense(sparse, conv, mask, torch.randn(batch, 6, *hw))
        if step == 1:
            probe = sparse.weight_sparse.dense_grad_probe
            assert probe is not None
            assert probe.grad is not None
            assert torch.allclose(probe.grad, conv.weight.grad, rtol=1e-4, atol=1e-4)
        conv.zero_grad()
        sparse.zero_grad()
    assert "phases" not in sparse.weight_sparse.derived  # one phase plane, not all s * s


@pytest.mark.parametrize("algorithm", ["planes", "unfold"])
def test_strided_conv_dense_gradient_steps(algorithm: str) -> None:
    # on steps that ask for the dense gradient (RigL, momentum windows) the strided layer
    # hands over the full gradient in the weight's own shape, whichever way it computes
    torch.manual_seed(3)
    conv, mask = masked_conv(4, 6, 3, 2, 1, 0.3, torch.float32)
    sparse = SparseConv2d(copy.deepcopy(conv), mask, algorithm=algorithm)
    sparse.weight_sparse.arm_dense_grad(True)
    x = torch.randn(2, 4, 9, 9)
    g = torch.randn(2, 6, 5, 5)
    sparse(x).backward(g)
    conv(x).backward(g)
    probe = sparse.weight_sparse.dense_grad_probe
    assert probe is not None
    assert probe.grad is not None
    assert probe.grad.shape == conv.weight.shape
    assert torch.allclose(probe.grad, conv.weight.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(sparse.bias.grad, conv.bias.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(
        sparse.weight_sparse.values.grad, conv.weight.grad[mask], rtol=1e-4, atol=1e-4
    )


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled kernels unavailable")
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("batch", [2, 35])  # per sample; five panels of 8, the last part empty
def test_conv_backward_gives_what_is_asked(stride: int, batch: int) -> None:
    # the combined backward: each gradient only when asked, equal to the fallback's, from what
    # the compiled forward saved (batch panels for stride 1 and 16 samples or more)
    torch.manual_seed(6)
    conv, mask = masked_conv(5, 6, 3, stride, 1, 0.3, torch.float64)
    w = SparseWeight(conv.weight, mask)
    x = torch.randn(batch, 5, 9, 9, dtype=torch.float64)
    vals = w.values.detach()
    cpp, ref = BoundKernels(x, "cpp"), BoundKernels(x, "torch")
    y, saved = cpp.conv2d_forward(w.crow, w.col, vals, x, 6, 3, 3, stride, 1, 1, None)
    y_ref, saved_ref = ref.conv2d_forward(w.crow, w.col, vals, x, 6, 3, 3, stride, 1, 1, None)
    assert torch.allclose(y, y_ref, rtol=1e-10, atol=1e-10)
    assert saved.dim() == (3 if stride == 1 and batch >= 16 else 4)
    g = torch.randn_like(y)
    args = (w.crow, w.col, w.crow_t, w.col_t, vals[w.perm], g)
    want = ref.conv2d_backward(*args, saved_ref, 5, 9, 9, 3, 3, stride, 1, 1, True, True)
    assert want[0].shape == (batch, 5, 9, 9)  # the input's gradient, inside the padding
    for flags in [(True, True), (True, False), (False, True), (False, False)]:
        got = cpp.conv2d_backward(*args, saved, 5, 9, 9, 3, 3, stride, 1, 1, *flags)
        for asked, a, b in zip(flags, got, want, strict=True):
            if asked:
                assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)
            else:
                assert a.numel() == 0  # not asked for: empty


def _count_patches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the calls of the patches operator (a convolution computed over its patches)."""
    calls: list[int] = []
    patches = kops.patches

    def counted(*args: Any) -> Any:
        calls.append(1)
        return patches(*args)

    monkeypatch.setattr(kops, "patches", counted)
    return calls


def test_conv_algorithm_follows_the_output_size(monkeypatch: pytest.MonkeyPatch) -> None:
    # "auto" multiplies patches for small output planes (at most UNFOLD_MAX_POSITIONS
    # positions) and walks planes otherwise; both give the dense layer's output
    torch.manual_seed(5)
    conv, mask = masked_conv(8, 8, 3, 1, 1, 0.3, torch.float32)
    sparse = SparseConv2d(copy.deepcopy(conv), mask)
    side = math.isqrt(UNFOLD_MAX_POSITIONS)
    assert sparse.algorithm_for((side, side)) == "unfold"
    assert sparse.algorithm_for((side + 1, side)) == "planes"
    assert SparseConv2d(copy.deepcopy(conv), mask, algorithm="planes").algorithm_for((2, 2)) == (
        "planes"
    )
    patched = _count_patches(monkeypatch)
    for side_ in (side, side + 4):
        x = torch.randn(2, 8, side_, side_)
        assert torch.allclose(sparse(x), conv(x), rtol=1e-5, atol=1e-5)
    assert len(patched) == 1  # the small input went through the patches, the larger not
    with pytest.raises(ValueError, match="algorithm must be one of"):
        SparseConv2d(conv, mask, algorithm="im2col")
    with pytest.raises(ValueError, match=r"batched \(N, C, H, W\) input"):
        sparse(torch.randn(8, 5, 5))


@pytest.mark.skipif(extension() is None, reason="needs the compiled kernels")
def test_batch_panels_keep_smaller_planes(monkeypatch: pytest.MonkeyPatch) -> None:
    # a batch that the compiled kernels run on batch panels walks planes down to
    # PANEL_UNFOLD_MAX_POSITIONS positions; one per sample, or the PyTorch backend, unfolds up
    # to UNFOLD_MAX_POSITIONS
    torch.manual_seed(5)
    conv, mask = masked_conv(8, 8, 3, 1, 1, 0.3, torch.float32)
    compiled = SparseConv2d(copy.deepcopy(conv), mask, "cpp")
    fallback = SparseConv2d(copy.deepcopy(conv), mask, "torch")
    side = math.isqrt(PANEL_UNFOLD_MAX_POSITIONS)
    assert compiled.algorithm_for((side, side), batch=64) == "unfold"
    assert compiled.algorithm_for((side + 1, side + 1), batch=64) == "planes"
    assert compiled.algorithm_for((side + 1, side + 1), batch=2) == "unfold"
    assert fallback.algorithm_for((side + 1, side + 1), batch=64) == "unfold"
    # a 1x1 convolution reads its input where it lies: no panels, and patches up to 16
    pointwise = SparseConv2d(*masked_conv(8, 8, 1, 1, 0, 0.3, torch.float32), "cpp")
    assert pointwise.algorithm_for((side + 1, side + 1), batch=64) == "unfold"
    x = torch.randn(64, 8, side + 1, side + 1)
    patched = _count_patches(monkeypatch)
    assert torch.allclose(compiled(x), conv(x), rtol=1e-5, atol=1e-5)
    assert not patched  # planes, on panels


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend: str) -> None:
    torch.manual_seed(0)
    lin, mask = masked_linear(12, 9, 0.3, torch.float64)
    sl_ = SparseLinear(lin, mask, backend)
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v: sl_(x), (x, sl_.weight_sparse.values))
    for k, stride, pad, algorithm in [
        (3, 1, 1, "planes"),
        (3, 2, 1, "planes"),
        (1, 1, 0, "planes"),
        (1, 2, 0, "planes"),
        (3, 1, 1, "unfold"),
        (3, 2, 1, "unfold"),
    ]:
        conv, cmask = masked_conv(3, 4, k, stride, pad, 0.4, torch.float64)
        sc = SparseConv2d(conv, cmask, backend, algorithm)
        xc = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, v, sc=sc: sc(x), (xc, sc.weight_sparse.values))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled kernels unavailable")
def test_fallback_equals_compiled() -> None:
    torch.manual_seed(1)
    lin, mask = masked_linear(200, 150, 0.05, torch.float64)
    a = SparseLinear(copy.deepcopy(lin), mask, "cpp")
    b = SparseLinear(copy.deepcopy(lin), mask, "torch")
    x = torch.randn(70, 200, dtype=torch.float64)
    g = torch.randn(70, 150, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a(xa).backward(g)
    b(xb).backward(g)
    # float64: only the order of additions differs
    assert torch.allclose(a(x), b(x), rtol=1e-12, atol=1e-12)
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)
    assert torch.allclose(
        a.weight_sparse.values.grad, b.weight_sparse.values.grad, rtol=1e-12, atol=1e-12
    )
    assert torch.allclose(a.bias.grad, b.bias.grad, rtol=1e-12, atol=1e-12)
    assert kernels_for(x, "torch") == REFERENCE


def test_restructure_keeps_values_and_reports_sources() -> None:
    w = torch.arange(1.0, 13.0).view(3, 4)
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    sw = SparseWeight(w * mask, mask)
    assert sw.values.tolist() == [1.0, 3.0, 6.0, 9.0, 10.0, 12.0]
    assert torch.equal(sw.mask(), mask)
    assert torch.equal(sw.dense(), w * mask)
    new = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 1]], dtype=torch.bool)
    old_param = sw.values
    source = sw.restructure(new)
    assert source.tolist() == [0, -1, 2, 4, 5]
    assert sw.values.tolist() == [1.0, 0.0, 6.0, 10.0, 12.0]
    assert sw.values is not old_param  # a new leaf (autograd caches a leaf's shape)
    assert torch.equal(sw.mask(), new)
    # the transposed structure lists, per column, the rows holding a non-zero
    assert sw.crow_t.tolist() == [0, 1, 4, 4, 5]
    assert sw.values[sw.perm].tolist() == [1.0, 0.0, 6.0, 10.0, 12.0]
    assert torch.equal(sw.values[sw.perm][sw.perm_inv], sw.values)  # the inverse follows


def test_state_dict_loads_a_different_number_of_weights() -> None:
    lin, mask = masked_linear(8, 6, 0.5, torch.float32)
    a = SparseLinear(lin, mask)
    lin2, mask2 = masked_linear(8, 6, 0.2, torch.float32)
    b = SparseLinear(lin2, mask2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 8)
    assert torch.equal(a(x), b(x))


def test_state_dict_with_64_bit_indices_still_loads() -> None:
    # checkpoints written before the indices became 32-bit hold int64 col / col_t / perm
    lin, mask = masked_linear(30, 20, 0.3, torch.float32)
    a = SparseLinear(lin, mask)
    old = {
        k: v.long() if k.endswith(("col", "col_t", "perm")) else v
        for k, v in a.state_dict().items()
    }
    assert old["weight_sparse.col"].dtype == torch.int64
    lin2, mask2 = masked_linear(30, 20, 0.1, torch.float32)
    b = SparseLinear(lin2, mask2)
    b.load_state_dict(old)
    w = b.weight_sparse
    assert w.col.dtype == w.col_t.dtype == w.perm.dtype == torch.int32
    assert "weight_sparse.perm_inv" not in a.state_dict()  # derived from perm on loading
    assert torch.equal(w.perm[w.perm_inv], torch.arange(w.nnz, dtype=torch.int32))
    x = torch.randn(5, 30, requires_grad=True)
    xb = x.detach().clone().requires_grad_()
    g = torch.randn(5, 20)
    a(x).backward(g)
    b(xb).backward(g)
    assert torch.equal(a(x), b(xb))
    assert torch.equal(x.grad, xb.grad)
    assert torch.equal(a.weight_sparse.values.grad, w.values.grad)


def test_layers_too_large_for_32_bit_indices_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from sparselearn.accel import layers

    monkeypatch.setattr(layers, "_INDEX_LIMIT", 100)
    lin, mask = masked_linear(10, 10, 0.5, torch.float32)
    with pytest.raises(ValueError, match="32-bit indices"):
        SparseLinear(lin, mask)


# ----------------------------------------------------------------------------- the engine path


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)
    )


def train(method: str, accel: bool, steps: int = 12, backend: str = "auto", **kw: Any):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    engine = sl.sparsify(model, opt, method=method, density=0.2, total_steps=40, seed=0, **kw)
    if accel:
        accelerate(model, engine, mode="sparse", backend=backend)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, opt, engine, losses


CASES = [
    ("rigl", {"update_every": 4}),
    ("set", {"update_every": 4}),
    ("dsr", {"update_every": 4}),
    ("static", {}),
    ("gmp", {"update_every": 4}),
    ("sparse_momentum", {"update_every": 4, "momentum_window": 2}),
]


@pytest.mark.parametrize(("method", "options"), CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_accelerated_training_follows_the_masked_path(
    method: str, options: dict[str, Any], backend: str
) -> None:
    _, _, e1, l1 = train(method, False, **options)
    _, _, e2, l2 = train(method, True, backend=backend, **options)
    for name in e1.masks:
        assert torch.equal(e1.masks[name], e2.masks[name]), name
    # float32, different summation order: the trajectories agree to float precision
    assert l1 == pytest.approx(l2, rel=1e-4, abs=1e-5)
    assert [u.step for u in e1.history] == [u.step for u in e2.history]
    assert e1.density() == e2.density()


def test_memory_follows_the_active_weights() -> None:
    model, opt, _, _ = train("rigl", True, update_every=4)
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    for module in model.modules():
        if isinstance(module, SparseLinear):
            v = module.weight_sparse.values
            assert id(v) in params
            assert v.numel() == module.weight_sparse.nnz
            assert opt.state[v]["momentum_buffer"].shape == v.shape
    assert not any(p.dim() == 2 for g in opt.param_groups for p in g["params"])  # no dense weight


def test_checkpoint_round_trip_with_accelerated_layers() -> None:
    model, opt, engine, _ = train(
        "sparse_momentum", True, steps=6, update_every=4, momentum_window=2
    )
    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "engine": engine.state_dict()}, buf
    )
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    torch.manual_seed(5)
    model2 = mlp()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    engine2 = sl.sparsify(
        model2, opt2, density=0.2, total_steps=40, seed=0, update_every=4, momentum_window=2
    )
    accelerate(model2, engine2, mode="sparse")
    # the usual order: model (resizes the sparse weights in place), optimizer, engine
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    engine2.load_state_dict(saved["engine"])
    assert engine2.step == 6
    for name in engine.masks:
        assert torch.equal(engine.masks[name], engine2.masks[name])
    # and both continue identically
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        x, y = torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)
        for m, o in ((model, opt), (model2, opt2)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    x = torch.randn(4, 20)
    assert torch.equal(model(x), model2(x))


def test_dense_inference_follows_training_and_mask_updates() -> None:
    # layers that infer densely read a cached dense weight: after every optimizer step and
    # mask update (sparse momentum regrows weights), inference must still agree with the
    # sparse kernels, never a stale copy
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = sl.sparsify(model, opt, density=0.2, total_steps=40, update_every=4, momentum_window=2)
    accelerate(model, engine, mode="sparse", inference_dense=list(engine.masks))
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert layers
    assert all(m.inference == "dense" for m in layers)
    probe = torch.randn(8, 20)
    for _ in range(10):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 20)), torch.randint(0, 5, (8,))).backward()
        opt.step()
        with torch.no_grad():
            dense = model(probe)
            for m in layers:
                m.inference = "sparse"
            sparse = model(probe)
            for m in layers:
                m.inference = "dense"
        assert torch.allclose(dense, sparse, rtol=1e-5, atol=1e-5)
    assert len(engine.history) == 2  # mask updates at steps 4 and 8


def test_window_computes_dense_gradients_only_before_updates() -> None:
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = sl.sparsify(model, opt, density=0.2, total_steps=40, update_every=5, momentum_window=2)
    accelerate(model, engine, mode="sparse")
    armed = []
    for _ in range(10):
        armed.append(
            any(
                layer.storage.dense_grad_probe is not None
                for layer in engine.layers
                if isinstance(layer, CSRStorage)
            )
        )
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 20)), torch.randint(0, 5, (8,))).backward()
        opt.step()
    # updates at steps 5 and 10: dense gradients on steps 4, 5, 9 and 10 only
    assert armed == [False, False, False, True, True, False, False, False, True, True]


def test_accelerate_refuses_what_it_cannot_speed_up() -> None:
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = sl.sparsify(model, opt, density=0.2, total_steps=40)
    with pytest.raises(ValueError, match="momentum_window"):
        accelerate(model, engine, mode="sparse")
    engine.remove()
    engine = sl.sparsify(model, opt, method="rigl", density=0.2, total_steps=40)
    with pytest.raises(ValueError, match="pass example_input"):
        accelerate(model, engine)


def test_the_report_names_why_a_layer_stays_dense() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "rnn": nn.LSTM(6, 8),
            "attn": nn.MultiheadAttention(8, 2),
            "depthwise": nn.Conv2d(4, 4, 3, groups=4),
            "dilated": nn.Conv2d(4, 4, 3, dilation=2),
            "fc": nn.Linear(8, 8),
        }
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sl.sparsify(model, opt, "static", 0.5, include=["re:rnn\\.weight_.*"])
    report = accelerate(model, engine, mode="sparse")
    reasons = {c.name: c.reason for c in report.layers}
    assert reasons["rnn.weight_ih_l0"] == (
        "LSTM.weight_ih_l0: no sparse kernel (Linear, Conv2d and Conv1D have one)"
    )
    assert reasons["attn.in_proj_weight"] == (
        "MultiheadAttention's in_proj_weight (read by its attention): no sparse kernel"
    )
    assert reasons["attn.out_proj.weight"] == (
        "MultiheadAttention's out_proj (read by its attention): no sparse kernel"
    )
    assert reasons["depthwise.weight"] == "Conv2d with groups=4: no sparse kernel"
    assert reasons["dilated.weight"] == "Conv2d with dilation=(2, 2): no sparse kernel"
    assert report.accelerated == ["fc.weight"]


@pytest.mark.parametrize("method", ["static", "rigl"])  # rigl masks gradients with a hook
def test_accelerate_frees_the_dense_weights_it_replaced(method: str) -> None:
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = sl.sparsify(model, opt, method, 0.2, total_steps=40)
    model(torch.randn(4, 20)).sum().backward()
    opt.step()  # optimizer state and gradients, as in a run
    olds = [weakref.ref(model[i].weight) for i in (0, 2, 4)]
    accelerate(model, engine, mode="sparse")
    assert [ref() is None for ref in olds] == [True, True, True]  # no gc.collect() needed


def test_auto_mode_times_each_layer_on_the_real_shape() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = sl.sparsify(model, opt, method="static", density=0.05, init="uniform")
    report = accelerate(model, engine, torch.randn(64, 512), repeats=3)
    assert [c.name for c in report.layers] == ["0.weight", "2.weight"]
    for c in report.layers:
        assert c.dense_ms is not None
        assert c.sparse_ms is not None
        assert (c.chosen == "sparse") == (c.sparse_ms < c.dense_ms)
        is_sparse = isinstance(dict(model.named_children())[c.name.split(".")[0]], SparseLinear)
        assert is_sparse == (c.chosen == "sparse")
    assert "dense ms" in str(report)


def test_timing_waits_for_cuda_work(monkeypatch: pytest.MonkeyPatch) -> None:
    # CUDA kernels run asynchronously: the timed step must wait for them (and a CPU step must
    # not touch the CUDA runtime)
    acc = importlib.import_module("sparselearn.accel.accelerate")  # the module, not the function
    waited: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    acc._wait_for(torch.device("cuda", 0))
    acc._wait_for(torch.device("cpu"))
    assert waited == [torch.device("cuda", 0)]
    acc._fwd_bwd(nn.Linear(3, 2), torch.randn(4, 3))()
    assert waited == [torch.device("cuda", 0)]


def test_layers_limits_what_is_accelerated() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = sl.sparsify(model, opt, method="static", density=0.2)
    with pytest.raises(ValueError, match=r"\['1.weight'\] are not sparsified weights"):
        accelerate(model, engine, mode="sparse", layers=["1.weight"])
    report = accelerate(model, engine, mode="sparse", layers=["2.weight"])
    assert report.accelerated == ["2.weight"]
    assert isinstance(model[2], SparseLinear)
    assert type(model[0]) is nn.Linear
    assert [c.reason for c in report.layers] == ["not in layers", "forced"]


def test_momentum_window_validation() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with pytest.raises(ValueError, match="must not exceed the update interval"):
        sl.sparsify(model, opt, density=0.2, total_steps=40, update_every=3, momentum_window=5)
    with pytest.raises(ValueError, match="applies to growth by momentum"):
        sl.sparsify(model, opt, method="rigl", density=0.2, total_steps=40, momentum_window=5)
    with pytest.raises(ValueError, match="needs scheduled updates"):
        sl.sparsify(model, opt, density=0.2, total_steps=40, update_every=0, momentum_window=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layers_on_cuda_match_the_dense_masked_layers() -> None:
    # on CUDA the layers use PyTorch's CSR operations (the compiled kernels are CPU only):
    # a Linear, convolutions on planes (stride 1, and stride 2 on phase planes) and on patches
    # (a 3x3 output)
    torch.manual_seed(0)
    lin, mask = masked_linear(64, 48, 0.1, torch.float32)
    conv, cmask = masked_conv(6, 8, 3, 1, 1, 0.2, torch.float32)
    strided, smask = masked_conv(6, 8, 3, 2, 1, 0.2, torch.float32)
    small, mmask = masked_conv(6, 8, 3, 1, 1, 0.2, torch.float32)
    for dense, m, shape in [
        (lin, mask, (32, 64)),
        (conv, cmask, (4, 6, 10, 10)),
        (strided, smask, (4, 6, 11, 11)),
        (small, mmask, (4, 6, 3, 3)),
    ]:
        dense = dense.cuda()
        sparse = (SparseLinear if isinstance(dense, nn.Linear) else SparseConv2d)(dense, m.cuda())
        x = torch.randn(*shape, device="cuda", requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = sparse(x), dense(x_ref)
        g = torch.randn_like(y_ref)
        y.backward(g)
        y_ref.backward(g)
        assert torch.allclose(y, y_ref, rtol=1e-4, atol=1e-4)
        assert torch.allclose(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
        assert dense.weight.grad is not None
        assert torch.allclose(
            sparse.weight_sparse.values.grad, dense.weight.grad[m.cuda()], rtol=1e-3, atol=1e-4
        )


@given(
    n_in=st.integers(1, 90),
    n_out=st.integers(1, 40),
    batch=st.integers(1, 140),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_linear_kernels_property(
    n_in: int, n_out: int, batch: int, density: float, seed: int
) -> None:
    # any shape, batch (panel padding) and density, empty rows and columns included: both
    # backends give the dense masked layer's outputs and gradients
    torch.manual_seed(seed)
    lin, mask = masked_linear(n_in, n_out, density, torch.float64)
    x = torch.randn(batch, n_in, dtype=torch.float64)
    g = torch.randn(batch, n_out, dtype=torch.float64)
    x_ref = x.clone().requires_grad_()
    lin(x_ref).backward(g)
    for backend in BACKENDS:
        sparse = SparseLinear(copy.deepcopy(lin), mask, backend)
        xs = x.clone().requires_grad_()
        y = sparse(xs)
        y.backward(g)
        assert torch.allclose(y, lin(x), rtol=1e-10, atol=1e-10)
        assert torch.allclose(xs.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
        assert torch.allclose(
            sparse.weight_sparse.values.grad, lin.weight.grad[mask], rtol=1e-10, atol=1e-10
        )
        assert torch.allclose(sparse.bias.grad, lin.bias.grad, rtol=1e-10, atol=1e-10)


@given(
    c_in=st.integers(1, 5),
    c_out=st.integers(1, 5),
    hw=st.tuples(st.integers(3, 12), st.integers(3, 12)),
    k=st.sampled_from([1, 3, 5]),
    stride=st.sampled_from([1, 2]),
    pad=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_conv_kernels_property(
    c_in: int,
    c_out: int,
    hw: tuple[int, int],
    k: int,
    stride: int,
    pad: tuple[int, int],
    density: float,
    seed: int,
) -> None:
    # rectangular inputs and unequal padding: the input gradient is written from a grid as wide
    # as the padded input, offset by the padding
    if min(hw[0] + 2 * pad[0], hw[1] + 2 * pad[1]) < k:
        return  # no output position
    torch.manual_seed(seed)
    conv, mask = masked_conv(c_in, c_out, k, stride, pad, density, torch.float64)
    x = torch.randn(2, c_in, *hw, dtype=torch.float64)
    x_ref = x.clone().requires_grad_()
    y_ref = conv(x_ref)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    for backend in BACKENDS:
        sparse = SparseConv2d(conv, mask, backend)
        xs = x.clone().requires_grad_()
        y = sparse(xs)
        y.backward(g)
        assert torch.allclose(y, y_ref, rtol=1e-10, atol=1e-10)
        assert torch.allclose(xs.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
        assert torch.allclose(
            sparse.weight_sparse.values.grad, conv.weight.grad[mask], rtol=1e-10, atol=1e-10
        )


@given(
    c_in=st.integers(1, 40),  # several blocks of input channels
    c_out=st.integers(1, 40),  # several groups of rows
    hw=st.tuples(st.integers(1, 20), st.integers(1, 20)),
    k=st.sampled_from([(3, 3), (5, 5), (2, 2), (1, 3), (3, 1)]),  # larger than 1 x 1
    pad=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    batch=st.sampled_from([16, 30, 32, 40, 61]),  # whole panels, a last one partly empty
    density=st.floats(0.0, 1.0),
    bias=st.booleans(),
    double=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
@pytest.mark.skipif(extension() is None, reason="needs the compiled kernels")
def test_batch_panels_property(
    c_in: int,
    c_out: int,
    hw: tuple[int, int],
    k: tuple[int, int],
    pad: tuple[int, int],
    batch: int,
    density: float,
    bias: bool,
    double: bool,
    seed: int,
) -> None:
    # a stride-1 batch of 16 or more with a kernel larger than 1 x 1 runs on batch panels:
    # chunks of positions that run past the plane's end, blocks of input channels, groups of
    # rows, lanes past the batch; the outputs and gradients are the dense masked layer's
    if hw[0] + 2 * pad[0] < k[0] or hw[1] + 2 * pad[1] < k[1]:
        return  # no output position
    dtype = torch.float64 if double else torch.float32
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, k, padding=pad, bias=bias).to(dtype)
    mask = torch.rand(conv.weight.shape) < density
    with torch.no_grad():
        conv.weight.mul_(mask)
    x = torch.randn(batch, c_in, *hw, dtype=dtype)
    w = SparseWeight(conv.weight, mask)
    _, saved = BoundKernels(x, "cpp").conv2d_forward(
        w.crow, w.col, w.values, x, c_out, *k, 1, *pad, None
    )
    assert saved.dim() == 3  # the panels
    x_ref = x.clone().requires_grad_()
    y_ref = conv(x_ref)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    sparse = SparseConv2d(copy.deepcopy(conv), mask, "cpp", "planes")
    xs = x.clone().requires_grad_()
    y = sparse(xs)
    y.backward(g)
    tol = 1e-10 if double else 1e-4
    assert torch.allclose(y, y_ref, rtol=tol, atol=tol)
    assert torch.allclose(xs.grad, x_ref.grad, rtol=tol, atol=tol)
    assert torch.allclose(
        sparse.weight_sparse.values.grad, conv.weight.grad[mask], rtol=tol, atol=10 * tol
    )


@pytest.mark.skipif(extension() is None, reason="needs the compiled kernels")
def test_thread_cap_reaches_the_kernels_and_is_restored() -> None:
    ext = extension()
    torch.set_num_threads(2)  # restored after each test (conftest)
    big = 1 << 30
    assert ext.team_size(big) == 2  # no cap: every thread
    assert ext.team_size(1) == 1  # too little work for a second thread
    # every kernel operator takes the cap as its last argument (Capped, in common.h)
    team = torch.ops.sparselearn_cpu.team_size
    assert team(big, kernels_for(torch.zeros(1), "cpp", threads=1)) == 1
    assert team(big, kernels_for(torch.zeros(1), "cpp", threads=5)) == 2
    assert team(big, kernels_for(torch.zeros(1), "cpp")) == 2
    assert ext.thread_limit() == 0  # restored after each call
    with pytest.raises(RuntimeError, match="thread limit must be 0"):
        ext.set_thread_limit(-1)


@pytest.mark.skipif(extension() is None, reason="needs the compiled kernels")
@pytest.mark.parametrize("kind", ["linear", "conv", "conv-stride-2", "conv-unfold"])
def test_one_thread_gives_the_same_bits_as_all(kind: str) -> None:
    # shapes with enough work for the parallel regions; the sparse layers' results must not
    # depend on the thread count (each output and each weight gradient is summed by one thread
    # in a fixed order), so sl.accelerate may pick either without changing a run
    torch.set_num_threads(2)  # restored after each test (conftest)
    torch.manual_seed(0)
    layers: list[SparseLinear] | list[SparseConv2d]
    if kind == "linear":
        lin, mask = masked_linear(512, 384, 0.1, torch.float32)
        layers = [SparseLinear(copy.deepcopy(lin), mask, "cpp", threads=t) for t in (None, 1)]
        x = torch.randn(200, 512)
    else:
        stride = 2 if kind == "conv-stride-2" else 1
        conv, mask = masked_conv(32, 48, 3, stride, 1, 0.2, torch.float32)
        algorithm = "unfold" if kind == "conv-unfold" else "planes"
        layers = [
            SparseConv2d(copy.deepcopy(conv), mask, "cpp", algorithm, threads=t) for t in (None, 1)
        ]
        x = torch.randn(16, 32, 20, 20)
    results = []
    for layer in layers:
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        w = layer.weight_sparse.values
        results.append((y, xi.grad, w.grad, layer.bias.grad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(extension() is None, reason="needs the compiled kernels")
def test_panel_chunks_split_across_threads_give_the_same_bits() -> None:
    # a 5x5 plane on batch panels has a last chunk of grid positions shorter than the others,
    # and 256 input channels at 5% several blocks of channels, whose partial sums wait in memory
    # between blocks; with more threads than panels x chunks / 2, neighbouring chunks run on
    # different threads at the same time, and must not share positions (oversubscribed here,
    # so that the threads interleave as on a busy machine)
    torch.set_num_threads(6)  # restored after each test (conftest)
    torch.manual_seed(0)
    conv, mask = masked_conv(256, 256, 3, 1, 1, 0.05, torch.float32)
    one, every = (SparseConv2d(conv, mask, "cpp", "planes", threads=t) for t in (1, None))
    x = torch.randn(16, 256, 5, 5)
    with torch.no_grad():
        expected = one(x)
        for _ in range(60):
            assert torch.equal(every(x), expected)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "1"])
def test_threads_must_be_none_or_positive(bad: Any) -> None:
    lin, mask = masked_linear(8, 4, 0.5, torch.float32)
    with pytest.raises(ValueError, match="threads must be None"):
        SparseLinear(lin, mask, threads=bad)
    conv, cmask = masked_conv(2, 3, 3, 1, 1, 0.5, torch.float32)
    with pytest.raises(ValueError, match="threads must be None"):
        SparseConv2d(conv, cmask, threads=bad)
    with pytest.raises(ValueError, match="threads must be None"):
        kernels_for(torch.zeros(1), threads=bad)


@pytest.mark.skipif(extension() is None, reason="needs the compiled kernels")
def test_accelerate_keeps_one_thread_where_that_is_fastest(monkeypatch: pytest.MonkeyPatch) -> None:
    # the timings decide: dense, sparse on every thread, sparse on one (when the compiled
    # kernels run with more than one thread)
    acc = importlib.import_module("sparselearn.accel.accelerate")
    torch.set_num_threads(2)  # restored after each test (conftest)
    for times, chosen, threads in (
        ([5.0, 2.0, 1.0], "sparse", 1),
        ([5.0, 1.0, 2.0], "sparse", None),
        ([1.0, 2.0, 3.0], "dense", None),
    ):
        monkeypatch.setattr(acc, "_time_turns", lambda fns, repeats, t=times: t[: len(fns)])
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        engine = sl.sparsify(model, opt, method="static", density=0.1)
        report = accelerate(model, engine, torch.randn(8, 64), backend="cpp")
        (c,) = report.layers
        assert (c.chosen, c.threads) == (chosen, threads)
        if chosen == "sparse":
            assert c.sparse_ms == min(times[1:])
            assert isinstance(model[0], SparseLinear)
            assert model[0].threads == threads
        else:
            assert type(model[0]) is nn.Linear
        assert ("(1 thread)" in str(report)) == (threads == 1)
        engine.remove()


def _sparsified_mlp() -> tuple[nn.Sequential, Any]:
    """Two Linear layers at 20% (static), for re-applying accelerate's choices."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return model, sl.sparsify(model, opt, method="static", density=0.2)


def test_forced_mode_reapplies_thread_caps() -> None:
    model, engine = _sparsified_mlp()
    with pytest.raises(ValueError, match=r"threads names \['1.weight'\]"):
        accelerate(model, engine, mode="sparse", threads={"1.weight": 1})
    with pytest.raises(ValueError, match="threads must be None"):
        accelerate(model, engine, mode="sparse", threads={"0.weight": 0})
    with pytest.raises(ValueError, match="mode='auto' times them itself"):
        accelerate(model, engine, torch.randn(4, 64), threads={"0.weight": 1})
    report = accelerate(model, engine, mode="sparse", threads={"2.weight": 1})
    assert isinstance(model[0], SparseLinear)
    assert isinstance(model[2], SparseLinear)
    assert (model[0].threads, model[2].threads) == (None, 1)
    assert report.thread_caps == {"2.weight": 1}
    assert [c.threads for c in report.layers] == [None, 1]


def _inference_of(module: nn.Module) -> str:
    assert isinstance(module, (SparseLinear, SparseConv2d))
    return module.inference


def test_forced_mode_reapplies_dense_inference() -> None:
    model, engine = _sparsified_mlp()
    with pytest.raises(ValueError, match=r"inference_dense names \['1.weight'\]"):
        accelerate(model, engine, mode="sparse", inference_dense=["1.weight"])
    with pytest.raises(ValueError, match="mode='auto' times them itself"):
        accelerate(model, engine, torch.randn(4, 64), inference_dense=["0.weight"])
    report = accelerate(model, engine, mode="sparse", inference_dense=["2.weight"])
    assert [_inference_of(model[0]), _inference_of(model[2])] == ["sparse", "dense"]
    assert report.inference_dense == ["2.weight"]
    assert "inference=dense" in repr(model[2])
    assert "inference=" not in repr(model[0])


def test_accelerate_chooses_dense_inference_where_it_times_faster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a layer that trains faster sparse but infers faster dense keeps its sparse kernels for
    # training and computes densely where no gradient is recorded
    acc = importlib.import_module("sparselearn.accel.accelerate")

    calls: list[int] = []

    def timings(fns: list[Any], repeats: int) -> list[float]:
        for fn in fns:  # each runs (the layers' forwards work in both modes)
            fn()
        calls.append(len(fns))
        # per layer, the training step (dense, sparse[, sparse on one thread]), then inference
        return [1.0, 2.0] if len(calls) % 2 == 0 else [5.0, 2.0, 3.0][: len(fns)]

    monkeypatch.setattr(acc, "_time_turns", timings)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 36, 10))  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = sl.sparsify(model, opt, method="static", density=0.3)
    x = torch.randn(4, 3, 6, 6)
    report = accelerate(model, engine, x)
    assert report.accelerated == ["0.weight", "3.weight"]
    assert report.inference_dense == ["0.weight", "3.weight"]
    assert all(c.dense_inference_ms == 1.0 and c.sparse_inference_ms == 2.0 for c in report.layers)
    assert "1.00 / 2.00" in str(report)
    assert [_inference_of(model[0]), _inference_of(model[3])] == ["dense", "dense"]


class _Conv1D(nn.Module):
    """The layout of Hugging Face's Conv1D (``x @ W + b``, W of shape (in, out))."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))
        self.bias = nn.Parameter(torch.randn(n_out))


@pytest.mark.parametrize("kind", ["linear", "conv", "conv1d"])
def test_dense_inference_agrees_and_keeps_training_sparse(kind: str) -> None:
    # inference="dense": where no gradient is recorded, the dense product with a cached dense
    # weight, equal to the sparse kernels' to rounding; the cache is rebuilt when the values
    # (an optimizer step) or the structure change; with gradients, the sparse kernels as before
    torch.manual_seed(1)
    layer: nn.Module
    if kind == "linear":
        dense_layer = nn.Linear(12, 7)
        mask = torch.rand(dense_layer.weight.shape) < 0.4
        layer, x = SparseLinear(dense_layer, mask), torch.randn(5, 12)
    elif kind == "conv":
        conv, mask = masked_conv(4, 6, 3, 2, 1, 0.4, torch.float32)
        layer, x = SparseConv2d(conv, mask), torch.randn(3, 4, 9, 9)
    else:
        conv1d = _Conv1D(12, 7)
        mask = torch.rand(conv1d.weight.shape) < 0.4
        layer, x = SparseConv1D(conv1d, mask), torch.randn(2, 5, 12)
    w = layer.weight_sparse
    with torch.no_grad():
        want = layer(x)
    layer.inference = "dense"
    with torch.no_grad():
        got = layer(x)
        assert w._dense is not None  # the layer read the cached dense weight
        first = w.cached_dense()
        assert layer(x).shape == want.shape
        assert w.cached_dense() is first  # kept
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(first, w.dense())
    # with gradients: the sparse kernels (the same bits as before), and the values' gradient
    y = layer(x)
    assert torch.equal(y, want)
    y.sum().backward()
    assert w.values.grad is not None
    torch.optim.SGD(layer.parameters(), lr=0.5).step()  # the values change in place
    with torch.no_grad():
        stepped = layer(x)
        assert w.cached_dense() is not first
        assert torch.equal(w.cached_dense(), w.dense())
        layer.inference = "sparse"
        assert torch.allclose(stepped, layer(x), rtol=1e-5, atol=1e-5)
    w.restructure(torch.rand(w.shape) < 0.4)
    layer.inference = "dense"
    with torch.no_grad():
        assert torch.equal(w.cached_dense(), w.dense())
    with pytest.raises(ValueError, match="inference must be 'sparse' or 'dense', got 'fast'"):
        layer.inference = "fast"


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the compiled kernels are not available")
def test_wide_stride_one_conv_split_into_channel_blocks() -> None:
    # 160 input and 144 output channels on 9x9 planes: the stride-1 kernels take the channels
    # in blocks (about 69 per block for this plane width), carrying each row's partial sums from
    # block to block; the forward and the input gradient must still equal the dense layer's,
    # and on any thread count give the same bits
    torch.manual_seed(3)
    conv, mask = masked_conv(160, 144, 3, 1, 1, 0.05, torch.float32)
    x = torch.randn(4, 160, 9, 9)
    g = torch.randn(4, 144, 9, 9)
    x_ref = x.clone().requires_grad_()
    conv(x_ref).backward(g)
    results = []
    for threads in (None, 1):
        sparse = SparseConv2d(copy.deepcopy(conv), mask, "cpp", "planes", threads=threads)
        xi = x.clone().requires_grad_()
        y = sparse(xi)
        y.backward(g)
        assert torch.allclose(y, conv(x), rtol=1e-5, atol=1e-5)
        assert xi.grad is not None
        assert torch.allclose(xi.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
        results.append((y, xi.grad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(extension() is None, reason="needs the compiled kernels")
def test_large_outputs_reuse_their_memory_until_released() -> None:
    # a freed large output's memory goes to the next output of its size (no fresh pages to
    # fault and zero each step), holds its values like any tensor, and is freed on request
    ext = extension()
    gc.collect()  # outputs of earlier tests still in reference cycles
    release_cached_blocks()
    x = torch.randn(4, 16, 128, 128)  # padded: 4 * 16 * 130 * 130 floats, over 2 MiB
    ops = BoundKernels(x, "cpp")
    first = ops.phase_planes(x, 1, 1, 1, 130, 130, 1)
    address = first.data_ptr()
    assert ext.cached_bytes() == 0
    del first
    held = ext.cached_bytes()
    assert held >= 4 * 16 * 130 * 130 * 4
    second = ops.phase_planes(x, 1, 1, 1, 130, 130, 1)
    assert second.data_ptr() == address  # the same block again
    assert ext.cached_bytes() == 0
    assert torch.equal(second, F.pad(x, (1, 1, 1, 1)))
    small = ops.phase_planes(x[:, :1, :8, :8], 1, 1, 1, 10, 10, 1)  # under 2 MiB: PyTorch's
    del small
    assert ext.cached_bytes() == 0
    del second
    assert release_cached_blocks() == held
    assert ext.cached_bytes() == 0
    assert release_cached_blocks() == 0
