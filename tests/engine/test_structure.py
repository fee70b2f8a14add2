"""Structured sparsity (``structure="fan_in"`` and ``"N:M"``): every group of a layer holds its
count after every update, for every method; the budget is exact; state round trips; what a
structure cannot describe is refused."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparselearn as sl
from sparselearn.structure import (
    Groups,
    parse_structure,
    pick_per_group,
    whole_groups,
)
from tests.helpers import assert_inactive_zero, save_load, train_step

METHODS = ["sparse_momentum", "rigl", "set", "dsr", "static", "gmp", "snip"]
STRUCTURES = ["fan_in", "2:4", "1:4"]


class Net(nn.Module):
    """Linear and convolution layers whose inputs are multiples of 4, for (B, 4, 6, 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 6 * 6, 24)
        self.fc2 = nn.Linear(24, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


def data(steps: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 4, 6, 6, generator=g), torch.randint(0, 5, (16,), generator=g))
        for _ in range(steps)
    ]


def build(
    method: str,
    structure: str,
    *,
    seed: int = 0,
    density: float = 0.25,
    total_steps: int = 12,
    optimizer: str = "sgd",
    init_seed: int | None = None,
    **options: Any,
) -> tuple[nn.Module, torch.optim.Optimizer, sl.SparseEngine]:
    torch.manual_seed(seed if init_seed is None else init_seed)
    model = Net()
    opt: torch.optim.Optimizer
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    schedule = sl.METHODS.get(method).defaults["schedule"]
    s = parse_structure(structure)
    kw: dict[str, Any] = {"structure": structure, "seed": seed, "total_steps": total_steps}
    kw["density"] = s.density if s.density is not None else density
    if schedule in ("periodic", "gradual"):
        kw["update_every"] = 3
    kw.update(options)
    return model, opt, sl.sparsify(model, opt, method=method, **kw)


def groups_of(engine: sl.SparseEngine, model: nn.Module) -> dict[str, Groups]:
    s = parse_structure(engine.config.structure)
    return {name: Groups(name, m.shape, "out_first", s) for name, m in engine.masks.items()}


def assert_structure(engine: sl.SparseEngine, model: nn.Module) -> None:
    """Every group of every layer holds the same count (N under N:M), counted directly from
    the masks."""
    s = parse_structure(engine.config.structure)
    for name, g in groups_of(engine, model).items():
        counts = g.view(engine.masks[name]).sum(dim=1)
        assert int(counts.min()) == int(counts.max()), name
        if s.kind == "n:m" and not engine.schedule.starts_dense:
            assert int(counts[0]) == s.n, name


cases = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**20),
        "density": st.sampled_from([0.1, 0.25, 0.5]),
        "optimizer": st.sampled_from(["sgd", "adam"]),
    }
)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=3)
@given(case=cases)
def test_every_group_holds_its_count_after_every_step(
    method: str, structure: str, case: dict[str, Any]
) -> None:
    model, opt, engine = build(method, structure, **case)
    assert_structure(engine, model)
    start = sum(int(m.sum()) for m in engine.masks.values())
    seen = 0
    for x, y in data(12, case["seed"]):
        before = {n: m.clone() for n, m in engine.masks.items()}
        train_step(model, opt, x, y)
        assert_structure(engine, model)
        assert_inactive_zero(engine, model)
        now = sum(int(m.sum()) for m in engine.masks.values())
        if not engine.schedule.starts_dense:
            assert now == start  # the budget is exact at every step
        for update in engine.history[seen:]:
            assert update.kind != "skipped"
            after = engine.masks
            grown = sum(int((after[n] & ~before[n]).sum()) for n in after)
            pruned = sum(int((before[n] & ~after[n]).sum()) for n in after)
            assert (grown, pruned) == (update.total_grown, update.total_pruned)
            if engine.schedule.grows:
                assert grown == pruned
        seen = len(engine.history)
    if engine.schedule.updates or engine.schedule.before_first_step:
        assert seen > 0
    if engine.schedule.starts_dense:  # gradual and one-shot pruning end at the target
        s = parse_structure(structure)
        for name, g in groups_of(engine, model).items():
            counts = g.view(engine.masks[name]).sum(dim=1)
            if s.kind == "n:m":
                assert bool((counts == s.n).all()), name


@pytest.mark.parametrize("structure", ["fan_in", "2:4"])
def test_the_budget_is_the_densitys_in_whole_groups(structure: str) -> None:
    model, _, engine = build("rigl", structure, density=0.25)
    total = sum(m.numel() for m in engine.masks.values())
    active = sum(int(m.sum()) for m in engine.masks.values())
    if structure == "2:4":
        assert active == total // 2
    else:
        # ERK's split in whole rows adds up to exactly round(density * total) here
        assert active == round(0.25 * total)
    for name, g in groups_of(engine, model).items():
        assert int(engine.masks[name].sum()) % g.count == 0


def test_sparse_momentum_moves_whole_rows_between_layers() -> None:
    model, opt, engine = build("sparse_momentum", "fan_in", density=0.25, total_steps=30)
    start = {n: int(m.sum()) for n, m in engine.masks.items()}
    for x, y in data(30, 3):
        train_step(model, opt, x, y)
    end = {n: int(m.sum()) for n, m in engine.masks.items()}
    assert end != start  # the redistribution moved weights between layers
    assert sum(end.values()) == sum(start.values())
    for name, g in groups_of(engine, model).items():
        assert end[name] % g.count == 0, name  # in whole rows' worth
    assert_structure(engine, model)


@pytest.mark.parametrize("structure", ["fan_in", "2:4"])
@pytest.mark.parametrize("method", ["sparse_momentum", "rigl", "gmp"])
@settings(max_examples=2)
@given(split=st.integers(1, 11))
def test_resume_from_state_dict_is_bitwise_identical(
    method: str, structure: str, split: int
) -> None:
    total = 12
    model, opt, engine = build(method, structure, total_steps=total)
    batches = data(total, 1)
    for x, y in batches:
        train_step(model, opt, x, y)
    model_a, opt_a, engine_a = build(method, structure, total_steps=total)
    for x, y in batches[:split]:
        train_step(model_a, opt_a, x, y)
    saved = save_load(
        {"model": model_a.state_dict(), "opt": opt_a.state_dict(), "engine": engine_a.state_dict()}
    )
    engine_a.remove()
    model_b, opt_b, engine_b = build(method, structure, total_steps=total, init_seed=999)
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    engine_b.load_state_dict(saved["engine"])
    for x, y in batches[split:]:
        train_step(model_b, opt_b, x, y)
    for name in engine.masks:
        assert torch.equal(engine.masks[name], engine_b.masks[name]), name
    for (n, p1), (_, p2) in zip(model.named_parameters(), model_b.named_parameters(), strict=True):
        assert torch.equal(p1, p2), n


def test_a_state_whose_masks_break_the_structure_is_refused() -> None:
    _, _, engine = build("rigl", "2:4")
    state = engine.state_dict()
    mask = state["masks"]["fc2.weight"].clone()
    mask[0, :4] = torch.tensor([True, True, True, False])
    mask[0, 4:8] = torch.tensor([True, False, False, False])
    state["masks"]["fc2.weight"] = mask
    before = {n: m.clone() for n, m in engine.masks.items()}
    with pytest.raises(ValueError, match=r"break structure '2:4'.*fc2.weight"):
        engine.load_state_dict(state)
    for name, m in engine.masks.items():
        assert torch.equal(m, before[name])  # nothing half-applied


def test_accelerated_layers_keep_the_structure() -> None:
    model, opt, engine = build("rigl", "fan_in", density=0.2, total_steps=12)
    sl.accelerate(model, engine, mode="sparse")
    for x, y in data(12, 2):
        train_step(model, opt, x, y)
    assert any(layer.kind == "csr" for layer in engine.layers)
    assert len(engine.history) > 0
    assert_structure(engine, model)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"structure": "2:4", "density": 0.1}, "density must be 0.5"),
        ({"structure": "2:4", "init": "erk"}, "init must be 'uniform'"),
        ({"structure": "2:4", "redistribution": "momentum"}, "redistribution must be 'none'"),
        ({"structure": "4:2"}, "0 < N < M"),
        ({"structure": "diagonal"}, "unknown structure 'diagonal'"),
        ({"structure": 4}, "must be a string"),
    ],
)
def test_bad_structure_options_are_refused(options: dict[str, Any], message: str) -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    options.setdefault("density", 0.5)
    with pytest.raises((ValueError, TypeError), match=message):
        sl.sparsify(model, opt, method="sparse_momentum", total_steps=10, **options)


def test_n_m_needs_inputs_in_whole_blocks() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"0.weight has 6 inputs, not a multiple of 4"):
        sl.sparsify(model, opt, method="rigl", structure="2:4", total_steps=10)
    # excluding the layer is the way out the message names
    sl.sparsify(
        model,
        opt,
        method="rigl",
        structure="2:4",
        total_steps=10,
        update_every=3,
        exclude=["0.weight"],
    )


def test_transposed_convolutions_are_refused_by_name() -> None:
    model = nn.Sequential(nn.ConvTranspose2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"0\.weight is a transposed convolution"):
        sl.sparsify(model, opt, method="rigl", density=0.2, structure="fan_in", total_steps=10)


def test_meta_models_are_refused_with_a_structure() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="meta device is not supported"):
        sl.sparsify(model, opt, method="set", density=0.2, structure="fan_in", total_steps=10)


def test_presets_carry_their_structure() -> None:
    assert sl.METHODS.get("srigl").defaults["structure"] == "fan_in"
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sl.sparsify(model, opt, method="srigl_2_4", total_steps=10, update_every=3)
    assert engine.config.density == 0.5
    assert engine.config.init == "uniform"
    assert_structure(engine, model)


# ----------------------------------------------------------------------------- the parts


@settings(max_examples=40)
@given(
    shape=st.sampled_from([(8, 12), (4, 8, 3, 3), (8, 4, 1, 5), (12, 8)]),
    layout=st.sampled_from(["out_first", "in_first"]),
    structure=st.sampled_from(["fan_in", "2:4", "1:4"]),
)
def test_groups_view_and_unview_are_inverse(
    shape: tuple[int, ...], layout: str, structure: str
) -> None:
    if layout == "in_first" and len(shape) != 2:
        shape = shape[:2]
    t = torch.arange(math.prod(shape)).reshape(shape)
    g = Groups("w", shape, layout, parse_structure(structure))
    v = g.view(t)
    assert v.shape == (g.count, g.size)
    assert torch.equal(g.unview(v), t)
    # a group holds the inputs of one output unit: for (out, in) weights, one row's entries
    matrix = t.t() if layout == "in_first" else t.reshape(shape[0], -1)
    rows = {tuple(sorted(r.tolist())) for r in matrix}
    for group in v:
        assert any(set(group.tolist()) <= set(r) for r in rows)


def test_n_m_blocks_of_a_convolution_run_along_input_channels() -> None:
    shape = (2, 8, 3, 3)
    t = torch.arange(math.prod(shape)).reshape(shape)
    g = Groups("w", shape, "out_first", parse_structure("2:4"))
    first = g.view(t)[0]
    # out 0, kernel position (0, 0), input channels 0..3
    assert first.tolist() == [t[0, c, 0, 0].item() for c in range(4)]


@settings(max_examples=50)
@given(
    groups=st.integers(1, 6),
    size=st.integers(1, 9),
    seed=st.integers(0, 1000),
    largest=st.booleans(),
)
def test_pick_per_group_takes_each_groups_best(
    groups: int, size: int, seed: int, largest: bool
) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (groups, size), generator=g).float()  # many ties
    candidates = torch.rand(groups, size, generator=g) < 0.7
    k = torch.randint(0, size + 1, (groups,), generator=g).minimum(candidates.sum(1))
    chosen = pick_per_group(
        scores, candidates, k, torch.Generator().manual_seed(1), largest=largest
    )
    assert torch.equal(chosen.sum(1), k)
    assert not bool((chosen & ~candidates).any())
    for r in range(groups):
        picked, rest = scores[r][chosen[r]], scores[r][candidates[r] & ~chosen[r]]
        if picked.numel() and rest.numel():
            if largest:
                assert picked.min() >= rest.max()
            else:
                assert picked.max() <= rest.min()


@settings(max_examples=80)
@given(
    units=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    data=st.data(),
)
def test_whole_groups_adds_up_exactly_within_bounds(units: list[int], data: Any) -> None:
    highs = [data.draw(st.integers(1, 10)) for _ in units]
    k0 = [data.draw(st.integers(0, h)) for h in highs]
    total = sum(u * k for u, k in zip(units, k0, strict=True))  # some split exists
    shares = [data.draw(st.floats(0, 400)) for _ in units]
    split = whole_groups(total, shares, units, [0] * len(units), highs)
    if split is not None:
        assert sum(u * k for u, k in zip(units, split, strict=True)) == total
        assert all(0 <= k <= h for k, h in zip(split, highs, strict=True))
    # shares that are themselves whole groups are met exactly
    assert (
        whole_groups(
            total, [u * k for u, k in zip(units, k0, strict=True)], units, [0] * len(units), highs
        )
        == k0
    )


# ----------------------------------------------------------------------------- neuron ablation


def test_a_unit_with_nothing_salient_is_removed_and_stays_removed() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    engine = sl.sparsify(
        model, opt, method="srigl", density=0.5, total_steps=40, update_every=2, init="uniform"
    )
    assert engine.config.neuron_ablation == 0.3  # SRigL's gamma_sal
    with torch.no_grad():  # unit 2 of the hidden layer: zero weights, never active (ReLU of -1)
        model[0].weight[2] = 0.0
        model[0].bias[2] = -1.0
    before = int(engine.masks["0.weight"].sum())
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        train_step(
            model, opt, torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        )
        counts = engine.masks["0.weight"].sum(dim=1)
        if engine.history:
            assert int(counts[2]) == 0  # removed at the first update, never regrown
            alive = counts[counts > 0]
            assert int(alive.min()) == int(alive.max())  # the others at one fan-in
            # the layer keeps its weights among 5 units: at most 4 fewer than before
            assert before - 4 <= int(counts.sum()) <= before
    assert len(engine.history) == 4
    assert_inactive_zero(engine, model)
    # a saved state with a removed unit loads (the structure allows empty units here)
    engine.load_state_dict(save_load(engine.state_dict()))


@settings(max_examples=4)
@given(seed=st.integers(0, 2**20), density=st.sampled_from([0.1, 0.25]))
def test_srigl_keeps_units_at_one_fan_in_or_removed(seed: int, density: float) -> None:
    model, opt, engine = build("srigl", "fan_in", seed=seed, density=density, total_steps=12)
    removed: dict[str, torch.Tensor] = {}
    for x, y in data(12, seed):
        before = sum(int(m.sum()) for m in engine.masks.values())
        train_step(model, opt, x, y)
        assert_inactive_zero(engine, model)
        for name, mask in engine.masks.items():
            counts = mask.sum(dim=1) if mask.dim() == 2 else mask.flatten(1).sum(dim=1)
            alive = counts[counts > 0]
            assert alive.numel() > 0, name
            assert int(alive.min()) == int(alive.max()), name
            gone = counts == 0
            if name in removed:
                assert bool((removed[name] <= gone).all()), name  # never back
            removed[name] = gone
        assert sum(int(m.sum()) for m in engine.masks.values()) <= before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "rigl", "structure": "2:4", "neuron_ablation": 0.3},
         "needs structure='fan_in'"),
        ({"method": "sparse_momentum", "structure": "fan_in", "neuron_ablation": 0.3},
         "needs redistribution='none'"),
        ({"method": "srigl", "neuron_ablation": 1.0}, r"neuron_ablation must be in \[0, 1\)"),
        ({"method": "static", "structure": "fan_in", "neuron_ablation": 0.3}, "have no effect"),
    ],
)  # fmt: skip
def test_neuron_ablation_is_refused_where_it_cannot_apply(
    options: dict[str, Any], message: str
) -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    options.setdefault("density", 0.5)
    with pytest.raises(ValueError, match=message):
        sl.sparsify(model, opt, total_steps=10, **options)
