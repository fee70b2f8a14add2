"""The engine's surface for trainers and loggers: update hooks see every update once, and
sparsify(state=...) adopts saved masks without zeroing weights restored before it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparselearn as sl
from sparselearn.engine import MaskUpdate, SparseEngine


def _model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _steps(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(6, 12)).pow(2).mean().backward()
        opt.step()


def test_update_hooks_see_every_update_once_until_removed() -> None:
    model, opt = _model_and_optimizer()
    engine = sl.sparsify(model, opt, "set", 0.3, total_steps=40, update_every=4)
    seen: list[tuple[SparseEngine, MaskUpdate]] = []
    handle = engine.register_update_hook(lambda e, u: seen.append((e, u)))
    _steps(model, opt, 12)
    manual = engine.update_masks()
    assert [u for _, u in seen] == engine.history
    assert seen[-1][1] is manual
    assert all(e is engine for e, _ in seen)
    handle.remove()
    _steps(model, opt, 8)
    assert len(engine.history) > len(seen)


def test_state_given_to_sparsify_keeps_the_restored_weights() -> None:
    model, opt = _model_and_optimizer()
    engine = sl.sparsify(model, opt, "sparse_momentum", 0.2, total_steps=50, update_every=5)
    _steps(model, opt, 12)
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt, saved_engine = opt.state_dict(), engine.state_dict()
    engine.remove()

    model2, opt2 = _model_and_optimizer()
    model2.load_state_dict(saved_weights)  # a trainer restores these before the engine exists
    opt2.load_state_dict(saved_opt)
    again = sl.sparsify(
        model2, opt2, "sparse_momentum", 0.2, total_steps=50, update_every=5, state=saved_engine
    )
    for k, v in model2.state_dict().items():
        assert torch.equal(v, saved_weights[k]), k
    assert again.step == 12
    for k, m in again.masks.items():
        assert torch.equal(m, saved_engine["masks"][k])


def test_a_state_of_another_configuration_is_refused_and_nothing_stays_attached() -> None:
    model, opt = _model_and_optimizer()
    engine = sl.sparsify(model, opt, "rigl", 0.2, total_steps=50, update_every=10)
    saved = engine.state_dict()
    engine.remove()
    with pytest.raises(ValueError, match="total_steps"):
        sl.sparsify(model, opt, "rigl", 0.2, total_steps=60, update_every=10, state=saved)
    sl.sparsify(
        model, opt, "rigl", 0.2, total_steps=50, update_every=10
    )  # not left sparsified by the failure
