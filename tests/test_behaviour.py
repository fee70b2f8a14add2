"""Every recorded result is reproduced bit for bit (see tests/behaviour_record.py): masks,
weights and update histories of every preset on three models and two optimizers, accelerated
runs, the 2019 API, a ``sparselearn train`` run, and run directories written by sparselearn
0.1.0 resumed to their end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.behaviour_record import RECORDS, compute_in_subprocess


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    want = json.loads(RECORDS.read_text())
    got = compute_in_subprocess(tmp_path_factory.mktemp("behaviour"))
    if got["fingerprint"] != want["fingerprint"]:
        pytest.skip(
            "this machine's dense arithmetic differs from the one the records were made on "
            f"(fingerprint {got['fingerprint']}, recorded {want['fingerprint']}): the records "
            "cannot be compared here"
        )
    return want, got


# Run settings added after the records were made, with the value that keeps 0.1.0's behaviour
# (a run's summary lists its whole configuration): they are new keys, not differences.
ADDED_SETTINGS = {
    "warmup": (0.0).hex(),
    "tensorboard": False,
    "steps_per_epoch": None,
    "structure": "unstructured",
    "neuron_ablation": (0.0).hex(),
}


def _differences(want: Any, got: Any, path: str = "") -> list[str]:
    if isinstance(want, dict) and isinstance(got, dict):
        out = []
        for key in sorted(set(want) | set(got)):
            if key not in want and path.endswith("/config") and key in ADDED_SETTINGS:
                if got[key] != ADDED_SETTINGS[key]:
                    out.append(f"{path}/{key}: {got[key]!r}, which 0.1.0 did not do")
                continue
            if key not in got or key not in want:
                out.append(f"{path}/{key}: {'missing' if key not in got else 'not recorded'}")
            else:
                out += _differences(want[key], got[key], f"{path}/{key}")
        return out
    return [] if want == got else [f"{path}: recorded {want!r}, now {got!r}"]


@pytest.mark.parametrize("section", ["engine", "accelerated", "compat", "train", "legacy"])
def test_results_are_the_recorded_ones_bit_for_bit(
    records: tuple[dict[str, Any], dict[str, Any]], section: str
) -> None:
    want, got = records
    assert want[section], "nothing recorded"
    diff = _differences(want[section], got[section])
    assert not diff, "\n".join(diff[:20])


def test_the_records_cover_every_preset_model_and_optimizer() -> None:
    import sparselearn as sl

    want = json.loads(RECORDS.read_text())
    covered = {key.split("/")[2] for key in want["engine"]}
    # presets with a structure need layers whose inputs come in whole blocks, which these
    # models do not have: tests/engine/test_structure.py covers them
    assert covered == {m for m in sl.methods() if "structure" not in sl.METHODS.get(m).defaults}
    assert {key.split("/")[0] for key in want["engine"]} == {"mlp", "conv_bn", "lstm"}
    assert {key.split("/")[1] for key in want["engine"]} == {"sgd", "adam"}
    assert set(want["legacy"]) == {"sm", "rigl-accelerated"}
    assert Path(RECORDS.parent / "legacy-runs.tar.gz").stat().st_size > 0
