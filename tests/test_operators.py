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
from sparselearn.kernels import extension, ops_for
from sparselearn.kernels import ops as kops

KERNELS = [kops.REFERENCE] + ([0, 1] if extension() is not None else [])


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
        "linear_backward": (
            w.crow, w.col, w.crow_t, w.col_t, w.perm, w.perm_inv, val, g, xp, True, kernels
        ),
    }  # fmt: skip


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize(
    "name", ["pack", "pack_sum", "spmm", "sampled", "linear_forward", "linear_backward"]
)
def test_each_operator_passes_pytorchs_checks(name: str, kernels: int) -> None:
    # torch.library.opcheck: the schema matches what the implementation does (no mutation, no
    # aliasing), the fake implementation gives the real outputs' shapes, strides and dtypes,
    # and the operator survives tracing (what torch.compile and torch.export do)
    op = getattr(kops, name).op
    torch.library.opcheck(op, _linear_args(kernels)[name])


@pytest.mark.skipif(extension() is None, reason="needs the compiled kernels")
def test_compiled_and_pytorch_implementations_agree() -> None:
    # through the operator (as compiled graphs call it) and directly (as eager layers do)
    ref, comp = _linear_args(kops.REFERENCE), _linear_args(0)
    for name in ("spmm", "sampled", "linear_forward", "linear_backward"):
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


def test_export_of_an_accelerated_model_runs_and_equals_eager() -> None:
    model, _, _ = _accelerated_mlp()
    model.eval()
    x = torch.randn(5, 32)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("sparselearn." in t for t in targets)  # the sparse product is one operator
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), rtol=1e-6, atol=1e-6)
    copy.deepcopy(program)  # a program holds tensors and operators only


def test_kernels_for_says_which_implementation() -> None:
    x = torch.randn(3, 4)
    assert kops.kernels_for(x, "torch") == kops.REFERENCE
    assert kops.kernels_for(x.half(), "auto") == kops.REFERENCE
    if extension() is not None:
        assert kops.kernels_for(x, "auto") == 0
        assert kops.kernels_for(x, "cpp", threads=1) == 1
        assert ops_for(x, "cpp", 1).kernels == 1
