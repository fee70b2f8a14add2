"""What each method does, checked against the rule it implements (computed independently)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import sparselearn as sl
from tests.helpers import (
    MLP,
    ConvBN,
    batches,
    distinct_values,
    make_batch,
    sparse_mlp,
    train_step,
)


def expected_top(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Independent top-k by full sort (no ties in the inputs used here)."""
    flat = torch.where(candidates, scores, torch.full_like(scores, -math.inf)).reshape(-1)
    out = torch.zeros(flat.shape, dtype=torch.bool)
    out[torch.sort(flat, descending=True).indices[:k]] = True
    return out.view_as(candidates)


# ----------------------------------------------------------------------------- sparse momentum


def test_sparse_momentum_leaves_gradients_dense_so_missing_weights_gather_momentum() -> None:
    model, opt, engine = sparse_mlp(update_every=0)
    train_step(model, opt, *make_batch("mlp"))
    for name, p in model.named_parameters():
        if name in engine.masks:
            inactive = ~engine.masks[name]
            assert torch.count_nonzero(opt.state[p]["momentum_buffer"][inactive]) > 0
            assert torch.count_nonzero(p.detach()[inactive]) == 0


def test_sparse_momentum_prunes_smallest_magnitude_and_regrows_largest_momentum() -> None:
    model, opt, engine = sparse_mlp(update_every=0, redistribution="none")
    train_step(model, opt, *make_batch("mlp"))
    params = dict(model.named_parameters())
    before = {n: m.clone() for n, m in engine.masks.items()}
    momenta = {}
    with torch.no_grad():
        for i, (name, mask) in enumerate(before.items()):
            p = params[name]
            p.copy_(distinct_values(p.shape, seed=i) * torch.sign(torch.randn(p.shape)) * mask)
            # distinct magnitudes (no ties in |m|), both signs
            momenta[name] = distinct_values(p.shape, seed=100 + i) * torch.sign(
                torch.randn(p.shape)
            )
            opt.state[p]["momentum_buffer"].copy_(momenta[name])
    weights = {n: params[n].detach().clone() for n in before}
    update = engine.update_masks(prune_rate=0.3)
    for name, old in before.items():
        a = int(old.sum())
        k = round(0.3 * a)
        expected_pruned = expected_top(-weights[name].abs(), old, k)
        new = engine.masks[name]
        assert torch.equal(old & ~new, expected_pruned), name
        expected_grown = expected_top(momenta[name].abs(), ~old, k)
        assert torch.equal(new & ~old, expected_grown), name
        assert update.pruned[name] == update.grown[name] == k


def test_sparse_momentum_redistributes_by_mean_momentum_of_active_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 40, bias=False), nn.Linear(40, 40, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    engine = sl.sparsify(model, opt, density=0.1, total_steps=100, update_every=0, seed=0)
    model(torch.randn(4, 40)).sum().backward()
    opt.step()
    m0, m1 = (opt.state[p]["momentum_buffer"] for p in model.parameters())
    with torch.no_grad():
        m0.fill_(3.0)  # mean |m| over active weights: 3 vs 1
        m1.fill_(1.0)
        m0.add_(distinct_values(m0.shape, 1) * 1e-3)  # no ties inside a layer
        m1.add_(distinct_values(m1.shape, 2) * 1e-3)
    update = engine.update_masks(prune_rate=0.5)
    total = update.total_pruned
    assert total == 160  # 0.5 of 160 active in each layer
    share0 = update.grown["0.weight"] / total
    assert abs(share0 - 3 / 4) < 2 / total  # proportional to 3:1, up to rounding
    assert sum(int(m.sum()) for m in engine.masks.values()) == 320


def test_redistribution_never_fills_a_layer_beyond_full_density() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 100, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    engine = sl.sparsify(model, opt, density=0.5, total_steps=100, update_every=0, seed=0)
    model(torch.randn(4, 4)).sum().backward()
    opt.step()
    small, big = (opt.state[p]["momentum_buffer"] for p in model.parameters())
    with torch.no_grad():
        small.fill_(1000.0)  # the small layer wants almost all of the regrowth
        big.fill_(1.0)
    engine.update_masks(prune_rate=0.5)
    # 8 active, 4 pruned, and all 8 positions that were free are regrown: the layer is as full
    # as one update can make it; the rest of its share went to the big layer
    assert int(engine.masks["0.weight"].sum()) == 12
    assert sum(int(m.sum()) for m in engine.masks.values()) == round(0.5 * 416)
    # a nearly full layer has little room to regrow into, but it is pruned at the full rate
    with torch.no_grad():
        small.fill_(1e-3)
    update = engine.update_masks(prune_rate=0.5)
    assert update.pruned["0.weight"] == 6
    assert update.grown["0.weight"] == 0
    assert sum(int(m.sum()) for m in engine.masks.values()) == round(0.5 * 416)


def test_adam_momentum_signal_is_exp_avg_over_root_exp_avg_sq() -> None:
    model, opt, engine = sparse_mlp(optimizer="adam", update_every=0, redistribution="none")
    train_step(model, opt, *make_batch("mlp"))
    p = model.fc2.weight
    state = opt.state[p]
    with torch.no_grad():
        state["exp_avg"].copy_(distinct_values(p.shape, 1) * torch.sign(torch.randn(p.shape)))
        state["exp_avg_sq"].copy_(distinct_values(p.shape, 2))
    signal = state["exp_avg"] / (state["exp_avg_sq"].sqrt() + 1e-8)
    old = engine.masks["fc2.weight"].clone()
    update = engine.update_masks(prune_rate=0.25)
    grown = engine.masks["fc2.weight"] & ~old
    assert torch.equal(grown, expected_top(signal.abs(), ~old, update.grown["fc2.weight"]))


def test_plain_sgd_uses_an_engine_kept_gradient_average() -> None:
    model, opt, engine = sparse_mlp(optimizer="plain", update_every=0, redistribution="none")
    decay = engine.config.ema_decay
    ema = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n in engine.masks}
    for x, y in batches("mlp", 3):
        train_step(model, opt, x, y)
        for n, p in model.named_parameters():
            if n in ema:
                ema[n] = decay * ema[n] + (1 - decay) * p.grad
    old = engine.masks["fc1.weight"].clone()
    update = engine.update_masks(prune_rate=0.2)
    grown = engine.masks["fc1.weight"] & ~old
    expected = expected_top(ema["fc1.weight"].abs(), ~old, update.grown["fc1.weight"])
    assert torch.equal(grown, expected)


def test_sparse_momentum_prune_rate_follows_a_cosine_to_the_minimum() -> None:
    model, opt, engine = sparse_mlp(update_every=5, total_steps=40)
    checked = 0
    for step, (x, y) in enumerate(batches("mlp", 40), start=1):
        active = {n: int(m.sum()) for n, m in engine.masks.items()}
        train_step(model, opt, x, y)
        u = engine.last_update
        if u is None or u.step != step:
            continue
        expected = 0.005 + (0.5 - 0.005) * 0.5 * (1 + math.cos(math.pi * step / 40))
        assert u.prune_rate == pytest.approx(expected)
        for name, a in active.items():  # each layer loses round(rate * its active weights)
            assert u.pruned[name] == min(round(expected * a), a - 1)
        checked += 1
    assert [u.step for u in engine.history] == [5, 10, 15, 20, 25, 30, 35]  # none at the end
    assert checked == 7


def test_pruned_count_per_layer_is_the_prune_rate_of_its_active_weights() -> None:
    model, opt, engine = sparse_mlp(update_every=0)
    train_step(model, opt, *make_batch("mlp"))
    active = {n: int(m.sum()) for n, m in engine.masks.items()}
    update = engine.update_masks(prune_rate=0.37)
    for name, a in active.items():
        assert update.pruned[name] == round(0.37 * a)


def test_keep_policy_keeps_the_momentum_of_regrown_weights() -> None:
    model, opt, engine = sparse_mlp(update_every=0)
    train_step(model, opt, *make_batch("mlp"))
    p = model.fc2.weight
    old = engine.masks["fc2.weight"].clone()
    buf = opt.state[p]["momentum_buffer"].clone()
    engine.update_masks(prune_rate=0.3)
    grown = engine.masks["fc2.weight"] & ~old
    assert grown.any()
    assert torch.equal(opt.state[p]["momentum_buffer"][grown], buf[grown])
    assert torch.count_nonzero(p.detach()[grown]) == 0  # regrown weights start at zero


def test_epoch_updates() -> None:
    model, opt, engine = sparse_mlp(update_every="epoch", steps_per_epoch=7, total_steps=35)
    for x, y in batches("mlp", 35):
        train_step(model, opt, x, y)
    assert [u.step for u in engine.history] == [7, 14, 21, 28]


# ----------------------------------------------------------------------------- RigL


def test_rigl_grows_where_the_dense_gradient_is_largest_and_resets_their_state() -> None:
    model, opt, engine = sparse_mlp("rigl", update_every=4, total_steps=40)
    data = list(batches("mlp", 4))
    for x, y in data[:3]:
        train_step(model, opt, x, y)
        # between updates gradients are masked, so clipping and the optimizer see sparse grads
        for n, p in model.named_parameters():
            if n in engine.masks:
                assert torch.count_nonzero(p.grad[~engine.masks[n]]) == 0
    opt.zero_grad()
    nn.functional.cross_entropy(model(data[3][0]), data[3][1]).backward()
    dense = {n: p.grad.clone() for n, p in model.named_parameters() if n in engine.masks}
    old = {n: m.clone() for n, m in engine.masks.items()}
    for n in dense:
        assert torch.count_nonzero(dense[n][~old[n]]) > 0  # the update step sees dense grads
    opt.step()
    update = engine.last_update
    assert update is not None
    assert update.step == 4
    for n, p in model.named_parameters():
        if n not in old:
            continue
        grown = engine.masks[n] & ~old[n]
        assert torch.equal(grown, expected_top(dense[n].abs(), ~old[n], update.grown[n]))
        assert update.grown[n] == update.pruned[n]  # no redistribution
        assert torch.count_nonzero(opt.state[p]["momentum_buffer"][grown]) == 0


def test_rigl_stops_updating_at_three_quarters_of_training() -> None:
    model, opt, engine = sparse_mlp("rigl", update_every=5, total_steps=40)
    for x, y in batches("mlp", 40):
        train_step(model, opt, x, y)
    assert [u.step for u in engine.history] == [5, 10, 15, 20, 25]


def test_erk_gives_small_layers_higher_density() -> None:
    _, _, engine = sparse_mlp("rigl")
    d = engine.layer_densities()
    # fc1: 32x20, fc2: 32x32, fc3: 5x32 -> ERK density ∝ (out + in) / (out * in)
    rho = {"fc1.weight": 52 / 640, "fc2.weight": 64 / 1024, "fc3.weight": 37 / 160}
    assert d["fc3.weight"] > d["fc1.weight"] > d["fc2.weight"]
    assert d["fc1.weight"] / d["fc2.weight"] == pytest.approx(
        rho["fc1.weight"] / rho["fc2.weight"], rel=0.05
    )


# ----------------------------------------------------------------------------- SET, DSR


def test_set_prunes_at_a_constant_rate() -> None:
    model, opt, engine = sparse_mlp("set", update_every=3, total_steps=30)
    for x, y in batches("mlp", 30):
        train_step(model, opt, x, y)
    assert {u.prune_rate for u in engine.history} == {0.3}
    budget = sum(int(m.sum()) for m in engine.masks.values())
    assert all(u.total_pruned == u.total_grown for u in engine.history)
    assert budget == round(0.2 * (640 + 1024 + 160))


def test_dsr_prunes_globally_but_never_empties_a_layer() -> None:
    model, opt, engine = sparse_mlp("dsr", update_every=0)
    train_step(model, opt, *make_batch("mlp"))
    with torch.no_grad():
        model.fc3.weight.mul_(1e-6)  # every fc3 weight is smaller than any other
    update = engine.update_masks(prune_rate=0.5)
    assert int(engine.masks["fc3.weight"].sum()) >= 1
    assert update.pruned["fc3.weight"] == update.pruned["fc3.weight"]
    kept_fc3 = int(engine.masks["fc3.weight"].sum()) - update.grown["fc3.weight"]
    assert kept_fc3 == 1  # all but the protected weight went
    # regrowth follows the survivors: fc3 kept 1 weight, so it gets (almost) none back
    assert update.grown["fc3.weight"] <= 1


# ------------------------------------------------------------------ GMP, SNIP, static, dense


def test_gmp_follows_the_cubic_schedule_to_the_target() -> None:
    model, opt, engine = sparse_mlp("gmp", update_every=4, total_steps=40)
    numel = {"fc1.weight": 640, "fc2.weight": 1024, "fc3.weight": 160}
    final = {n: round(0.2 * v) for n, v in numel.items()}  # uniform: every layer at 20%
    for step, (x, y) in enumerate(batches("mlp", 40), start=1):
        train_step(model, opt, x, y)
        if engine.last_update is not None and engine.last_update.step == step:
            p = min(step / 30, 1.0)  # stop_at 0.75 * 40
            frac = 1 - (1 - p) ** 3
            for n, mask in engine.masks.items():
                assert int(mask.sum()) == round(numel[n] - (numel[n] - final[n]) * frac)
    assert [u.step for u in engine.history] == [4, 8, 12, 16, 20, 24, 28, 30]
    assert {n: int(m.sum()) for n, m in engine.masks.items()} == final


def test_snip_keeps_the_globally_most_salient_weights_of_the_first_batch() -> None:
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = sl.sparsify(model, opt, method="snip", density=0.1, seed=0)
    x, y = make_batch("mlp")
    nn.functional.cross_entropy(reference(x), y).backward()
    names = list(engine.masks)
    sal = {n: (p.grad * p).abs().detach() for n, p in reference.named_parameters() if n in names}
    train_step(model, opt, x, y)
    flat = torch.cat([sal[n].reshape(-1) for n in names])
    budget = round(0.1 * flat.numel())
    threshold = torch.sort(flat, descending=True).values[budget - 1]
    for n in names:
        assert torch.equal(engine.masks[n], sal[n] >= threshold), n
    first = engine.history[0]
    assert first.step == 0
    assert first.kind == "prune"
    # later steps never change the masks
    masks = {n: m.clone() for n, m in engine.masks.items()}
    for xb, yb in batches("mlp", 5):
        train_step(model, opt, xb, yb)
    assert all(torch.equal(masks[n], engine.masks[n]) for n in names)


def test_static_masks_never_change() -> None:
    model, opt, engine = sparse_mlp("static")
    masks = {n: m.clone() for n, m in engine.masks.items()}
    for x, y in batches("mlp", 10):
        train_step(model, opt, x, y)
    assert all(torch.equal(masks[n], engine.masks[n]) for n in masks)
    assert not engine.history


def test_dense_is_identical_to_training_without_the_engine() -> None:
    torch.manual_seed(0)
    plain = MLP()
    model = copy.deepcopy(plain)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = sl.sparsify(model, opt, method="dense")
    for x, y in batches("mlp", 5):
        train_step(plain, opt_plain, x, y)
        train_step(model, opt, x, y)
    assert engine.density() == 1.0
    assert engine.step == 5
    for p1, p2 in zip(plain.parameters(), model.parameters(), strict=True):
        assert torch.equal(p1, p2)


# ----------------------------------------------------------------------------- parts and options


def test_layer_density_override_keeps_its_count_through_updates() -> None:
    model, opt, engine = sparse_mlp(update_every=2, layer_density={"fc3.weight": 0.5})
    for x, y in batches("mlp", 20):
        train_step(model, opt, x, y)
        assert int(engine.masks["fc3.weight"].sum()) == 80
    free = int(engine.masks["fc1.weight"].sum()) + int(engine.masks["fc2.weight"].sum())
    assert free == round(0.2 * (640 + 1024))


def test_dense_first_and_last_leave_those_layers_unmasked() -> None:
    model = ConvBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = sl.sparsify(model, opt, density=0.2, total_steps=10, dense_first=True, dense_last=True)
    assert list(engine.masks) == ["features.3.weight"]


def test_include_and_exclude_by_name_pattern_and_type() -> None:
    model = nn.ModuleDict(
        {"emb": nn.Embedding(50, 8), "proj": nn.Linear(8, 8), "head": nn.Linear(8, 3)}
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sl.sparsify(
        model, opt, method="static", density=0.3, include=[nn.Embedding], exclude=["re:hea.*"]
    )
    assert sorted(engine.masks) == ["emb.weight", "proj.weight"]


@pytest.mark.parametrize("policy", ["reset_pruned", "reset_both"])
def test_optimizer_state_of_pruned_weights_can_be_reset(policy: str) -> None:
    model, opt, engine = sparse_mlp(optimizer="adam", update_every=0, optimizer_state=policy)
    train_step(model, opt, *make_batch("mlp"))
    old = engine.masks["fc2.weight"].clone()
    engine.update_masks(prune_rate=0.3)
    new = engine.masks["fc2.weight"]
    state = opt.state[model.fc2.weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.count_nonzero(state[key][old & ~new]) == 0
        if policy == "reset_both":
            assert torch.count_nonzero(state[key][new & ~old]) == 0


def test_register_a_new_method_preset() -> None:
    sl.register_method(
        "test_set_erk",
        schedule="periodic",
        init="erk",
        prune="set",
        growth="random",
        prune_rate=0.2,
        prune_rate_schedule="constant",
    )
    try:
        assert "test_set_erk" in sl.methods()
        model, opt, engine = sparse_mlp("test_set_erk", update_every=3)
        for x, y in batches("mlp", 6):
            train_step(model, opt, x, y)
        assert [u.prune_rate for u in engine.history] == [0.2, 0.2]
        with pytest.raises(ValueError, match="unknown option 'prune_ratio'"):
            sl.register_method("test_bad", schedule="fixed", prune=None, growth=None, prune_ratio=1)
    finally:
        sl.METHODS.unregister("test_set_erk")
