"""The one strict registry idiom."""

from __future__ import annotations

import pytest

import sparselearn as sl
from sparselearn._registry import Registry


def test_duplicates_raise() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a", 2)
    assert reg.get("a") == 1


def test_unknown_name_suggests_the_closest_and_lists_choices() -> None:
    reg: Registry[int] = Registry("growth")
    for name in ("gradient", "momentum", "random"):
        reg.register(name, 0)
    with pytest.raises(ValueError, match="momentun") as err:
        reg.get("momentun")
    assert str(err.value) == (
        "unknown growth 'momentun'; did you mean 'momentum'? (choices: gradient, momentum, random)"
    )
    with pytest.raises(ValueError, match=r"unknown growth 'xyz' \(choices"):
        reg.get("xyz")


def test_case_mismatch_is_suggested() -> None:
    reg: Registry[int] = Registry("init")
    reg.register("erk", 0)
    with pytest.raises(ValueError, match="did you mean 'erk'"):
        reg.get("ERK")


@pytest.mark.parametrize("name", ["", "1abc", "a b", "a.b", None])
def test_invalid_names(name: object) -> None:
    with pytest.raises(ValueError, match="must start with a letter"):
        Registry("x").register(name, 0)


def test_unregister() -> None:
    reg: Registry[int] = Registry("x")
    reg.register("a", 1)
    assert reg.unregister("a") == 1
    assert "a" not in reg
    with pytest.raises(ValueError, match="unknown x 'a'"):
        reg.unregister("a")


def test_public_choices() -> None:
    assert sl.choices("method") == sl.methods()
    assert {"dense", "static", "snip", "set", "dsr", "rigl", "sparse_momentum", "gmp"} <= set(
        sl.methods()
    )
    assert {"magnitude", "set", "global_magnitude", "saliency"} <= set(sl.choices("prune"))
    assert {"momentum", "gradient", "random"} <= set(sl.choices("growth"))
    assert {"none", "momentum", "magnitude", "nonzero", "survivors"} <= set(
        sl.choices("redistribution")
    )
    assert sl.choices("init") == ["er", "erk", "uniform"]
    assert sl.choices("prune_rate_schedule") == ["constant", "cosine", "linear"]
    with pytest.raises(ValueError, match="did you mean 'growth'"):
        sl.choices("grwth")
