"""A model built on the meta device, sparsified and materialised with its active weights only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparselearn as sl
from sparselearn.accel.layers import SparseLinear, SparseWeight


def _meta_mlp() -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(
            nn.Linear(300, 400),
            nn.LayerNorm(400),
            nn.ReLU(),
            nn.Linear(400, 400),
            nn.ReLU(),
            nn.Linear(400, 10),
        )


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """The two-sample Kolmogorov-Smirnov distance."""
    both = torch.sort(torch.cat([a, b])).values
    fa = torch.searchsorted(torch.sort(a).values, both, right=True) / a.numel()
    fb = torch.searchsorted(torch.sort(b).values, both, right=True) / b.numel()
    return float((fa - fb).abs().max())


def test_a_meta_model_is_materialised_with_its_active_weights_drawn_as_its_layers_draw() -> None:
    torch.manual_seed(0)
    model = _meta_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = sl.sparsify(model, opt, "rigl", 0.1, total_steps=20, update_every=2, seed=0)
    assert {layer.kind for layer in engine.layers} == {"planned"}
    report = sl.accelerate(model, engine, mode="sparse")
    assert [c.reason for c in report.layers] == ["materialised from the meta device"] * 3
    assert all(not p.is_meta for p in model.parameters())
    assert all(not b.is_meta for b in model.buffers())
    # the optimizer holds the model's parameters, and nothing else
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}
    # the budget is exact, the layers' counts those of the init (ERK), positions distinct
    assert engine.density() == pytest.approx(0.1, abs=1e-4)
    for layer in engine.layers:
        positions = layer.positions()  # type: ignore[attr-defined]
        assert torch.equal(positions, torch.unique(positions))
    # in distribution, the active values are a dense layer's: uniform within 1/sqrt(fan_in)
    hidden = model[3]
    assert isinstance(hidden, SparseLinear)
    values = hidden.weight_sparse.values.detach()
    dense = nn.Linear(400, 400).weight.detach().reshape(-1)
    bound = 1 / 400**0.5
    assert float(values.abs().max()) <= bound
    assert _ks(values, dense) < 0.03  # about 16k values against 160k
    assert hidden.bias is not None
    assert float(hidden.bias.detach().abs().max()) <= bound
    assert float(hidden.bias.detach().std()) > 0.5 * bound / 3**0.5  # drawn, not zeros
    norm = model[1]
    assert torch.equal(norm.weight.detach(), torch.ones(400))  # its own reset_parameters
    # it trains, with mask updates in index form
    for _ in range(6):
        x, y = torch.randn(8, 300), torch.randint(0, 10, (8,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert [u.kind for u in engine.history] == ["regrow"] * 3
    assert engine.density() == pytest.approx(0.1, abs=1e-4)


def test_the_positions_of_a_meta_model_follow_the_seed() -> None:
    masks = []
    for _ in range(2):
        model = _meta_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        engine = sl.sparsify(model, opt, "static", 0.05, seed=3)
        masks.append([layer.mask for layer in engine.layers])
    assert all(torch.equal(a, b) for a, b in zip(*masks, strict=True))


def test_a_meta_model_refuses_to_train_or_stay_dense_before_it_is_materialised() -> None:
    model = _meta_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sl.sparsify(model, opt, "set", 0.1, total_steps=10, update_every=5)
    with pytest.raises(RuntimeError, match=r"still on the meta device: call sl.accelerate"):
        opt.step()
    with pytest.raises(ValueError, match="can only be materialised sparse"):
        sl.accelerate(model, engine, mode="dense")


def test_what_a_meta_model_cannot_do_is_refused_by_name() -> None:
    model = _meta_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="starts from the dense weights"):
        sl.sparsify(model, opt, "gmp", 0.1, total_steps=10)
    mixed = nn.Sequential(nn.Linear(4, 4), _meta_mlp())
    with pytest.raises(ValueError, match="the other sparsified weights are not"):
        sl.sparsify(mixed, torch.optim.SGD(mixed.parameters(), lr=0.1), "static", 0.5)

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.ones(400))

    with torch.device("meta"):
        odd = nn.Sequential(nn.Linear(300, 400), Scale(), nn.Linear(400, 10))
    opt = torch.optim.SGD(odd.parameters(), lr=0.1)
    engine = sl.sparsify(odd, opt, "static", 0.2)
    with pytest.raises(ValueError, match=r"1 holds tensors on the meta device and no reset_par"):
        sl.accelerate(odd, engine, mode="sparse")


def test_a_weight_built_from_positions_equals_one_built_from_its_dense_mask() -> None:
    torch.manual_seed(0)
    dense = torch.randn(7, 3, 3, 3)
    mask = torch.rand(7, 3, 3, 3) < 0.3
    positions = mask.reshape(-1).nonzero().squeeze(1)
    a = SparseWeight(dense, mask)
    b = SparseWeight.from_positions((7, 3, 3, 3), positions, dense.reshape(-1)[positions])
    for name in ("values", "crow", "col", "crow_t", "col_t", "perm", "perm_inv"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    new = torch.rand(7, 3, 3, 3) < 0.3
    source = a.restructure(new)
    source_b = b.restructure_positions(new.reshape(-1).nonzero().squeeze(1))
    assert torch.equal(source, source_b)
    kept = source >= 0
    assert torch.equal(a.values[kept], dense.reshape(-1)[new.reshape(-1)][kept])
