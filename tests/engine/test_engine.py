"""The engine's public surface: summary, optimizers of every kind, calendar options."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

import sparselearn as sl
from tests.helpers import MLP, assert_inactive_zero, batches, train_step


def test_summary_is_a_per_layer_table() -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = sl.sparsify(model, opt, density=0.1, total_steps=100)
    text = engine.summary()
    lines = text.splitlines()
    assert lines[0].startswith("sparse_momentum: 3 sparsified tensors, target density 0.1, step 0")
    rows = {line.split()[0]: line.split() for line in lines if re.match(r"^(fc\d|total)", line)}
    assert set(rows) == {"fc1.weight", "fc2.weight", "fc3.weight", "total"}
    assert rows["fc1.weight"][1] == "32x20"
    for name, mask in engine.masks.items():
        active, total = int(mask.sum()), mask.numel()
        assert rows[name][2] == f"{100 * active / total:.2f}%"
        assert rows[name][3:] == [f"{active:,}", f"{total:,}"]
    active = sum(int(m.sum()) for m in engine.masks.values())
    assert active == round(0.1 * 1824) == 182  # the exact budget
    assert rows["total"][1:] == [f"{100 * active / 1824:.2f}%", f"{active:,}", "1,824"]
    assert repr(engine).startswith("SparseEngine(sparse_momentum")


def test_summary_says_which_weights_stay_dense_and_why() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "embed": nn.Embedding(30, 8),  # 240
            "rnn": nn.LSTM(8, 8),  # 2 * 256 weights, 2 * 32 biases
            "frozen": nn.Linear(8, 8, bias=False),  # 64
            "skipped": nn.Linear(8, 8, bias=False),  # 64, excluded
            "full": nn.Linear(8, 8, bias=False),  # 64, at density 1.0
            "released": nn.Linear(8, 8, bias=False),  # 64
            "kept": nn.Linear(8, 16, bias=False),  # 128, sparsified
            "norm": nn.LayerNorm(8),  # 16
        }
    )
    model["frozen"].weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine = sl.sparsify(
        model, opt, "static", 0.5, exclude=["skipped.weight"], layer_density={"full.weight": 1.0}
    )
    engine.release("released.weight")
    text = engine.summary()
    tail = text[text.index("dense: ") :].splitlines()
    assert tail[0] == "dense: 1,088 of the model's 1,216 weights (89.47%) are not sparsified:"
    rows = {" ".join(line.split()[:-4]): line.split()[-4:] for line in tail[1:]}
    assert rows == {
        "embeddings and positional tables": ["240", "in", "1", "tensor"],
        "norms": ["16", "in", "2", "tensors"],
        "biases": ["64", "in", "2", "tensors"],
        "other tensors of no layer type sparsified by default (include= adds them)": [
            "512",
            "in",
            "2",
            "tensors",
        ],
        "frozen (requires_grad=False)": ["64", "in", "1", "tensor"],
        "exclude=": ["64", "in", "1", "tensor"],
        "density 1.0 (layer_density, dense_first, dense_last)": ["64", "in", "1", "tensor"],
        "released (engine.release)": ["64", "in", "1", "tensor"],
    }


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "adagrad": lambda m: torch.optim.Adagrad(m.parameters(), lr=0.05),
    "rmsprop": lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-3),
    "rmsprop_momentum": lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-3, momentum=0.9),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
    "adamax": lambda m: torch.optim.Adamax(m.parameters(), lr=1e-3),
    "nadam": lambda m: torch.optim.NAdam(m.parameters(), lr=1e-3),
    "radam": lambda m: torch.optim.RAdam(m.parameters(), lr=1e-3),
    "adadelta": lambda m: torch.optim.Adadelta(m.parameters()),
    "sgd_foreach": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, foreach=True),
    "adam_fused": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, fused=True),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("method", ["sparse_momentum", "rigl", "dsr"])
def test_any_optimizer_works(name: str, method: str) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = OPTIMIZERS[name](model)
    engine = sl.sparsify(model, opt, method=method, density=0.2, total_steps=12, update_every=3)
    budget = sum(int(m.sum()) for m in engine.masks.values())
    for x, y in batches("mlp", 12):
        train_step(model, opt, x, y)
        assert_inactive_zero(engine, model)
    assert [u.kind for u in engine.history] == ["regrow"] * (3 if method != "rigl" else 2)
    assert sum(int(m.sum()) for m in engine.masks.values()) == budget


def test_start_at_delays_updates_and_update_every_zero_leaves_them_to_you() -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = sl.sparsify(model, opt, density=0.2, total_steps=20, update_every=2, start_at=0.5)
    for x, y in batches("mlp", 20):
        train_step(model, opt, x, y)
    assert [u.step for u in engine.history] == [10, 12, 14, 16, 18]
    engine.remove()
    manual = sl.sparsify(model, opt, density=0.2, total_steps=20, update_every=0)
    for x, y in batches("mlp", 5):
        train_step(model, opt, x, y)
    assert manual.history == []
    update = manual.update_masks()
    assert update.step == 5
    assert update.kind == "regrow"
    assert update.prune_rate == pytest.approx(manual.config.prune_rate_at(5))


def test_linear_and_constant_prune_rate_schedules() -> None:
    for schedule, expected in [
        ("linear", lambda p: 0.4 + (0.01 - 0.4) * p),
        ("constant", lambda p: 0.4),
    ]:
        torch.manual_seed(0)
        model = MLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        engine = sl.sparsify(
            model,
            opt,
            density=0.2,
            total_steps=20,
            update_every=4,
            prune_rate=0.4,
            prune_rate_min=0.01,
            prune_rate_schedule=schedule,
        )
        for x, y in batches("mlp", 20):
            train_step(model, opt, x, y)
        for u in engine.history:
            assert u.prune_rate == pytest.approx(expected(u.step / 20))


def test_logging_reports_updates(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with caplog.at_level("INFO", logger="sparselearn"):
        engine = sl.sparsify(model, opt, density=0.2, total_steps=20, update_every=2)
        for x, y in batches("mlp", 2):
            train_step(model, opt, x, y)
    assert "sparsify: sparse_momentum" in caplog.text
    u = engine.last_update
    assert u is not None
    assert f"step 2: regrow: pruned {u.total_pruned}, grown {u.total_grown}" in caplog.text


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_inactive_entries_become_exact_zeros_even_over_inf_and_nan(dtype: torch.dtype) -> None:
    model = nn.Linear(64, 48).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sl.sparsify(model, opt, method="static", density=0.3)
    layer = engine.layers[0]
    mask = engine.masks["weight"]
    g = torch.Generator().manual_seed(0)
    values = torch.randn(48, 64, generator=g).to(dtype)
    values[torch.rand(48, 64, generator=g) < 0.2] = float("nan")
    values[torch.rand(48, 64, generator=g) < 0.1] = float("-inf")
    for tensor in (values.clone(), values.t().clone().t()):  # contiguous, and not
        layer.zero_inactive_(tensor)
        assert (tensor[~mask] == 0).all()
        assert not torch.signbit(tensor[~mask]).any()  # +0, not -0
        kept, expected = tensor[mask], values[mask]
        assert torch.equal(kept.isnan(), expected.isnan())
        assert torch.equal(kept.nan_to_num(), expected.nan_to_num())  # active entries untouched
    # after a mask change, the new inactive set is what gets zeroed
    new = torch.rand(48, 64, generator=g) < 0.5
    layer.install(new)
    tensor = values.clone()
    layer.zero_inactive_(tensor)
    assert (tensor[~new] == 0).all()
    assert torch.equal(tensor[new].nan_to_num(), values[new].nan_to_num())


def test_masks_applied_once_hold_no_zeroing_words_until_used_again() -> None:
    # sparsify applies the masks once: a model accelerated right after holds no second
    # per-weight buffer for every layer at once; training steps build it (and agree)
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = sl.sparsify(model, opt, "static", 0.3)
    layers = engine.layers
    assert all(getattr(layer, "_zero", None) is None for layer in layers)
    assert_inactive_zero(engine, model)
    for x, y in batches("mlp", 3):
        train_step(model, opt, x, y)
    assert all(getattr(layer, "_zero", None) is not None for layer in layers)
    assert_inactive_zero(engine, model)
