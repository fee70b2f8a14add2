"""The kernels as PyTorch operators: schemas, fake implementations, and compiling accelerated
models with them."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import sparselearn as sl
from sparselearn.accel import SparseLinear, SparseWeight, accelerate
from sparselearn.kernels import REFERENCE, extension, kernels_for
from sparselearn.kernels import ops as kops
from sparselearn.models import create_model

KERNELS = [REFERENCE] + ([0, 1] if extension() is not None else [])


def _linear_args(kernels: int) -> dict[str, tuple[Any, ...]]:
    """Arguments of each Linear operator on a 40x30 weight at 30%, a batch of 37."""
    torch.manual_seed(0)
    w = SparseWeight(torch.randn(40, 30), torch.rand(40, 30) < 0.3)
    val = w.values.detach()
    x, g = torch.randn(37, 30), torch.randn(37, 40)
    xp, gp = kops.pack(x, kernels), kops.pack(g, kernels)
    bias = torch.randn(40)
    return {
        "pack": (x, kernels),
        "pack_sum": (x, kernels),
        "spmm": (w.crow, w.col, val, xp, 40, 37, None, bias, kernels),
        "sampled": (w.crow, w.col, gp, xp, kernels),
        "linear_forward": (x, w.crow, w.col, val, 40, bias, kernels),
        "linear_rows": (x[:2], w.crow, w.col, val, 40, bias, kernels),
        "linear_backward": (
            w.crow, w.col, w.crow_t, w.col_t, w.perm, w.perm_inv, val, g, xp, True, kernels
        ),
    }  # fmt: skip


def _conv_args(kernels: int, batch: int, stride: int, pad: int) -> dict[str, tuple[Any, ...]]:
    """Arguments of the convolution operators: 3x3 over 4 -> 6 channels of 7x7 planes, 30%;
    a batch of 16 runs on batch panels in the compiled kernels (stride 1), a batch of 2 not."""
    torch.manual_seed(batch + stride + pad)
    w = SparseWeight(torch.randn(6, 4, 3, 3), torch.rand(6, 4, 3, 3) < 0.3)
    val = w.values.detach()
    x = torch.randn(batch, 4, 7, 7)
    oh = (7 + 2 * pad - 3) // stride + 1
    y, saved = kops.conv2d_forward(w.crow, w.col, val, x, 6, 3, 3, stride, pad, pad, None, kernels)
    g = torch.randn_like(y)
    hq = oh + 2  # the phase planes a stride-s convolution reads (kh' = 1 for 3x3 at stride 3)
    return {
        "conv2d_forward": (w.crow, w.col, val, x, 6, 3, 3, stride, pad, pad, torch.randn(6),
                           kernels),
        "conv2d_backward": (w.crow, w.col, w.crow_t, w.col_t, val[w.perm], g,
                            x if saved.numel() == 0 else saved, 4, 7, 7, 3, 3, stride, pad, pad,
                            True, True, kernels),
        "phase_planes": (x, 2, pad, pad, 5, 5, 4, kernels),
        "phase_planes_grad": (torch.randn(batch, 16, 5, 5), 2, pad, pad, 7, 7, 4, kernels),
        "patches": (x, 3, 3, stride, pad, pad, oh, oh, kernels),
        "patches_grad": (torch.randn(batch * oh * oh, 36), batch, 4, 7, 7, 3, 3, stride, pad,
                         pad, oh, oh, kernels),
        "conv2d_forward_phases": (w.crow, w.col, val, x, 6, 3, 3, 1, pad, pad, hq, hq, None,
                                  kernels),
    }  # fmt: skip


def _other_args(kernels: int) -> dict[str, tuple[Any, ...]]:
    torch.manual_seed(5)
    x = torch.randn(4, 3, 8, 10)
    y, index = kops.max_pool2d(x, 2, True, kernels)
    mean, invstd = x.mean((0, 2, 3)), torch.rand(3) + 0.5
    return {
        "dropout": (x, 0.7, torch.tensor(123), kernels),
        "max_pool2d": (x, 2, True, kernels),
        "max_pool2d_backward": (torch.randn_like(y), index, 8, 10, 2, kernels),
        "batch_norm_forward": (x, torch.rand(3), torch.randn(3), 1e-5, True, kernels),
        "batch_norm_apply": (x, torch.rand(3), torch.randn(3), True, kernels),
        "batch_norm_backward": (torch.randn_like(x), x, mean, invstd, torch.rand(3),
                                torch.randn(3), True, True, kernels),
        "relu_grad": (torch.randn_like(x), x.relu(), REFERENCE),  # PyTorch's everywhere
    }  # fmt: skip


CASES = [
    *[(name, "linear") for name in _linear_args(REFERENCE)],
    *[(name, (16, 1, 1)) for name in _conv_args(REFERENCE, 16, 1, 1)],
    *[(name, (2, 2, 0)) for name in ("conv2d_forward", "conv2d_backward", "patches")],
    ("conv2d_forward", (16, 1, 0)),  # unpadded: x itself is what the backward reads
    *[(name, "other") for name in _other_args(REFERENCE)],
]


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize(("name", "case"), CASES)
def test_each_operator_passes_pytorchs_checks(name: str, case: Any, kernels: int) -> None:
    # torch.library.opcheck: the schema matches what the implementation does (no mutation, no
    # aliasing), the fake implementation gives the real outputs' shapes, strides and dtypes,
    # and the operator survives tracing (what torch.compile and torch.export do)
    if case == "linear":
        args = _linear_args(kernels)[name]
    elif case == "other":
        args = _other_args(kernels)[name]
    else:
        args = _conv_args(kernels, *case)[name]
    torch.library.opcheck(getattr(kops, name).op, args)


@pytest.mark.skipif(extension() is None, reason="needs the compiled kernels")
def test_compiled_and_pytorch_implementations_agree() -> None:
    # through the operator (as compiled graphs call it) and directly (as eager layers do)
    ref, comp = _linear_args(REFERENCE), _linear_args(0)
    for name in ("spmm", "sampled", "linear_forward", "linear_backward", "linear_rows"):
        a = _tuple(getattr(kops, name).op(*ref[name]))
        b = _tuple(getattr(kops, name).op(*comp[name]))
        direct = _tuple(getattr(kops, name)(*comp[name]))
        for u, v in zip(b, direct, strict=True):
            assert torch.equal(u, v), name
        for u, v in zip(a, b, strict=True):
            assert torch.allclose(u, v, rtol=1e-5, atol=1e-5), name


def _tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def test_a_bad_kernels_argument_is_refused() -> None:
    with pytest.raises(ValueError, match="kernels must be -1"):
        kops.pack(torch.randn(3, 4), -2)


def _accelerated_mlp(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 10))  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = sl.sparsify(model, opt, method="set", density=0.2, update_every=3)
    accelerate(model, engine, mode="sparse")
    return model, opt, engine


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(24, 32, generator=gen), torch.randint(0, 10, (24,), generator=gen)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_fullgraph_compile_of_an_accelerated_mlp_trains_as_eager(backend: str) -> None:
    # no graph break at the sparse layers (fullgraph=True raises on one); the steps and mask
    # updates give what the eager model gives, to rounding
    eager, opt_e, _ = _accelerated_mlp()
    model, opt, engine = _accelerated_mlp()
    if backend == "torch":
        for m in model.modules():
            if isinstance(m, SparseLinear):
                m.backend = "torch"
        for m in eager.modules():
            if isinstance(m, SparseLinear):
                m.backend = "torch"
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    want = _train(eager, opt_e, 7)
    got = _train(compiled, opt, 7)
    assert engine.history  # masks changed on the way (steps 3 and 6)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    for a, b in zip(eager.parameters(), model.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def _zoo_batch(name: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "tiny-gpt":
        idx = torch.randint(0, 50, (2, 16), generator=gen)
        return idx, torch.randint(0, 50, (2, 16), generator=gen)
    return torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)


def _zoo(name: str) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = create_model(
        name, (16,) if name == "tiny-gpt" else (3, 32, 32), 50 if name == "tiny-gpt" else 10
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # RigL: the dense gradient on update steps (the probes), and mask updates along the way
    engine = sl.sparsify(model, opt, method="rigl", density=0.2, update_every=2, total_steps=50)
    accelerate(model, engine, mode="sparse")
    return model, opt, engine


@pytest.mark.parametrize("name", ["resnet18", "vgg-d", "wrn-16-8", "tiny-gpt"])
def test_fullgraph_compile_of_zoo_models_trains_as_eager(name: str) -> None:
    # a CNN with BatchNorm, max pooling and strided convolutions, one with dropout, and a
    # transformer: one graph each (fullgraph), through mask updates, and the eager numbers
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        model, opt, engine = _zoo(name)
        run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        gen = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(5):
            x, y = _zoo_batch(name, gen)
            torch.manual_seed(2)  # the same dropout seeds in both runs
            opt.zero_grad()
            out = run(x)
            loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
            loss.backward()
            opt.step()
            losses.append(float(loss))
        assert len(engine.history) == 2  # masks changed at steps 2 and 4
        results.append(losses)
    assert results[1] == pytest.approx(results[0], rel=1e-3, abs=1e-4)


def test_recompiles_over_many_mask_updates_are_bounded() -> None:
    # the graphs of a step that produces the dense gradient and of one that does not; mask
    # updates themselves (new values, same number of them) recompile nothing (LeNet-5: sparse
    # convolutions and Linear layers, and a graph that compiles in seconds)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    model, opt, engine = _zoo("lenet5")
    run = torch.compile(model, fullgraph=True, backend="eager")
    gen = torch.Generator().manual_seed(1)
    for _ in range(12):
        x, y = _zoo_batch("lenet5", gen)
        opt.zero_grad()
        nn.functional.cross_entropy(run(x), y).backward()
        opt.step()
    assert len(engine.history) == 6
    assert counters["stats"]["unique_graphs"] <= 2


@pytest.mark.parametrize("name", ["mlp", "resnet18"])
def test_export_of_an_accelerated_model_runs_and_equals_eager(name: str) -> None:
    if name == "mlp":
        model, _, _ = _accelerated_mlp()
        x = torch.randn(5, 32)
    else:
        model, _, _ = _zoo(name)
        x = torch.randn(2, 3, 32, 32)
    model.eval()
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("sparselearn." in t for t in targets)  # the sparse products are operators
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)
    copy.deepcopy(program)  # a program holds tensors and operators only


def test_kernels_for_says_which_implementation() -> None:
    x = torch.randn(3, 4)
    assert kernels_for(x, "torch") == REFERENCE
    assert kernels_for(x.half(), "auto") == REFERENCE
    if extension() is not None:
        assert kernels_for(x, "auto") == 0
        assert kernels_for(x, "cpp", threads=1) == 1


def test_add_relu_gives_the_bits_of_add_then_relu() -> None:
    # the end of a residual block: forward and both gradients equal F.relu(x.add_(o)), NaN
    # and zeros included; x is modified in place and returned, as before
    from sparselearn.accel.activation import add_relu_

    torch.manual_seed(3)
    base, other = torch.randn(4, 5, 6), torch.randn(4, 5, 6)
    base[0, 0, :3] = torch.tensor([float("nan"), 0.0, -0.0])
    other[0, 0, :3] = 0.0
    g = torch.randn(4, 5, 6)
    results = []
    for fn in (add_relu_, lambda x, o: nn.functional.relu(x.add_(o), inplace=True)):
        a, o = base.clone().requires_grad_(), other.clone().requires_grad_()
        x = a * 1.0  # a non-leaf, as a BatchNorm's output is
        y = fn(x, o)
        assert y is x
        y.backward(g)
        assert a.grad is not None
        assert o.grad is not None
        results.append((y.detach(), a.grad, o.grad))
    for u, v in zip(*results, strict=True):
        assert torch.equal(u.nan_to_num(7.0), v.nan_to_num(7.0))
    with pytest.raises(ValueError, match="adds a tensor of x's shape"):
        add_relu_(torch.zeros(2, 3), torch.zeros(3))
