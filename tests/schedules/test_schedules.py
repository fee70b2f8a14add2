"""Mask schedules as registered objects: a user's own schedule runs through the same engine,
and the registry is as strict as the others."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

import sparselearn as sl
from tests.helpers import MLP, batches, train_step


class _AtSteps(sl.MaskSchedule):
    """Regrow after steps 3 and 7 only."""

    options = frozenset({"init", "prune", "growth", "redistribution", "prune_rate"})
    updates = True

    def due(self, config: Any, step: int) -> bool:
        return step in (3, 7)

    def update(self, masks: Any, config: Any, step: int, prune_rate: float | None = None) -> Any:
        return masks.regrow(config.prune_rate if prune_rate is None else prune_rate)


@pytest.fixture
def at_steps() -> Iterator[str]:
    sl.register_schedule("at_steps")(_AtSteps)
    yield "at_steps"
    sl.MASK_SCHEDULE.unregister("at_steps")


def test_a_registered_schedule_updates_when_it_says_with_an_exact_budget(at_steps: str) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = sl.sparsify(model, opt, method="set", density=0.2, schedule=at_steps, seed=0)
    assert at_steps in sl.choices("schedule")
    budget = sum(int(m.sum()) for m in engine.masks.values())
    before = {n: m.clone() for n, m in engine.masks.items()}
    for x, y in batches("mlp", 10):
        train_step(model, opt, x, y)
        assert sum(int(m.sum()) for m in engine.masks.values()) == budget
    assert [u.step for u in engine.history] == [3, 7]
    assert all(u.kind == "regrow" and u.total_grown == u.total_pruned > 0 for u in engine.history)
    assert any(not torch.equal(before[n], m) for n, m in engine.masks.items())
    update = engine.update_masks(prune_rate=0.1)  # on demand, through the same schedule
    assert update.step == 10
    assert update.prune_rate == 0.1


def test_options_a_schedule_does_not_read_are_refused(at_steps: str) -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match=r"update_every have no effect .*schedule 'at_steps'"):
        sl.sparsify(model, opt, method="set", density=0.2, schedule=at_steps, update_every=5)


def test_the_schedule_registry_is_strict(at_steps: str) -> None:
    with pytest.raises(ValueError, match="already registered"):
        sl.register_schedule(at_steps)(_AtSteps)
    with pytest.raises(TypeError, match="decorates a MaskSchedule subclass"):
        sl.register_schedule("not_a_schedule")(dict)  # type: ignore[type-var]

    class Bad(sl.MaskSchedule):
        options = frozenset({"prune", "learning_rate"})

    with pytest.raises(ValueError, match=r"lists options \['learning_rate'\] that no schedule"):
        sl.register_schedule("bad")(Bad)
    assert "bad" not in sl.choices("schedule")
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match=r"unknown schedule 'periodc'; did you mean 'periodic'"):
        sl.sparsify(model, opt, method="set", density=0.2, schedule="periodc")


def test_a_schedule_that_never_updates_says_so_when_asked() -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = sl.sparsify(model, opt, method="static", density=0.2)
    with pytest.raises(RuntimeError, match=r"method 'static' \(schedule 'fixed'\) never updates"):
        engine.update_masks()


def test_the_built_in_schedules_declare_what_they_read() -> None:
    s = {name: sl.MASK_SCHEDULE.get(name) for name in sl.choices("schedule")}
    assert set(s) == {"dense", "fixed", "one_shot", "periodic", "gradual"}
    assert [n for n, x in s.items() if x.prunes] == ["gradual", "one_shot", "periodic"]
    assert [n for n, x in s.items() if x.grows] == ["periodic"]
    assert [n for n, x in s.items() if x.starts_dense] == ["dense", "gradual", "one_shot"]
    assert [n for n, x in s.items() if x.updates] == ["gradual", "periodic"]
    assert [n for n, x in s.items() if not x.masks] == ["dense"]
    assert [n for n, x in s.items() if x.before_first_step] == ["one_shot"]
