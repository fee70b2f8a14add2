"""Model families: convolutions with BatchNorm, MLPs, weight tying, recurrent networks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparselearn as sl
from sparselearn.structure import Groups, parse_structure
from tests.helpers import (
    MODELS,
    RNN_INCLUDE,
    TiedLM,
    assert_inactive_zero,
    batches,
    method_options,
    model_options,
    train_step,
)

# presets that keep a structure: their budgets are whole rows' worth (and SRigL removes units),
# and N:M needs inputs in whole blocks (tested below)
STRUCTURED = [m for m in sl.methods() if "structure" in sl.METHODS.get(m).defaults]


@pytest.mark.parametrize("method", [m for m in sl.methods() if m not in STRUCTURED])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_model_trains_sparse_with_every_method(kind: str, method: str) -> None:
    torch.manual_seed(0)
    model = MODELS[kind]()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = sl.sparsify(
        model, opt, method=method, seed=0, **method_options(method, 12), **model_options(kind)
    )
    for x, y in batches(kind, 12):
        train_step(model, opt, x, y)
        assert_inactive_zero(engine, model)
    if engine.config.schedule in ("fixed", "periodic", "one_shot", "gradual"):
        assert engine.density() == pytest.approx(0.2, abs=2e-3)


@pytest.mark.parametrize("method", STRUCTURED)
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_model_keeps_each_structure_or_is_refused_by_name(kind: str, method: str) -> None:
    torch.manual_seed(0)
    model = MODELS[kind]()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    options = {**method_options(method, 12), **model_options(kind)}
    structure = parse_structure(sl.METHODS.get(method).defaults["structure"])
    if structure.kind == "n:m" and kind in ("conv_bn", "gru", "lstm"):
        # their first weights take 1 channel or 6 inputs: N:M needs whole blocks, and the
        # refusal names the way out
        with pytest.raises(ValueError, match=rf"not a multiple of {structure.m}; exclude it"):
            sl.sparsify(model, opt, method=method, seed=0, **options)
        return
    engine = sl.sparsify(model, opt, method=method, seed=0, **options)
    for x, y in batches(kind, 12):
        train_step(model, opt, x, y)
        assert_inactive_zero(engine, model)
        for name, mask in engine.masks.items():
            groups = Groups(name, mask.shape, "out_first", structure)
            assert groups.broken(mask, ablation=engine.config.neuron_ablation > 0) is None


def test_conv_bn_sparsifies_conv_and_linear_weights_only() -> None:
    model = MODELS["conv_bn"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sl.sparsify(model, opt, method="static", density=0.3)
    assert list(engine.masks) == ["features.0.weight", "features.3.weight", "classifier.weight"]
    for name, p in model.named_parameters():
        if name not in engine.masks:
            assert torch.count_nonzero(p) == p.numel() or "bias" in name  # untouched


def test_weight_tying_gives_one_mask_seen_by_both_modules() -> None:
    torch.manual_seed(0)
    model = TiedLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = sl.sparsify(
        model, opt, density=0.3, total_steps=10, update_every=2, include=[nn.Embedding]
    )
    # out.weight is embed.weight: one tensor, one mask, under its first name
    assert sorted(engine.masks) == ["embed.weight", "hidden.weight"]
    assert model.out.weight is model.embed.weight
    for x, y in batches("tied", 10):
        train_step(model, opt, x, y)
        mask = engine.masks["embed.weight"]
        assert torch.count_nonzero(model.out.weight.detach()[~mask]) == 0
    # the tied tensor can also be selected or excluded by its second name
    engine.remove()
    engine2 = sl.sparsify(model, opt, method="static", density=0.3, include=["out.weight"])
    assert "embed.weight" in engine2.masks
    engine2.remove()
    engine3 = sl.sparsify(
        model, opt, method="static", density=0.3, include=["out.weight"], exclude=["out.weight"]
    )
    assert list(engine3.masks) == ["hidden.weight"]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_recurrent_weights_are_sparsified_when_asked(cell: str) -> None:
    torch.manual_seed(0)
    model = MODELS[cell]()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    # the module's `bias` attribute is a bool here: it must not be mistaken for a tensor
    assert isinstance(model.rnn.bias, bool)
    default = sl.sparsify(model, opt, method="static", density=0.5)
    assert list(default.masks) == ["head.weight"]  # recurrent weights only when asked
    default.remove()
    engine = sl.sparsify(
        model, opt, density=0.3, total_steps=12, update_every=3, include=RNN_INCLUDE
    )
    assert sorted(engine.masks) == sorted(
        [f"rnn.weight_{k}_l{i}" for k in ("ih", "hh") for i in (0, 1)] + ["head.weight"]
    )
    for x, y in batches(cell, 12):
        train_step(model, opt, x, y)
        assert_inactive_zero(engine, model)
    assert [u.step for u in engine.history] == [3, 6, 9]  # none at the last step
    engine.remove()
    by_type = sl.sparsify(model, opt, method="static", density=0.3, include=[type(model.rnn)])
    assert len(by_type.masks) == 5  # four recurrent weights (never biases) and the head


def test_module_types_beyond_the_defaults() -> None:
    model = nn.Sequential(nn.Conv1d(3, 8, 3), nn.ConvTranspose2d(8, 4, 2), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sl.sparsify(model, opt, method="static", density=0.5)
    assert list(engine.masks) == ["0.weight", "1.weight", "2.weight"]
