"""Code written for the 2019 library runs with one import change and means the same thing."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparselearn.compat import CosineDecay, LinearDecay, Masking
from tests.helpers import MLP, TiedLM, assert_inactive_zero, batches, save_load


def test_the_2019_training_loop_with_one_import_change() -> None:
    torch.manual_seed(0)
    model = MLP()
    epochs, steps_per_epoch = 3, 5
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    decay = CosineDecay(0.5, steps_per_epoch * epochs)
    mask = Masking(optimizer, prune_rate_decay=decay)
    mask.add_module(model, density=0.1)
    budget = round(0.1 * (640 + 1024 + 160))
    data = list(batches("mlp", steps_per_epoch))
    for _epoch in range(epochs):
        for x, y in data:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            mask.step()
            assert_inactive_zero(mask.engine, model)
        rate = mask.prune_rate
        mask.at_end_of_epoch()
        update = mask.engine.last_update
        assert update is not None
        assert update.prune_rate == rate == decay.get_dr(0.5)
        assert sum(int(m.sum()) for m in mask.masks.values()) == budget  # no drift
    assert [u.step for u in mask.engine.history] == [5, 10, 15]
    assert set(mask.masks) == {"fc1.weight", "fc2.weight", "fc3.weight"}


def test_cosine_decay_matches_cosine_annealing_lr() -> None:
    decay = CosineDecay(0.5, T_max=20, eta_min=0.005)
    param = nn.Parameter(torch.zeros(1))
    sgd = torch.optim.SGD([param], lr=0.5)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=20, eta_min=0.005)
    for _ in range(45):  # beyond T_max too: the 2019 schedule was periodic
        assert decay.get_dr(0.5) == pytest.approx(sgd.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        decay.step()
        sgd.step()
        reference.step()


def test_linear_decay_reaches_zero_and_stays_there() -> None:
    decay = LinearDecay(0.4, T_max=8)
    values = []
    for _ in range(12):
        values.append(decay.get_dr(0.4))
        decay.step()
    assert values[:9] == pytest.approx([0.4 - 0.05 * t for t in range(9)])
    assert values[9:] == [0.0, 0.0, 0.0]


def test_plain_optimizer_step_and_prune_every_k_steps() -> None:
    torch.manual_seed(0)
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mask = Masking(optimizer, CosineDecay(0.5, 20), prune_every_k_steps=4)
    mask.add_module(model, density=0.2)
    for x, y in batches("mlp", 10):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()  # the optimizer's own step works too
        assert_inactive_zero(mask.engine, model)
    assert [u.step for u in mask.engine.history] == [4, 8]
    assert mask.steps == 10


@pytest.mark.parametrize(
    ("prune_mode", "growth_mode", "redistribution_mode"),
    [
        ("magnitude", "momentum", "momentum"),
        ("SET", "random", "none"),
        ("global_magnitude", "momentum", "magnitude"),
        ("magnitude", "momentum_neuron", "nonzero"),
        ("magnitude", "global_momentum_growth", "momentum"),
    ],
)
def test_2019_mode_names(prune_mode: str, growth_mode: str, redistribution_mode: str) -> None:
    torch.manual_seed(0)
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mask = Masking(
        optimizer,
        CosineDecay(0.5, 20),
        prune_mode=prune_mode,
        growth_mode=growth_mode,
        redistribution_mode=redistribution_mode,
    )
    mask.add_module(model, density=0.2)
    for x, y in batches("mlp", 4):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        mask.step()
    mask.at_end_of_epoch()
    assert mask.engine.last_update is not None
    assert mask.engine.last_update.kind == "regrow"
    assert sum(int(m.sum()) for m in mask.masks.values()) == round(0.2 * 1824)


def test_unknown_mode_names_raise_instead_of_printing() -> None:
    opt = torch.optim.SGD(MLP().parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="unknown growth mode 'momentun'; did you mean 'momentum'"):
        Masking(opt, CosineDecay(0.5, 10), growth_mode="momentun")
    with pytest.raises(ValueError, match="did you mean 'SET'"):
        Masking(opt, CosineDecay(0.5, 10), prune_mode="set")
    with pytest.raises(TypeError, match="register a criterion"):
        Masking(opt, CosineDecay(0.5, 10), growth_mode=lambda *a: None)


def test_sparse_init_names() -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mask = Masking(opt, CosineDecay(0.5, 10))
    mask.add_module(model, density=0.2, sparse_init="linear")  # SET's scaling: ERK
    d = mask.engine.layer_densities()
    assert d["fc3.weight"] > d["fc1.weight"] > d["fc2.weight"]
    model2 = MLP()
    mask2 = Masking(torch.optim.SGD(model2.parameters(), lr=0.1), CosineDecay(0.5, 10))
    with pytest.raises(ValueError, match="load_state_dict"):
        mask2.add_module(model2, density=0.2, sparse_init="resume")


def test_everything_but_biases_and_norms_is_masked_and_names_can_be_removed() -> None:
    model = TiedLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mask = Masking(opt, CosineDecay(0.5, 10))
    mask.add_module(model, density=0.3)
    assert sorted(mask.masks) == ["embed.weight", "hidden.weight"]
    model2 = TiedLM()
    mask2 = Masking(torch.optim.SGD(model2.parameters(), lr=0.1), CosineDecay(0.5, 10))
    mask2.add_module(model2, density=0.3, remove_param_names=["embed"])
    assert sorted(mask2.masks) == ["hidden.weight"]


def test_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mask = Masking(opt, CosineDecay(0.5, 20))
    mask.add_module(model, density=0.2)
    for x, y in batches("mlp", 3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        mask.step()
    mask.at_end_of_epoch()
    state = save_load(mask.state_dict())
    model2 = MLP()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    mask2 = Masking(opt2, CosineDecay(0.5, 20))
    mask2.add_module(model2, density=0.2)
    mask2.load_state_dict(state)
    assert mask2.steps == 3
    assert mask2.prune_rate == mask.prune_rate
    assert mask2.prune_rate_decay.get_dr(0.5) == mask.prune_rate_decay.get_dr(0.5)
    for name in mask.masks:
        assert torch.equal(mask.masks[name], mask2.masks[name])


def test_bad_arguments() -> None:
    opt = torch.optim.SGD(MLP().parameters(), lr=0.1)
    with pytest.raises(TypeError, match="step\\(\\) and get_dr"):
        Masking(opt, prune_rate_decay=0.5)
    with pytest.raises(ValueError, match="T_max must be a positive integer"):
        CosineDecay(0.5, 0)
    with pytest.raises(RuntimeError, match="add_module"):
        Masking(opt, CosineDecay(0.5, 10)).at_end_of_epoch()
    assert math.isclose(CosineDecay(0.5, 10).get_dr(), 0.5)
