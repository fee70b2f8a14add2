"""`sl.flops`: inference and training-step FLOPs, dense, sparse and by the paper's accounting."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import sparselearn as sl


def model_and_opt() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 10))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_static_masks_count_three_sparse_products() -> None:
    model, opt = model_and_opt()
    engine = sl.sparsify(model, opt, method="static", density=0.25, init="uniform")
    report = sl.flops(model, engine, (30,))
    assert report.dense_gradient_share == 0.0
    first = report.layers[0]
    active = int(engine.masks["0.weight"].sum())
    assert first.inference_dense == 2 * 30 * 40
    assert first.inference_sparse == 2 * active
    assert first.train_dense == 3 * 2 * 30 * 40
    assert first.train_sparse == first.train_paper == 3 * 2 * active
    total_active = sum(int(m.sum()) for m in engine.masks.values())
    assert report.paper_speedup == pytest.approx((30 * 40 + 40 * 10) / total_active)


def test_sparse_momentum_needs_the_dense_gradient_every_step() -> None:
    model, opt = model_and_opt()
    engine = sl.sparsify(model, opt, method="sparse_momentum", density=0.25, total_steps=1000)
    report = sl.flops(model, engine, (30,))
    assert report.dense_gradient_share == 1.0
    first = report.layers[0]
    assert first.train_sparse == 2 * first.inference_sparse + first.inference_dense
    assert report.train_speedup < report.paper_speedup


@pytest.mark.parametrize(
    ("options", "share"),
    [
        # RigL: a dense gradient on update steps only: every 100 steps up to 75% of 1000 steps
        ({"method": "rigl", "update_every": 100}, 7 / 1000),
        # a momentum window of 10 steps before each of the updates at 100, 200, ..., 900
        ({"method": "sparse_momentum", "update_every": 100, "momentum_window": 10}, 90 / 1000),
    ],
)
def test_dense_gradient_share_follows_the_schedule(options: dict[str, Any], share: float) -> None:
    model, opt = model_and_opt()
    engine = sl.sparsify(model, opt, density=0.25, total_steps=1000, **options)
    assert sl.flops(model, engine, (30,)).dense_gradient_share == pytest.approx(share)
