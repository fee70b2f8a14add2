"""Invariants every method preset, and every registered mask schedule, must satisfy (property
tests over densities, seeds, models, optimizers and update intervals).

A subject is a preset name, or ``schedule:<name>`` for a registered schedule run on its own
(magnitude pruning and random growth where it prunes and grows)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparselearn as sl
from tests.helpers import (
    MODELS,
    assert_inactive_zero,
    batches,
    model_options,
    save_load,
    train_step,
)

# presets with a structure have their own invariants (tests/engine/test_structure.py): their
# budgets are whole groups' worth and N:M fixes the density
SUBJECTS = [
    *(m for m in sl.methods() if "structure" not in sl.METHODS.get(m).defaults),
    *(f"schedule:{name}" for name in sl.MASK_SCHEDULE.names()),
]
OPTIMIZERS = ("sgd_momentum", "adam", "sgd_plain")


def make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd_momentum":
        return torch.optim.SGD(
            model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
        )
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-2)
    return torch.optim.SGD(model.parameters(), lr=0.05)


def schedule_of(subject: str) -> sl.MaskSchedule:
    if subject.startswith("schedule:"):
        return sl.MASK_SCHEDULE.get(subject.removeprefix("schedule:"))
    return sl.MASK_SCHEDULE.get(str(sl.METHODS.get(subject).defaults["schedule"]))


def method_and_options(subject: str) -> tuple[str, dict[str, Any]]:
    """The preset to sparsify with, and what a schedule subject adds to it."""
    if not subject.startswith("schedule:"):
        return subject, {}
    schedule = schedule_of(subject)
    options: dict[str, Any] = {"schedule": schedule.name}
    if schedule.prunes:
        options["prune"] = "magnitude"
    if schedule.grows:
        options["growth"] = "random"
    return "static", options


def constant_budget(schedule: sl.MaskSchedule) -> bool:
    """Whether the budget holds at every step (gradual pruning moves towards it instead)."""
    return not (schedule.starts_dense and schedule.updates)


def build(
    subject: str,
    kind: str = "mlp",
    *,
    seed: int = 0,
    density: float = 0.2,
    update_every: int = 3,
    total_steps: int = 12,
    optimizer: str = "sgd_momentum",
    init_seed: int | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer, sl.SparseEngine]:
    torch.manual_seed(seed if init_seed is None else init_seed)
    model = MODELS[kind]()
    opt = make_optimizer(optimizer, model)
    method, options = method_and_options(subject)
    options.update(seed=seed, **model_options(kind))
    schedule = schedule_of(subject)
    if schedule.masks:
        options["density"] = density
    if "update_every" in schedule.options:
        options["update_every"] = update_every
    engine = sl.sparsify(model, opt, method=method, total_steps=total_steps, **options)
    return model, opt, engine


def run(
    engine: sl.SparseEngine,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    kind: str,
    steps: range,
    seed: int = 0,
) -> None:
    data = list(batches(kind, steps.stop, seed=seed))
    for i in steps:
        train_step(model, opt, *data[i])


def budget(engine: sl.SparseEngine, density: float) -> int:
    """The exact budget, computed from the definition: round(density * sparsified weights)."""
    return round(density * sum(m.numel() for m in engine.masks.values()))


def active(engine: sl.SparseEngine) -> int:
    return sum(int(m.sum()) for m in engine.masks.values())


cases = st.fixed_dictionaries(
    {
        "density": st.sampled_from([0.05, 0.1, 0.2, 0.5, 0.8]),
        "seed": st.integers(0, 2**20),
        "update_every": st.integers(1, 4),
        "kind": st.sampled_from(["mlp", "conv_bn", "lstm"]),
        "optimizer": st.sampled_from(OPTIMIZERS),
    }
)


@pytest.mark.parametrize("method", SUBJECTS)
@settings(max_examples=6)
@given(case=cases)
def test_inactive_weights_are_zero_after_every_step(method: str, case: dict[str, Any]) -> None:
    kind = case["kind"]
    model, opt, engine = build(method, kind, **{k: v for k, v in case.items() if k != "kind"})
    assert_inactive_zero(engine, model)
    data = list(batches(kind, 10, seed=case["seed"]))
    for x, y in data:
        train_step(model, opt, x, y)
        assert_inactive_zero(engine, model)
    assert engine.step == 10


@pytest.mark.parametrize("method", SUBJECTS)
@settings(max_examples=6)
@given(case=cases)
def test_budget_is_exact_and_growth_only_fills_inactive_positions(
    method: str, case: dict[str, Any]
) -> None:
    kind, density = case["kind"], case["density"]
    model, opt, engine = build(method, kind, **{k: v for k, v in case.items() if k != "kind"})
    schedule = schedule_of(method)
    target = budget(engine, density if schedule.masks else 1.0)
    numels = {n: m.numel() for n, m in engine.masks.items()}
    data = list(batches(kind, 12, seed=case["seed"]))
    seen_updates = 0
    for x, y in data:
        before = {n: m.clone() for n, m in engine.masks.items()}
        train_step(model, opt, x, y)
        after = dict(engine.masks)
        for name, mask in after.items():
            assert int(mask.sum()) <= numels[name]  # never above full density
        if constant_budget(schedule):
            assert active(engine) == target  # constant budget, every step
        for update in engine.history[seen_updates:]:
            assert update.kind != "skipped"
            grown = sum(int((after[n] & ~before[n]).sum()) for n in after)
            pruned = sum(int((before[n] & ~after[n]).sum()) for n in after)
            # a grown position that was already active (or just pruned) would break these
            assert grown == update.total_grown
            assert pruned == update.total_pruned
            if schedule.grows:
                assert update.total_grown == update.total_pruned
        seen_updates = len(engine.history)
    if not constant_budget(schedule):
        assert active(engine) == target  # stop_at 0.75 of 12 steps: the target is reached
    if schedule.updates:
        assert seen_updates > 0


@pytest.mark.parametrize("method", SUBJECTS)
@settings(max_examples=4)
@given(case=cases)
def test_same_seed_same_data_is_bitwise_identical(method: str, case: dict[str, Any]) -> None:
    kind = case["kind"]
    runs = []
    for _ in range(2):
        model, opt, engine = build(method, kind, **{k: v for k, v in case.items() if k != "kind"})
        run(engine, model, opt, kind, range(10), seed=case["seed"])
        runs.append((model, engine))
    (m1, e1), (m2, e2) = runs
    for name in e1.masks:
        assert torch.equal(e1.masks[name], e2.masks[name])
    for (n1, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        assert torch.equal(p1, p2), n1


@pytest.mark.parametrize("method", SUBJECTS)
@settings(max_examples=4)
@given(case=cases, split=st.integers(1, 10))
def test_resume_from_state_dict_is_bitwise_identical(
    method: str, case: dict[str, Any], split: int
) -> None:
    kind, total = case["kind"], 11
    args = {k: v for k, v in case.items() if k != "kind"}
    model, opt, engine = build(method, kind, total_steps=total, **args)
    run(engine, model, opt, kind, range(total), seed=case["seed"])

    model_a, opt_a, engine_a = build(method, kind, total_steps=total, **args)
    run(engine_a, model_a, opt_a, kind, range(split), seed=case["seed"])
    saved = save_load(
        {"model": model_a.state_dict(), "opt": opt_a.state_dict(), "engine": engine_a.state_dict()}
    )
    engine_a.remove()
    # fresh objects, initialised differently: everything must come from the checkpoint
    model_b, opt_b, engine_b = build(method, kind, total_steps=total, init_seed=12345, **args)
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    engine_b.load_state_dict(saved["engine"])
    assert engine_b.step == split
    run(engine_b, model_b, opt_b, kind, range(split, total), seed=case["seed"])

    for name in engine.masks:
        assert torch.equal(engine.masks[name], engine_b.masks[name]), name
    for (n1, p1), (_, p2) in zip(model.named_parameters(), model_b.named_parameters(), strict=True):
        assert torch.equal(p1, p2), n1

    # the history is part of the state: the resumed engine knows every update, not only its own
    def what(u: sl.MaskUpdate) -> tuple[Any, ...]:
        return (u.step, u.kind, u.prune_rate, u.pruned, u.grown, u.density, u.reason)

    assert [what(u) for u in engine_b.history] == [what(u) for u in engine.history]


@pytest.mark.parametrize("method", SUBJECTS)
def test_masks_are_bool_tensors_of_the_weight_shape_and_device(method: str) -> None:
    model, _, engine = build(method, "conv_bn")
    params = dict(model.named_parameters())
    assert set(engine.masks) == {"features.0.weight", "features.3.weight", "classifier.weight"}
    for name, mask in engine.masks.items():
        assert mask.dtype == torch.bool
        assert mask.shape == params[name].shape
        assert mask.device == params[name].device
    expected = 1.0 if schedule_of(method).starts_dense else 0.2
    assert math.isclose(engine.density(), expected, abs_tol=1e-3)


@pytest.mark.parametrize("method", SUBJECTS)
def test_remove_detaches_and_leaves_weights_sparse(method: str) -> None:
    model, opt, engine = build(method, "mlp", total_steps=6)
    run(engine, model, opt, "mlp", range(6))
    engine.remove()
    masks = {n: m.clone() for n, m in engine.masks.items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert_inactive_zero(engine, model)  # still sparse after remove
    run(engine, model, opt, "mlp", range(3))
    assert engine.step == 6  # no longer counting
    params = dict(model.named_parameters())
    if schedule_of(method).masks:
        # the optimizer now moves inactive weights: the engine no longer holds them at zero
        assert any(torch.count_nonzero(params[n].detach()[~m]) > 0 for n, m in masks.items())
    assert any(not torch.equal(before[n], params[n].detach()) for n in before)
    # and the model can be sparsified again
    sl.sparsify(model, opt, method="static", density=0.5)
