"""The check of an accelerated layer's choice in the run: dense steps, the check, the report."""

from __future__ import annotations

import copy
import importlib
import time
from typing import Any

import pytest
import torch
from torch import nn

import sparselearn as sl
from sparselearn.accel import SparseConv1D, SparseConv2d, SparseLinear, accelerate
from sparselearn.accel.live import LiveCheck, Way
from sparselearn.kernels import extension


class _Conv1D(nn.Module):
    """The layout of Hugging Face's Conv1D (``x @ W + b``, W of shape (in, out))."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))
        self.bias = nn.Parameter(torch.randn(n_out))


def _layer(kind: str) -> tuple[SparseLinear | SparseConv2d, torch.Tensor]:
    torch.manual_seed(2)
    if kind == "linear":
        lin = nn.Linear(12, 7)
        return SparseLinear(lin, torch.rand(lin.weight.shape) < 0.4), torch.randn(5, 12)
    if kind == "conv":
        conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        return SparseConv2d(conv, torch.rand(conv.weight.shape) < 0.4), torch.randn(3, 4, 9, 9)
    conv1d = _Conv1D(12, 7)
    mask = torch.rand(conv1d.weight.shape) < 0.4
    return SparseConv1D(conv1d, mask), torch.randn(2, 5, 12)


def _step(
    layer: SparseLinear | SparseConv2d, x: torch.Tensor, g: torch.Tensor
) -> list[torch.Tensor]:
    """Output, input gradient, values' and bias' gradients of one step."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = layer(x)
    y.backward(g)
    assert layer.bias is not None
    grads = [x.grad, layer.weight_sparse.values.grad, layer.bias.grad]
    assert all(gr is not None for gr in grads)
    return [y.detach(), *grads]


@pytest.mark.parametrize("kind", ["linear", "conv", "conv1d"])
def test_dense_steps_agree_with_the_kernels_and_feed_the_dense_gradient(kind: str) -> None:
    # steps="dense": the dense product of the weights built from the values; the output and
    # every gradient equal the kernels' to rounding, and the engine's dense gradient (on the
    # steps that ask for it) is the same
    layer, x = _layer(kind)
    g = torch.randn_like(layer(x))
    w = layer.weight_sparse
    received = []
    for steps in ("sparse", "dense"):
        layer.steps = steps
        w.arm_dense_grad(True)  # a fresh probe, with no gradient yet
        received.append(_step(layer, x, g))
        assert w.dense_grad_probe is not None
        assert w.dense_grad_probe.grad is not None
        received[-1].append(w.dense_grad_probe.grad)
    assert "steps=dense" in repr(layer)
    sparse, dense = received
    for a, b in zip(sparse, dense, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert dense[-1].shape == w.shape
    # the values' gradient is the dense gradient at the active positions
    assert torch.allclose(dense[2], dense[-1][w.mask()], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="steps must be 'sparse' or 'dense', got 'fast'"):
        layer.steps = "fast"


def _slow_when(layer: nn.Module, slow: Way | str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the layer's forward take 20 ms longer when it computes ``slow``'s way (a string:
    every way of those steps)."""
    compute = layer._compute

    def timed(x: torch.Tensor) -> torch.Tensor:
        way = Way(layer.steps, layer.threads)
        if way == slow or way.steps == slow:
            time.sleep(0.02)
        return compute(x)

    monkeypatch.setattr(layer, "_compute", timed)


@pytest.mark.parametrize("slow", [Way("sparse"), Way("dense")])
def test_the_check_keeps_the_faster_way(slow: Way, monkeypatch: pytest.MonkeyPatch) -> None:
    layer, x = _layer("linear")
    verdicts: list[tuple[Way, dict[Way, float]]] = []
    ways = [Way("sparse"), Way("dense")]
    layer.live = LiveCheck(ways, lambda w, m: verdicts.append((w, m)), rounds=3, warmup=1)
    _slow_when(layer, slow, monkeypatch)
    seen = []
    for _ in range(8):  # (1 + 3) rounds of 2 ways
        layer(x).sum().backward()
        seen.append(layer.steps)  # the way this step computed
    assert seen == ["sparse", "dense"] * 4  # in turns
    assert len(verdicts) == 0  # the last step's backward has run; the next forward decides
    layer(x).sum().backward()
    ((best, medians),) = verdicts
    assert best != slow
    assert set(medians) == set(ways)
    assert medians[slow] > 20.0 > medians[best]
    assert getattr(layer, "live") is None  # noqa: B009 (mypy narrowed it above)
    assert (layer.steps, layer.threads) == (best.steps, best.threads)


def test_the_check_counts_only_steps_with_a_backward() -> None:
    # a forward whose backward never ran (an evaluation with gradients recorded, a step given
    # up) is not timed
    layer, x = _layer("linear")
    check = LiveCheck([Way("sparse"), Way("dense")], lambda w, m: None, rounds=2, warmup=2)
    layer.live = check
    for i in range(8):  # calls 4 to 7 are timed (two untimed rounds of two ways first)
        y = layer(x)
        if i != 5:
            y.sum().backward()
    assert [len(check.times[Way("sparse")]), len(check.times[Way("dense")])] == [2, 1]
    assert layer.live is check
    layer(x)
    assert layer.live is None


def test_no_check_without_gradients_or_in_eval_mode() -> None:
    layer, x = _layer("linear")
    check = LiveCheck([Way("sparse"), Way("dense")], lambda w, m: None, rounds=1, warmup=0)
    layer.live = check
    with torch.no_grad():
        layer(x)
    layer.eval()
    layer(x).sum().backward()
    assert check.times == {Way("sparse"): [], Way("dense"): []}
    assert layer.live is check


def test_bad_checks_are_refused() -> None:
    with pytest.raises(ValueError, match="at least two ways"):
        LiveCheck([Way("sparse")], lambda w, m: None)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        LiveCheck([Way("sparse"), Way("dense")], lambda w, m: None, rounds=0)


def _mlp() -> tuple[nn.Sequential, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return model, opt, sl.sparsify(model, opt, method="static", density=0.2)


def test_accelerate_drops_a_sparse_layer_that_is_slower_in_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the timing before the run chose sparse kernels (on one thread, as on a noisy machine);
    # in the run the kernels are slower than the dense product, and the layer computes its
    # steps densely from then on, as the report says
    acc = importlib.import_module("sparselearn.accel.accelerate")
    monkeypatch.setattr(acc, "_time_turns", lambda fns, repeats: [5.0, 2.0, 1.0][: len(fns)])
    torch.set_num_threads(2)  # restored after each test (conftest)
    model, opt, engine = _mlp()
    x, target = torch.randn(16, 64), torch.randint(0, 10, (16,))
    report = accelerate(model, engine, x, live_rounds=2)
    first = model[0]
    assert isinstance(first, SparseLinear)
    assert first.live is not None
    slow = Way("sparse", report.layers[0].threads)
    _slow_when(first, "sparse", monkeypatch)
    for _ in range(len(first.live.ways) * 4 + 1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        opt.step()
    c0, c2 = report.layers
    assert getattr(first, "live") is None  # noqa: B009 (mypy narrowed it to not None above)
    assert c0.steps == "dense"
    assert c0.live is not None
    assert str(slow) in c0.live
    assert first.steps == "dense"
    assert report.dense_steps[:1] == ["0.weight"]
    assert c2.steps in ("sparse", "dense")
    assert c2.live is not None
    assert "in the run" in str(report)
    # the layer still trains (masked, memory of the active weights) and re-applies
    model2, _, engine2 = _mlp()
    again = accelerate(
        model2,
        engine2,
        mode="sparse",
        layers=report.accelerated,
        threads=report.thread_caps,
        dense_steps=report.dense_steps,
    )
    assert again.dense_steps == report.dense_steps
    assert model2[0].steps == "dense"


def test_live_check_arguments() -> None:
    model, _, engine = _mlp()
    with pytest.raises(ValueError, match="live_rounds must be >= 0"):
        accelerate(model, engine, torch.randn(4, 64), live_rounds=-1)
    with pytest.raises(ValueError, match="mode='auto' times them itself"):
        accelerate(model, engine, torch.randn(4, 64), dense_steps=["0.weight"])
    with pytest.raises(ValueError, match=r"dense_steps names \['1.weight'\]"):
        accelerate(model, engine, mode="sparse", dense_steps=["1.weight"])
    accelerate(model, engine, torch.randn(4, 64), live_rounds=0)
    for m in (model[0], model[2]):
        assert getattr(m, "live", None) is None


@pytest.mark.skipif(extension() is None, reason="needs the compiled kernels")
def test_the_check_times_one_thread_against_all() -> None:
    torch.set_num_threads(2)
    model, _, engine = _mlp()
    report = accelerate(model, engine, torch.randn(8, 64), mode="auto", backend="cpp")
    for name, module in (("0.weight", model[0]), ("2.weight", model[2])):
        choice = next(c for c in report.layers if c.name == name)
        if choice.chosen != "sparse":
            continue
        assert isinstance(module, SparseLinear)
        assert module.live is not None
        caps = {w.threads for w in module.live.ways if w.steps == "sparse"}
        assert caps == {None, 1}
        assert module.live.ways[0] == Way("sparse", choice.threads)  # the chosen way first
        assert module.live.ways[-1] == Way("dense")


def test_dense_steps_train_like_the_kernels() -> None:
    # a model whose layers compute densely trains to the same weights (to rounding)
    model, opt, engine = _mlp()
    twin = copy.deepcopy(model)
    opt2 = torch.optim.SGD(twin.parameters(), lr=0.05)
    engine2 = sl.sparsify(twin, opt2, method="static", density=0.2)
    engine2.load_state_dict(engine.state_dict())
    twin.load_state_dict(model.state_dict())
    accelerate(model, engine, mode="sparse")
    accelerate(twin, engine2, mode="sparse", dense_steps=["0.weight", "2.weight"])
    x, target = torch.randn(16, 64), torch.randint(0, 10, (16,))
    for m, o in ((model, opt), (twin, opt2)):
        for _ in range(5):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), target).backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(6, 12), (2, 3, 12)])
def test_the_check_times_every_way_before_an_inplace_activation(shape: tuple[int, ...]) -> None:
    # a ReLU(inplace=True) after the layer rewrites its output's history (on a reshaped,
    # 3-D output: a view's); the check still times the backward of every way
    layer, _ = _layer("linear")
    model = nn.Sequential(layer, nn.ReLU(inplace=True))
    check = LiveCheck([Way("sparse"), Way("dense")], lambda w, m: None, rounds=2, warmup=1)
    layer.live = check
    x = torch.randn(shape)
    for _ in range(6):
        model(x).sum().backward()
    assert {w: len(t) for w, t in check.times.items()} == {Way("sparse"): 2, Way("dense"): 2}
