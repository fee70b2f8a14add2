"""Mask updates in index form (engine/listed.py): the same masks as the whole-tensor update,
without a tensor of any weight's size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparselearn as sl
from sparselearn.accel import layers as accel_layers
from sparselearn.engine import listed
from sparselearn.engine.signals import FactoredWindow
from sparselearn.engine.update import MaskUpdater
from sparselearn.schedules import MaskUpdate


def _run(
    method: str, opt_kind: str, *, use_listed: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[sl.SparseEngine, nn.Module, int]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(48, 160), nn.ReLU(), nn.Linear(160, 160), nn.ReLU(), nn.Linear(160, 10)
    )
    opt: torch.optim.Optimizer
    if opt_kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    options: dict[str, object] = {"update_every": 3, "seed": 0}
    if method == "sparse_momentum":
        options["momentum_window"] = 2
    engine = sl.sparsify(model, opt, method, 0.15, total_steps=12, **options)
    sl.accelerate(model, engine, mode="sparse", live_rounds=0)
    calls = 0
    regrow = listed.regrow

    def counted(updater: MaskUpdater, rate: float) -> MaskUpdate:
        nonlocal calls
        calls += 1
        return regrow(updater, rate)

    monkeypatch.setattr(listed, "regrow", counted)
    if not use_listed:
        monkeypatch.setattr(listed, "applies", lambda updater: False)
    else:
        # no tensor of a weight's size: the mask is never built
        def refuse(self: object) -> torch.Tensor:
            raise AssertionError("a dense mask was built")

        monkeypatch.setattr(accel_layers.SparseWeight, "mask", refuse)
    g = torch.Generator().manual_seed(1)
    windows = []
    for _ in range(12):
        x, y = torch.randn(24, 48, generator=g), torch.randint(0, 10, (24,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        windows += [type(w) for w in engine.signals.window.values()]
    monkeypatch.undo()
    if method == "sparse_momentum":
        assert FactoredWindow in windows  # the window held factors, not a dense buffer
    return engine, model, calls


@pytest.mark.parametrize("method", ["rigl", "sparse_momentum", "dsr", "set"])
@pytest.mark.parametrize("opt_kind", ["sgd", "adamw"])
def test_listed_updates_equal_whole_tensor_updates_block_by_block(
    method: str, opt_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every layer's dense gradient as factors, and blocks of a few rows: growth is scored in
    # several blocks per layer and selects what the whole-tensor update selects
    runs = []
    for use_listed in (True, False):
        with monkeypatch.context() as m:
            m.setattr(accel_layers, "CAPTURE_ABOVE", 0)
            m.setattr(listed, "BLOCK", 500)
            runs.append(_run(method, opt_kind, use_listed=use_listed, monkeypatch=m))
    (e1, m1, calls), (e2, m2, _) = runs
    assert calls == len(e1.history) >= 2  # every update went through the listed path
    assert {u.kind for u in e1.history} == {"regrow"}
    for name, mask in e1.masks.items():
        assert torch.equal(mask, e2.masks[name]), name
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert [u.grown for u in e1.history] == [u.grown for u in e2.history]
    assert abs(e1.density() - 0.15) < 1e-3


def test_a_criterion_that_sees_the_whole_layer_takes_the_whole_tensor_update() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # momentum_neuron shares a layer's growth among its rows: not elementwise
    engine = sl.sparsify(
        model,
        opt,
        "sparse_momentum",
        0.3,
        total_steps=10,
        update_every=2,
        growth="momentum_neuron",
        momentum_window=2,
    )
    sl.accelerate(model, engine, mode="sparse", live_rounds=0)
    assert not listed.applies(engine._updater)
