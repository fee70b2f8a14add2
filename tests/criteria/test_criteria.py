"""Criteria: the built-in prune, growth and redistribution rules, criteria of your own, and what
the engine checks of them."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import sparselearn as sl
from sparselearn.criteria import LayerView
from tests.helpers import (
    batches,
    distinct_values,
    make_batch,
    sparse_mlp,
    train_step,
)


def test_set_removes_weights_closest_to_zero_on_both_sides() -> None:
    w = torch.tensor([-5.0, -4.0, -3.0, -0.2, -0.1, 0.1, 0.2, 3.0, 4.0, 5.0])
    view = LayerView("w", w, torch.ones(10, dtype=torch.bool))
    scores = sl.PRUNE.get("set").fn(view)
    removed = torch.sort(scores).indices[:4]
    # the 2019 code removed the most negative weights (-5, -4): the paper removes those nearest 0
    assert torch.equal(torch.sort(w[removed]).values, torch.tensor([-0.2, -0.1, 0.1, 0.2]))


def test_set_removes_the_same_fraction_of_each_sign() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.cat([torch.rand(300, generator=g) + 0.01, -(torch.rand(100, generator=g) + 0.01)])
    view = LayerView("w", w, torch.ones(400, dtype=torch.bool))
    removed = torch.sort(sl.PRUNE.get("set").fn(view)).indices[:120]
    assert int((w[removed] > 0).sum()) == 90  # 30% of the positives
    assert int((w[removed] < 0).sum()) == 30  # 30% of the negatives


def test_global_momentum_growth_picks_the_largest_momentum_across_layers() -> None:
    model, opt, engine = sparse_mlp(update_every=0, growth="global_momentum", redistribution="none")
    train_step(model, opt, *make_batch("mlp"))
    names = list(engine.masks)
    params = dict(model.named_parameters())
    old = {n: m.clone() for n, m in engine.masks.items()}
    mom = {}
    for i, n in enumerate(names):
        mom[n] = distinct_values(params[n].shape, 10 + i) * (10.0 if n == "fc3.weight" else 1.0)
        opt.state[params[n]]["momentum_buffer"].copy_(mom[n])
    update = engine.update_masks(prune_rate=0.2)
    flat = torch.cat([torch.where(~old[n], mom[n], -1.0).reshape(-1) for n in names])
    threshold = torch.sort(flat, descending=True).values[update.total_grown - 1]
    for n in names:
        assert torch.equal(engine.masks[n] & ~old[n], (mom[n] >= threshold) & ~old[n])


def test_momentum_neuron_fills_each_neurons_quota_first() -> None:
    m = torch.zeros(4, 10)
    m[0] = 10.0  # neuron 0 holds most of the momentum ...
    m[1:] = torch.linspace(0.1, 1.0, 10)
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[0, :5] = True  # ... but only 5 free positions
    view = LayerView("w", torch.zeros(4, 10), mask, signals={"momentum": lambda: m}, n_grow=12)
    scores = sl.GROWTH.get("momentum_neuron").fn(view)
    ranked = torch.sort(torch.where(mask, -1.0, scores).reshape(-1), descending=True).indices
    rows = torch.bincount(ranked[:12] // 10, minlength=4)
    share = m.mean(1) / m.mean(1).sum()  # 0.86 / 0.05 / 0.05 / 0.05 of 12 -> quotas 10, 0, 0, 0
    assert torch.floor(share * 12).long().tolist() == [10, 0, 0, 0]
    # neuron 0's quota is capped by its 5 free slots; the other 7 go to the largest momentum left
    assert rows[0] == 5
    grown_values = torch.sort(m.reshape(-1)[ranked[5:12]], descending=True).values
    expected = torch.tensor([1.0, 1.0, 1.0, 0.9, 0.9, 0.9, 0.8])
    assert torch.allclose(grown_values, expected)


def test_custom_criterion_in_a_few_lines() -> None:
    @sl.register_growth("test_gradient_x_weight", needs=("grad",))
    def gradient_x_momentum(layer: sl.LayerView) -> torch.Tensor:
        return layer.grad.abs() + layer.weight.abs()

    try:
        model, opt, engine = sparse_mlp("rigl", update_every=2, growth="test_gradient_x_weight")
        assert "test_gradient_x_weight" in sl.choices("growth")
        for x, y in batches("mlp", 4):
            train_step(model, opt, x, y)
        assert [u.kind for u in engine.history] == ["regrow", "regrow"]
        with pytest.raises(ValueError, match="already registered"):
            sl.register_growth("test_gradient_x_weight")(gradient_x_momentum)
    finally:
        sl.GROWTH.unregister("test_gradient_x_weight")


def test_a_criterion_reading_an_undeclared_signal_is_told_so() -> None:
    @sl.register_growth("test_sneaky")
    def sneaky(layer: sl.LayerView) -> torch.Tensor:
        return layer.momentum.abs()

    try:
        model, opt, engine = sparse_mlp("set", update_every=0, growth="test_sneaky")
        train_step(model, opt, *make_batch("mlp"))
        with pytest.raises(RuntimeError, match=r"registered without needs=\('momentum',\)"):
            engine.update_masks()
    finally:
        sl.GROWTH.unregister("test_sneaky")


@pytest.mark.parametrize(
    ("elementwise", "match"),
    [(False, "must return a tensor of shape"), (True, "must return scores of the shape of its")],
)
def test_a_criterion_returning_the_wrong_shape_is_reported(elementwise: bool, match: str) -> None:
    @sl.register_prune("test_bad_shape", elementwise=elementwise)
    def bad(layer: sl.LayerView) -> torch.Tensor:
        return layer.weight.reshape(-1)[:1]  # neither the weight's shape nor its own input's

    try:
        _model, _opt, engine = sparse_mlp(update_every=0, prune="test_bad_shape")
        with pytest.raises(TypeError, match=match):
            engine.update_masks()
    finally:
        sl.PRUNE.unregister("test_bad_shape")


def test_an_elementwise_prune_criterion_sees_only_the_active_weights_and_agrees() -> None:
    # the same score registered both ways must give the same masks, step for step; the
    # elementwise one is called on 1-D tensors of the active positions only
    def score(layer: sl.LayerView) -> torch.Tensor:
        return (layer.grad * layer.weight).abs() + layer.weight.abs()

    seen: list[tuple[int, ...]] = []

    def elementwise(layer: sl.LayerView) -> torch.Tensor:
        seen.append(tuple(layer.weight.shape))
        assert layer.grad.shape == layer.weight.shape == layer.mask.shape
        return score(layer)

    sl.register_prune("test_whole", needs=("grad",))(score)
    sl.register_prune("test_elementwise", needs=("grad",), elementwise=True)(elementwise)
    try:
        masks = []
        for prune in ("test_whole", "test_elementwise"):
            model, opt, engine = sparse_mlp("rigl", update_every=2, prune=prune, init="uniform")
            for x, y in batches("mlp", 8):
                train_step(model, opt, x, y)
            assert [u.kind for u in engine.history] == ["regrow"] * 4
            masks.append({k: v.clone() for k, v in engine.masks.items()})
            engine.remove()
        assert masks[0].keys() == masks[1].keys()
        for name in masks[0]:
            assert torch.equal(masks[0][name], masks[1][name]), name
        # fc1 (20x32 at 20%: 128 active) and the others: 1-D, the active count each
        assert seen
        assert all(len(shape) == 1 for shape in seen)
        assert (128,) in seen
    finally:
        sl.PRUNE.unregister("test_whole")
        sl.PRUNE.unregister("test_elementwise")


def test_a_redistribution_returns_a_number_or_a_mean_or_total_over_positions() -> None:
    from sparselearn.criteria import Redistribution
    from sparselearn.engine.placement import WHOLE

    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    mask = torch.tensor([[True, True], [False, True]])
    view = LayerView("w", w, mask)

    def stat(fn: Any) -> float:
        return WHOLE.statistic(Redistribution("t", fn, frozenset(), ""), view)

    assert stat(lambda layer: layer.mean(layer.weight.abs(), where=layer.mask)) == pytest.approx(
        3.5 / 3
    )
    assert stat(lambda layer: layer.total(layer.weight, where=layer.mask)) == -0.5
    assert stat(lambda layer: layer.total(layer.mask)) == 3.0  # a bool tensor: its count
    assert stat(lambda layer: layer.mean(layer.weight)) == 2.5 / 4  # every position
    assert stat(lambda layer: 7) == 7.0
