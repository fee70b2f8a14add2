"""`sl.accelerate`: the accelerated training path follows the masked one, memory follows the
active weights, layers are timed and chosen (threads, dense inference), and what it refuses."""

from __future__ import annotations

import importlib
import io
import weakref
from typing import Any

import pytest
import torch
from torch import nn

import sparselearn as sl
from sparselearn.accel import SparseConv1D, SparseConv2d, SparseLinear, SparseWeight, accelerate
from sparselearn.engine import CSRStorage
from sparselearn.kernels import (
    extension,
)
from tests.helpers import BACKENDS, batches, masked_conv, masked_linear, train_step


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


@pytest.mark.parametrize("method", ["rigl", "sparse_momentum", "dsr"])
def test_a_mask_update_reads_csr_values_without_building_the_dense_weight(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # magnitude pruning, per layer or global, reads the active weights only where they are
    # fewer than half: an accelerated layer gives its values, and the update builds no dense
    # copy of such a weight (the masks are those of the masked run)
    built: list[str] = []
    real = SparseWeight.dense

    def spy(self: SparseWeight) -> torch.Tensor:
        if 2 * self.nnz < self.rows * self.fan_in:
            built.append(str(self.shape))
        return real(self)

    monkeypatch.setattr(SparseWeight, "dense", spy)
    options: dict[str, Any] = {"update_every": 4}
    if method == "sparse_momentum":
        options["momentum_window"] = 2
    _, _, engine, _ = train(method, True, **options)
    assert engine.history
    assert all(u.kind == "regrow" for u in engine.history)
    assert built == []
    _, _, masked, _ = train(method, False, **options)
    for name, mask in masked.masks.items():
        assert torch.equal(engine.masks[name], mask)


def test_an_update_that_reads_no_gradient_holds_no_dense_gradient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # sparse momentum with a window: the window step's dense gradients went into the window
    # before the update, which then holds none of them (their memory is the update's)
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = sl.sparsify(
        model, opt, "sparse_momentum", 0.2, total_steps=40, update_every=4, momentum_window=2
    )
    accelerate(model, engine, mode="sparse")
    seen: list[tuple[int, int]] = []
    schedule = engine.schedule
    real = type(schedule).update

    def spy(masks: Any, config: Any, step: int, prune_rate: float | None = None) -> Any:
        probes = [
            m.weight_sparse.dense_grad_probe for m in model.modules() if isinstance(m, SparseLinear)
        ]
        seen.append((len(engine.signals.dense_grads), sum(p is not None for p in probes)))
        return real(schedule, masks, config, step, prune_rate)

    monkeypatch.setattr(schedule, "update", spy)
    for x, y in batches("mlp", 8):
        train_step(model, opt, x, y)
    assert seen == [(0, 0), (0, 0)]
    assert len(engine.history) == 2
    assert engine.signals.window == {}  # the window was read by the update, then restarted


def test_growth_frees_each_layers_signals_once_it_is_scored() -> None:
    # the dense gradients of an update are freed layer by layer as growth scores them, not
    # all at the end: the update never holds every layer's gradient and scores at once
    seen: list[list[str]] = []
    engine: sl.SparseEngine | None = None

    @sl.register_growth("test_grad_spy", needs=("grad",), elementwise=True)
    def spy(layer: sl.LayerView) -> torch.Tensor:
        assert engine is not None
        seen.append(sorted(engine.signals.dense_grads))
        return layer.grad.abs()

    try:
        torch.manual_seed(0)
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        engine = sl.sparsify(
            model, opt, "rigl", 0.2, total_steps=40, update_every=4, growth="test_grad_spy"
        )
        accelerate(model, engine, mode="sparse")
        for x, y in batches("mlp", 4):
            train_step(model, opt, x, y)
    finally:
        sl.GROWTH.unregister("test_grad_spy")
    names = sorted(layer.name for layer in engine.layers)
    order = [layer.name for layer in engine.layers]
    assert seen == [sorted(set(names) - set(order[:i])) for i in range(len(order))]
    assert len(engine.history) == 1
