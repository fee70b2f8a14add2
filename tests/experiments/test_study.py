"""`sparselearn study`: grids of runs, in parallel, finished runs skipped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sparselearn.experiments.study import expand, run_study
from tests.datafiles import write_mnist_like


def test_expand_a_grid(tmp_path: Path) -> None:
    spec = {
        "base": {"data": "mnist", "epochs": 2},
        "models": ["lenet5", "lenet300-100"],
        "methods": {"dense": {}, "sparse_momentum": {"update_every": "epoch"}, "static": {}},
        "densities": [0.05, 0.1],
        "seeds": [1, 2, 3],
    }
    runs = expand(spec, tmp_path)
    assert len(runs) == 2 * (1 + 2 * 2) * 3
    folders = {r.folder.relative_to(tmp_path).as_posix() for r in runs}
    assert "lenet5/dense/seed-2" in folders
    assert "lenet300-100/sparse_momentum/density-0.05/seed-3" in folders
    sm = next(r for r in runs if r.folder.parts[-3] == "sparse_momentum")
    assert sm.config["update_every"] == "epoch"
    assert sm.config["epochs"] == 2
    assert runs[0].config["model"] == "lenet5"  # the long runs start first


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"models": ["lenet5"], "methods": {"dense": {}}, "seeds": [1], "extra": 1},
            "unknown study keys",
        ),
        ({"models": ["lenet5"], "methods": {"rigl": {}}, "seeds": [1]}, "needs densities"),
        (
            {"models": ["lenet5"], "methods": {"dense": {}}, "seeds": []},
            "seeds must be a non-empty list",
        ),
        (
            {"models": ["lenet5"], "methods": {"dense": {"epochs": 0}}, "seeds": [1]},
            "epochs must be",
        ),
        ({"models": ["lenet5"], "methods": {"dense": {"prune_rat": 1}}, "seeds": [1]}, "prune_rat"),
    ],
)
def test_bad_specs_fail_before_anything_runs(
    tmp_path: Path, spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        expand(spec, tmp_path)


def test_run_in_parallel_and_skip_finished(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_mnist_like(tmp_path / "mnist", n_train=300, n_test=100)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"base: {{data: mnist, data_dir: {data}, download: false, epochs: 1, batch_size: 50}}\n"
        "models: [lenet300-100]\nmethods: {dense: {}, static: {}}\ndensities: [0.2]\nseeds: [1]\n"
    )
    lines: list[str] = []
    assert run_study(spec, out=tmp_path / "study", jobs=2, echo=lines.append) == 0
    assert "2 runs, 0 finished, 2 to run, 2 at a time" in lines[0]
    assert lines[-1].startswith("study done in ")
    assert "0 failed" in lines[-1]
    assert (tmp_path / "study/lenet300-100/dense/seed-1/summary.json").exists()
    assert (tmp_path / "study/lenet300-100/static/density-0.2/seed-1/summary.json").exists()
    # without echo, progress goes to the library's logger, not to stdout
    with caplog.at_level("INFO", logger="sparselearn"):
        assert run_study(spec, out=tmp_path / "study", jobs=2) == 0
    assert "2 runs, 2 finished, 0 to run" in caplog.text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_terminated_study_stops_its_trainings(tmp_path: Path) -> None:
    """SIGTERM to the study stops the training it runs (it would otherwise go on alone, holding
    its folder, and a restarted study would find the folder in use); the run then resumes."""
    data = write_mnist_like(tmp_path / "mnist", n_train=200, n_test=50)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"base: {{data: mnist, data_dir: {data}, download: false, epochs: 1000, batch_size: 50}}"
        "\nmodels: [lenet300-100]\nmethods: {static: {}}\ndensities: [0.2]\nseeds: [1]\n"
    )
    run = tmp_path / "study/lenet300-100/static/density-0.2/seed-1"
    study = subprocess.Popen(
        [sys.executable, "-m", "sparselearn", "study", str(spec), "--out", str(tmp_path / "study")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint.pt").exists():
            assert study.poll() is None, study.communicate()[0]
            assert time.monotonic() < deadline, "the training wrote no checkpoint in 120 s"
            time.sleep(0.2)
        training = json.loads((run / ".lock").read_text())["pid"]
        assert _alive(training)
        study.send_signal(signal.SIGTERM)
        output, _ = study.communicate(timeout=60)
    finally:
        if study.poll() is None:
            study.kill()
    assert study.returncode == 130, output
    assert "study stopped: 1 running training(s) stopped" in output
    assert "run the same command to resume" in output
    assert not _alive(training)
    assert (run / "checkpoint.pt").exists()
    assert not (run / "summary.json").exists()


def test_variants_of_one_method_are_labelled(tmp_path: Path) -> None:
    spec: dict[str, Any] = {
        "models": ["lenet300-100"],
        "methods": {
            "sparse_momentum": {},
            "sm-window-50": {"method": "sparse_momentum", "momentum_window": 50},
        },
        "densities": [0.05],
        "seeds": [1],
    }
    runs = {r.folder.relative_to(tmp_path).parts[1]: r.config for r in expand(spec, tmp_path)}
    assert set(runs) == {"sparse_momentum", "sm-window-50"}
    assert runs["sm-window-50"]["method"] == "sparse_momentum"
    assert runs["sm-window-50"]["label"] == "sm-window-50"
    assert runs["sm-window-50"]["momentum_window"] == 50
    assert "label" not in runs["sparse_momentum"]


def test_a_study_can_keep_its_runs_per_machine(tmp_path: Path) -> None:
    from sparselearn.kernels.machine import slug

    assert slug("AMD EPYC (family 25 model 1; AVX2); kernels -march=native") == (
        "amd-epyc-family-25-model-1-avx2-kernels-march-native"
    )
    spec = tmp_path / "timing.yaml"
    spec.write_text(
        f"out: {tmp_path}/timing/{{machine}}\nmodels: [lenet5]\nmethods: {{dense: {{}}}}\n"
        "seeds: [1]\n"
    )
    said: list[str] = []
    assert run_study(spec, dry_run=True, echo=said.append) == 0
    folder = tmp_path / "timing" / slug() / "lenet5" / "dense" / "seed-1"
    assert said[-1].strip() == str(folder)
    assert "{" not in said[-1]


STUDIES = sorted((Path(__file__).resolve().parents[2] / "studies").glob("*.yaml"))


@pytest.mark.parametrize("spec", STUDIES, ids=[p.stem for p in STUDIES])
def test_the_shipped_studies_expand(
    spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sparselearn.experiments import same_cost
    from sparselearn.experiments.runs import load_yaml

    # a same-cost density is resolved by building the models (tests/experiments/
    # test_same_cost.py); here each names a valid view
    def resolve(cfg: dict[str, Any], reference: str, view: str) -> float:
        assert view in same_cost.VIEWS
        return 0.1

    monkeypatch.setattr(same_cost, "resolve", resolve)
    runs = expand(load_yaml(spec), tmp_path, str(spec))
    assert runs
    assert len({r.folder for r in runs}) == len(runs)
    if spec.stem == "tiny_gpt":  # the study docs/results.md reports: 1 + 4 methods x 3 x 3
        assert len(runs) == 39
        assert {r.config["model"] for r in runs} == {"tiny-gpt"}
