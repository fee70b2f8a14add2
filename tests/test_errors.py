"""Bad input gets a clear error, and nothing is half-applied."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch import nn

import sparselearn as sl
from tests.helpers import MLP, ConvBN, make_batch, save_load, train_step


def mlp_and_sgd() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = MLP()
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_density_outside_unit_interval(density: float) -> None:
    model, opt = mlp_and_sgd()
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        sl.sparsify(model, opt, method="static", density=density)


def test_density_of_wrong_type() -> None:
    model, opt = mlp_and_sgd()
    with pytest.raises(TypeError, match="density must be a number"):
        sl.sparsify(model, opt, method="static", density="0.1")


def test_missing_density() -> None:
    model, opt = mlp_and_sgd()
    with pytest.raises(ValueError, match="needs a density"):
        sl.sparsify(model, opt, method="static")


def test_unknown_method_lists_choices_and_closest() -> None:
    model, opt = mlp_and_sgd()
    with pytest.raises(ValueError, match="unknown method 'sparse_momentun'") as err:
        sl.sparsify(model, opt, method="sparse_momentun", density=0.1, total_steps=10)
    msg = str(err.value)
    assert "did you mean 'sparse_momentum'?" in msg
    for name in sl.methods():
        assert name in msg


@pytest.mark.parametrize(
    ("option", "value", "closest"),
    [
        ("growth", "momentun", "momentum"),
        ("prune", "magnitud", "magnitude"),
        ("redistribution", "momentom", "momentum"),
        ("init", "ERK", "erk"),
        ("prune_rate_schedule", "cosin", "cosine"),
    ],
)
def test_unknown_part_name(option: str, value: str, closest: str) -> None:
    model, opt = mlp_and_sgd()
    with pytest.raises(ValueError, match=f"did you mean '{closest}'") as err:
        sl.sparsify(model, opt, density=0.1, total_steps=10, **{option: value})
    assert "choices:" in str(err.value)


def test_unknown_option_name_raises_with_suggestion() -> None:
    model, opt = mlp_and_sgd()
    with pytest.raises(
        TypeError, match="unknown option 'updat_every'; did you mean 'update_every'"
    ):
        sl.sparsify(model, opt, density=0.1, total_steps=10, updat_every=5)


def test_option_without_effect_raises() -> None:
    model, opt = mlp_and_sgd()
    with pytest.raises(ValueError, match="prune_rate have no effect with method 'static'"):
        sl.sparsify(model, opt, method="static", density=0.1, prune_rate=0.3)
    with pytest.raises(ValueError, match="init have no effect with method 'snip'"):
        sl.sparsify(model, opt, method="snip", density=0.1, init="erk")


def test_nothing_to_sparsify() -> None:
    model = nn.Sequential(nn.BatchNorm1d(4), nn.LayerNorm(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="nothing to sparsify in Sequential"):
        sl.sparsify(model, opt, method="static", density=0.5)


def test_optimizer_that_does_not_hold_the_parameters() -> None:
    model, _ = mlp_and_sgd()
    other = MLP()
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer does not hold 3 of the parameters"):
        sl.sparsify(model, opt, method="static", density=0.5)


def test_not_an_optimizer() -> None:
    model, _ = mlp_and_sgd()
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        sl.sparsify(model, object(), method="static", density=0.5)


def test_schedule_without_total_steps() -> None:
    model, opt = mlp_and_sgd()
    with pytest.raises(ValueError, match="pass total_steps"):
        sl.sparsify(model, opt, method="sparse_momentum", density=0.1)
    with pytest.raises(ValueError, match="pass total_steps"):
        sl.sparsify(model, opt, method="gmp", density=0.1)


def test_total_steps_not_needed_without_a_schedule() -> None:
    # set: a constant prune rate and no stop, so nothing depends on the run length
    for method in ("static", "snip", "dense", "set"):
        model, opt = mlp_and_sgd()
        density = None if method == "dense" else 0.3
        engine = sl.sparsify(model, opt, method=method, density=density)
        engine.remove()


def test_epoch_updates_need_steps_per_epoch() -> None:
    model, opt = mlp_and_sgd()
    with pytest.raises(ValueError, match="update_every='epoch' needs steps_per_epoch"):
        sl.sparsify(model, opt, density=0.1, total_steps=100, update_every="epoch")


def test_density_too_low_for_a_layer() -> None:
    model, opt = mlp_and_sgd()
    with pytest.raises(ValueError, match=r"leaves no active weight in fc3.weight \(160 weights\)"):
        sl.sparsify(model, opt, method="static", density=0.001, init="uniform")


def test_sparsify_twice_on_one_model() -> None:
    model, opt = mlp_and_sgd()
    engine = sl.sparsify(model, opt, method="static", density=0.5)
    with pytest.raises(RuntimeError, match="already sparsified"):
        sl.sparsify(model, opt, method="static", density=0.5)
    # also through another wrapper holding the same parameters
    wrapper = nn.Sequential(model)
    with pytest.raises(RuntimeError, match="already sparsified"):
        sl.sparsify(wrapper, opt, method="static", density=0.5)
    engine.remove()
    sl.sparsify(model, opt, method="static", density=0.5)


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"include": ["fc9.weight"]}, "include: no parameter named 'fc9.weight'"),
        ({"include": ["fc1.bias"]}, "include: 'fc1.bias' cannot be sparsified"),
        ({"include": ["re:nothing.*"]}, "include: 're:nothing.*' matches no parameter"),
        ({"exclude": ["fc4.weight"]}, "exclude: 'fc4.weight' matches none"),
        ({"layer_density": {"re:conv.*": 0.5}}, "layer_density: 're:conv.*' matches none"),
        ({"layer_density": {"fc1.weight": 0.0}}, r"layer_density\['fc1.weight'\] must be in"),
        (
            {"layer_density": {"fc1.weight": 0.5, "re:fc.*": 0.3}},
            "fc1.weight gets 0.5 from 'fc1.weight' and 0.3 from 're:fc.*'",
        ),
        ({"exclude": ["re:fc.*"]}, "nothing to sparsify"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"update_every": -1}, "update_every must be an integer >= 0"),
        ({"stop_at": 0.0}, r"stop_at must be in \(0, 1\]"),
        ({"start_at": 0.8, "stop_at": 0.5}, "start_at .* must be below stop_at"),
        ({"prune_rate": 1.0}, r"prune_rate must be in \[0, 1\)"),
        ({"optimizer_state": "reset"}, "unknown optimizer_state policy 'reset'"),
        ({"growth": "random", "redistribution": "none", "prune": None}, "needs a prune criterion"),
        ({"growth": "global_momentum"}, "needs redistribution='none'"),
    ],
)
def test_bad_options(options: dict[str, object], pattern: str) -> None:
    model, opt = mlp_and_sgd()
    with pytest.raises((ValueError, TypeError), match=pattern):
        sl.sparsify(model, opt, method="sparse_momentum", density=0.2, total_steps=50, **options)


def test_dense_method_rejects_a_density() -> None:
    model, opt = mlp_and_sgd()
    with pytest.raises(ValueError, match=r"density must be 1\.0"):
        sl.sparsify(model, opt, method="dense", density=0.5)


def test_sparse_embedding_is_refused() -> None:
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="sparse=True"):
        sl.sparsify(model, opt, method="static", density=0.5, include=[nn.Embedding])


def test_non_finite_gradients_skip_the_update_and_keep_masks_valid(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, opt = mlp_and_sgd()
    engine = sl.sparsify(model, opt, density=0.2, total_steps=20, update_every=2)
    x, y = make_batch("mlp")
    train_step(model, opt, x, y)
    masks = {n: m.clone() for n, m in engine.masks.items()}
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    row, col = (~engine.masks["fc2.weight"]).nonzero()[0].tolist()
    model.fc2.weight.grad[row, col] = float("nan")  # an inactive position: poisons momentum
    with caplog.at_level(logging.WARNING, logger="sparselearn"):
        opt.step()  # step 2: an update is due
    assert engine.last_update is not None
    assert engine.last_update.kind == "skipped"
    assert "mask update skipped: non-finite momentum of fc2.weight" in caplog.text
    # the optimizer wrote NaN into that inactive weight; the engine still leaves an exact zero
    assert model.fc2.weight[row, col].item() == 0.0
    for name, mask in engine.masks.items():
        assert torch.equal(mask, masks[name])
    assert round(0.2 * sum(m.numel() for m in masks.values())) == sum(
        int(m.sum()) for m in engine.masks.values()
    )


def test_non_finite_plain_sgd_average_is_reset_so_training_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)  # no momentum: the engine keeps an EMA
    engine = sl.sparsify(model, opt, density=0.2, total_steps=20, update_every=2)
    x, y = make_batch("mlp")
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    model.fc1.weight.grad[1, 1] = float("inf")
    with torch.no_grad():
        model.fc1.weight.grad[1, 1] = float("inf")
    with caplog.at_level(logging.WARNING, logger="sparselearn"):
        opt.step()
        model.fc1.weight.data.nan_to_num_(0.0, 0.0, 0.0)  # the user repairs the weights
        train_step(model, opt, x, y)  # step 2: update skipped, EMA reset
    assert engine.history[-1].kind == "skipped"
    assert "reset the gradient moving average of fc1.weight" in caplog.text
    train_step(model, opt, x, y)
    train_step(model, opt, x, y)  # step 4: the next update runs
    assert engine.history[-1].kind == "regrow"


def test_failed_load_changes_nothing() -> None:
    model, opt = mlp_and_sgd()
    engine = sl.sparsify(model, opt, density=0.2, total_steps=20, update_every=2, seed=1)
    state = save_load(engine.state_dict())
    before = {n: m.clone() for n, m in engine.masks.items()}

    model2, opt2 = mlp_and_sgd()
    other = sl.sparsify(model2, opt2, density=0.3, total_steps=20, update_every=2, seed=2)
    other_before = {n: m.clone() for n, m in other.masks.items()}
    with pytest.raises(ValueError, match=r"different configuration \(density: saved 0.2, here 0.3"):
        other.load_state_dict(state)
    bad = dict(state)
    bad["masks"] = {**state["masks"], "fc3.weight": torch.ones(2, 2, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"saved mask for fc3\.weight"):
        engine.load_state_dict(bad)
    with pytest.raises(ValueError, match="not a sparselearn engine state"):
        engine.load_state_dict({"masks": {}})
    for name in before:
        assert torch.equal(engine.masks[name], before[name])
        assert torch.equal(other.masks[name], other_before[name])


def test_removed_engine_refuses_updates() -> None:
    model, opt = mlp_and_sgd()
    engine = sl.sparsify(model, opt, density=0.2, total_steps=20)
    engine.remove()
    with pytest.raises(RuntimeError, match="engine was removed"):
        engine.update_masks()


def test_update_masks_on_a_method_without_updates() -> None:
    model, opt = mlp_and_sgd()
    engine = sl.sparsify(model, opt, method="static", density=0.2)
    with pytest.raises(RuntimeError, match="never updates masks"):
        engine.update_masks()


def test_manual_update_of_a_gradient_method_is_refused() -> None:
    model, opt = mlp_and_sgd()
    engine = sl.sparsify(model, opt, method="rigl", density=0.2, total_steps=20)
    train_step(model, opt, *make_batch("mlp"))
    with pytest.raises(RuntimeError, match="need the dense gradient"):
        engine.update_masks()


def test_masks_mapping_is_read_only() -> None:
    model, opt = mlp_and_sgd()
    engine = sl.sparsify(model, opt, method="static", density=0.2)
    with pytest.raises(TypeError):
        engine.masks["fc1.weight"] = torch.ones(1, dtype=torch.bool)


def test_conv_error_messages_name_the_model_parameters() -> None:
    model = ConvBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"exclude: 'features\.1\.weight' matches none") as err:
        sl.sparsify(model, opt, method="static", density=0.5, exclude=["features.1.weight"])
    # BatchNorm weights are never sparsified: the message lists what is
    assert re.search(
        r"features\.0\.weight, features\.3\.weight, classifier\.weight", str(err.value)
    )


def test_options_are_checked_in_one_place_before_the_run_length_is_known() -> None:
    from sparselearn.methods import make_config

    cfg = make_config(
        "sparse_momentum", 0.1, run_length_known=False, update_every="epoch", momentum_window=20
    )
    assert cfg.total_steps is not None
    assert cfg.interval >= 20
    with pytest.raises(ValueError, match="have no effect with method 'static'"):
        make_config("static", 0.1, run_length_known=False, prune_rate=0.2)
    with pytest.raises(TypeError, match="did you mean 'update_every'"):
        make_config("rigl", 0.1, run_length_known=False, update_evry=3)
    with pytest.raises(ValueError, match="needs a density"):
        make_config("rigl", run_length_known=False)
    # a length the run does know is used as it is
    with pytest.raises(ValueError, match="momentum_window"):
        make_config("sparse_momentum", 0.1, 100, update_every=10, momentum_window=20)
