"""The sparse layers' kernels against dense references: products, gradients, layouts, thread
counts, the compiled build against the PyTorch fallback, and the CSR structure's state."""

from __future__ import annotations

import copy
import gc
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from sparselearn.accel import SparseConv2d, SparseLinear, SparseWeight
from sparselearn.accel.layers import (
    PANEL_UNFOLD_MAX_POSITIONS,
    ROWS_MAX_BATCH,
    UNFOLD_MAX_POSITIONS,
)
from sparselearn.kernels import (
    REFERENCE,
    build,
    extension,
    kernels_for,
    release_cached_blocks,
)
from sparselearn.kernels import ops as kops
from tests.helpers import BACKENDS, BoundKernels, masked_conv, masked_linear


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


@given(
    batch=st.integers(1, ROWS_MAX_BATCH),
    n_in=st.integers(1, 90),
    n_out=st.integers(1, 40),
    density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    bias=st.booleans(),
    seed=st.integers(0, 1000),
)
@settings(max_examples=60, deadline=None)
def test_small_batch_inference_runs_row_products_that_match_the_dense_layer(
    batch: int,
    n_in: int,
    n_out: int,
    density: float,
    dtype: torch.dtype,
    bias: bool,
    seed: int,
) -> None:
    # rows of every length (empty ones, tails under a mask of the vector gathers), both
    # implementations, float64 reference; the compiled kernel gives the same bits on 1 and 2
    # threads
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias).to(dtype)
    mask = torch.rand(n_out, n_in) < density
    with torch.no_grad():
        lin.weight.mul_(mask)
    x = torch.randn(batch, 3, n_in, dtype=dtype)[:, 1]  # a strided batch
    want = F.linear(
        x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double()
    )
    outs = {}
    for backend in BACKENDS:
        for threads in (1, 2):
            layer = SparseLinear(copy.deepcopy(lin), mask, backend, threads=threads)
            with torch.inference_mode():
                y = layer(x)
            assert y.dtype == dtype
            assert y.shape == (batch, n_out)
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            assert torch.allclose(y.double(), want, rtol=tol, atol=tol)
            outs[backend, threads] = y
    if "cpp" in BACKENDS:
        assert torch.equal(outs["cpp", 1], outs["cpp", 2])


def test_small_batch_inference_keeps_leading_dimensions_and_autograd() -> None:
    torch.manual_seed(0)
    lin, mask = masked_linear(24, 16, 0.3, torch.float32)
    layer = SparseLinear(copy.deepcopy(lin), mask)
    x = torch.randn(1, 1, 24)
    with torch.no_grad():
        y = layer(x)  # a batch of one token of one sequence
    assert y.shape == (1, 1, 16)
    assert torch.allclose(y, lin(x), rtol=1e-5, atol=1e-5)
    # a gradient wanted: the training path, which gives the weight its gradient
    layer(x).sum().backward()
    assert layer.weight_sparse.values.grad is not None


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
