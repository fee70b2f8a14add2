"""Nothing lost, nothing silent: resuming as the README says, warnings where a run would not do
what its method says, checked inputs, clean errors, and the 2019 API completed."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import sparselearn as sl
import sparselearn.experiments.cli as cli
from sparselearn.compat import CosineDecay, Masking, add_sparse_args
from sparselearn.experiments.config import TrainConfig
from sparselearn.experiments.report import collect
from sparselearn.experiments.runs import load_yaml, read_metrics
from sparselearn.experiments.study import expand, run_study
from sparselearn.experiments.train import train
from sparselearn.kernels import build
from tests.datafiles import write_mnist_like
from tests.helpers import MLP, ConvBN, batches, make_batch, save_load, train_step

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mnist_like(tmp_path_factory.mktemp("data") / "mnist", n_train=400, n_test=100)


def _flags(data_dir: Path, epochs: int = 2) -> list[str]:
    return [
        "--model",
        "lenet300-100",
        "--data",
        "mnist",
        "--data-dir",
        str(data_dir),
        "--no-download",
        "--epochs",
        str(epochs),
        "--batch-size",
        "50",
        "--density",
        "0.1",
        "--update-every",
        "epoch",
        "--threads",
        "1",
        "--no-progress",
    ]


def _interrupted_run(data_dir: Path, out: Path) -> None:
    """A run stopped after its first epoch of three (as a killed one would be)."""

    class StopError(Exception):
        pass

    def stop(row: dict[str, Any]) -> None:
        raise StopError

    args = cli.build_parser().parse_args(["train", *_flags(data_dir, epochs=3)])
    with pytest.raises(StopError):
        train(cli.resolve_config(args), out, progress=False, on_epoch=stop)


# ----------------------------------------------------------------------------- resuming


def test_the_readme_resume_command_takes_the_runs_own_settings(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    _interrupted_run(data_dir, out)
    assert cli.main(["train", "--out", str(out), "--resume"]) == 0
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1, 2, 3]
    assert "after 3 epochs" in capsys.readouterr().out


def test_flags_given_with_resume_must_agree_except_the_machines(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    _interrupted_run(data_dir, out)
    assert cli.main(["train", "--out", str(out), "--resume", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--lr 0.5 (the run has 0.1)" in err
    assert "--threads" in err  # what may change
    # threads are the machine's: a study resumed with another --jobs gets another count
    assert cli.main(["train", "--out", str(out), "--resume", "--threads", "2"]) == 0


# ----------------------------------------------------------------------------- warnings


def test_a_run_shorter_than_its_update_interval_is_warned_about() -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.warns(sl.SparsityWarning, match=r"update_every=500.*never change.*shorter"):
        sl.sparsify(model, opt, method="sparse_momentum", density=0.1, total_steps=300)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", sl.SparsityWarning)
        sl.sparsify(model, opt, method="sparse_momentum", density=0.1, total_steps=300,
                    update_every=50)  # fmt: skip


def test_report_does_not_pool_runs_that_differ_in_more_than_the_seed(tmp_path: Path) -> None:
    base = TrainConfig(method="sparse_momentum", density=0.05).to_dict()
    for i, (every, seed, acc) in enumerate([(100, 1, 0.8), (100, 2, 0.82), ("epoch", 1, 0.9)]):
        run = tmp_path / f"run{i}"
        run.mkdir()
        summary = {
            "data": "fashion-mnist",
            "model": "lenet300-100",
            "method": "sparse_momentum",
            "density": 0.05,
            "seed": seed,
            "test_acc": acc,
            "config": {**base, "seed": seed, "update_every": every, "threads": seed},
        }
        (run / "summary.json").write_text(json.dumps(summary))
    rows = collect([tmp_path])[("fashion-mnist", "lenet300-100")]
    assert sorted(rows) == [
        'sparse_momentum (update_every="epoch")',
        "sparse_momentum (update_every=100)",
    ]
    assert rows["sparse_momentum (update_every=100)"][0.05].n == 2  # threads differ: same run
    assert rows['sparse_momentum (update_every="epoch")'][0.05].n == 1


# ----------------------------------------------------------------------------- the engine


def test_the_history_is_saved_and_restored() -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = sl.sparsify(model, opt, method="set", density=0.2, total_steps=9, update_every=3)
    for x, y in batches("mlp", 9):
        train_step(model, opt, x, y)
    saved = save_load(engine.state_dict())
    engine.remove()
    fresh = sl.sparsify(model, opt, method="set", density=0.2, total_steps=9, update_every=3)
    fresh.load_state_dict(saved)
    assert [(u.step, u.kind, u.pruned, u.grown) for u in fresh.history] == [
        (u.step, u.kind, u.pruned, u.grown) for u in engine.history
    ]
    assert [u.step for u in fresh.history] == [3, 6]


def test_a_frozen_layer_stays_dense_and_naming_it_is_refused() -> None:
    model = MLP()
    model.fc1.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = sl.sparsify(model, opt, method="rigl", density=0.2, total_steps=6, update_every=2)
    assert sorted(engine.masks) == ["fc2.weight", "fc3.weight"]
    before = model.fc1.weight.detach().clone()
    for x, y in batches("mlp", 6):
        train_step(model, opt, x, y)
    assert torch.equal(model.fc1.weight, before)  # untouched: not masked, not trained
    engine.remove()
    with pytest.raises(ValueError, match=r"include: 'fc1.weight' is frozen"):
        sl.sparsify(model, opt, method="static", density=0.2, include=["fc1.weight"])


def _state_and_engine() -> tuple[dict[str, Any], sl.SparseEngine]:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = sl.sparsify(model, opt, method="rigl", density=0.2, total_steps=6, update_every=2)
    return save_load(engine.state_dict()), engine


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: m["fc2.weight"].fill_(True), r"hold \d+ active weights where .* budget is"),
        (lambda m: m["fc1.weight"].fill_(False), r"masks\['fc1.weight'\] has no active weight"),
        (
            lambda m: m.__setitem__("fc3.weight", torch.ones(3, 3, dtype=torch.bool)),
            r"saved mask for fc3.weight is not a bool tensor of shape \(5, 32\)",
        ),
    ],
)
def test_a_state_whose_masks_break_the_budget_or_shapes_is_refused(
    damage: Any, message: str
) -> None:
    state, engine = _state_and_engine()
    before = {n: m.clone() for n, m in engine.masks.items()}
    damage(state["masks"])
    with pytest.raises(ValueError, match=message):
        engine.load_state_dict(state)
    assert all(torch.equal(before[n], m) for n, m in engine.masks.items())  # nothing applied


def test_a_model_on_the_meta_device_trains_only_once_materialised() -> None:
    # accepted (its positions drawn as lists), but no step runs before sl.accelerate gives it
    # values, and a method that starts from the dense weights is refused at once
    with torch.device("meta"):
        model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"on the meta device, and this method starts from"):
        sl.sparsify(model, opt, method="gmp", density=0.2, total_steps=10)
    sl.sparsify(model, opt, method="static", density=0.2)
    with pytest.raises(RuntimeError, match=r"still on the meta device: call sl.accelerate"):
        opt.step()


def test_accelerate_leaves_the_models_state_as_it_was() -> None:
    torch.manual_seed(0)
    model = ConvBN()
    model.classifier = nn.Sequential(nn.Dropout(0.5), model.classifier)  # type: ignore[assignment]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = sl.sparsify(model, opt, method="rigl", density=0.3, total_steps=100, update_every=10)
    x, y = make_batch("conv_bn", n=16)
    nn.functional.cross_entropy(model(x), y).backward()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train()
    sl.accelerate(model, engine, example_input=x)
    for name, b in model.named_buffers():
        if name in buffers:
            assert torch.equal(b, buffers[name]), name  # BatchNorm's statistics untouched
    for name, p in model.named_parameters():
        if name in grads:
            assert torch.equal(p.grad, grads[name]), name
    assert torch.equal(torch.get_rng_state(), rng)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), out, atol=1e-5)


# ----------------------------------------------------------------------------- inputs


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--grad-clip", "-1"], r"grad_clip must be a number > 0, got -1"),
        (["--grad-clip", "abc"], r"argument --grad-clip: expected a number or none, got 'abc'"),
        (["--momentum", "1.5"], r"momentum must be a number >= 0 and < 1"),
        (["--model", "lenet"], r"unknown model 'lenet'; did you mean 'lenet5'"),
        (["--data", "fmnist"], r"unknown dataset 'fmnist'"),
        (["--prune-rate", "2"], r"prune_rate must be in \[0, 1\)"),
        (["--method", "dense", "--prune-rate", "0.3"], r"prune_rate have no effect"),
        (["--layer-density", "fc1.weight"], r"--layer-density expects NAME=DENSITY pairs"),
    ],
)
def test_bad_flags_are_one_line_that_names_them(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) if flags[1] == "abc" else contextlib.nullcontext():
        code = cli.main(["train", "--out", str(tmp_path / "run"), *flags])
        assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("sparselearn train: error: "), err
    assert err.count("\n") == 1, err
    assert re.search(message, err), err
    assert "_float_or_none" not in err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_every_train_flag_shows_its_default_in_help() -> None:
    parser = cli.build_parser()
    train_parser = next(
        a for a in parser._subparsers._actions if isinstance(a, argparse._SubParsersAction)
    ).choices["train"]
    options = [a for a in train_parser._actions if a.option_strings and a.dest != "help"]
    missing = [a.option_strings[0] for a in options if "(default" not in (a.help or "")]
    assert not missing
    text = " ".join(train_parser.format_help().split())
    assert "initial learning rate (default: 0.1; 0.001 for language)" in text


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"models": "lenet5", "methods": {"dense": {}}, "seeds": [1]}, "models must be a"),
        ({"models": ["lenet5"], "methods": {"dense": {}}, "seeds": 1}, "seeds must be a"),
        (
            {"models": ["lenet5"], "methods": {"set": {}}, "seeds": [1, 1], "densities": [0.1]},
            "seeds lists 1 more than once",
        ),
        (
            {"models": ["lenet5"], "methods": {"set": {}}, "seeds": [1], "densities": [0.1, 0.1]},
            "densities lists 0.1 more than once",
        ),
        ({"models": ["lenet"], "methods": {"dense": {}}, "seeds": [1]}, "unknown model 'lenet'"),
        (
            {"models": ["lenet5"], "methods": {"dense": {}}, "seeds": [1], "base": {"data": "x"}},
            "unknown dataset 'x'",
        ),
        ({"models": ["lenet5"], "methods": {"sm": {}}, "seeds": [1]}, "unknown method 'sm'"),
    ],
)
def test_a_bad_study_spec_is_refused_naming_the_file_and_key(
    tmp_path: Path, spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=rf"spec\.yaml: .*{message}"):
        expand(spec, tmp_path, "spec.yaml")


def test_study_jobs_must_be_positive_and_base_threads_are_kept(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "models: [lenet300-100]\nmethods: {dense: {}}\nseeds: [1]\nbase: {threads: 1}\n"
    )
    with pytest.raises(ValueError, match="--jobs must be a positive integer"):
        run_study(spec, out=tmp_path / "out", jobs=-1)
    from sparselearn.experiments.study import _command

    (run,) = expand(load_yaml(spec), tmp_path / "out")
    cmd = _command(run, threads=2, resume=False)
    assert cmd[cmd.index("--threads") + 1] == "1"


def test_malformed_yaml_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [lenet5\nseeds: {")
    assert cli.main(["study", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{bad} is not valid YAML" in err
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert f"{bad} is not valid YAML" in capsys.readouterr().err


def test_runs_print_a_line_per_epoch_when_not_on_a_terminal(data_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparselearn",
            "train",
            *_flags(data_dir),
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2"]
    assert "test " in lines[0]
    assert "\r" not in proc.stderr  # no progress bar in a log


def test_output_files_respect_the_umask(data_dir: Path, tmp_path: Path) -> None:
    from sparselearn._io import write_atomic

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.txt", "x")
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        write_atomic(tmp_path / "b.txt", "x")
        assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_the_kernel_cache_key_follows_the_environment_and_flags(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = build._build_key()
    monkeypatch.setattr(sys, "prefix", "/some/other/venv")
    assert build._build_key() != key
    monkeypatch.undo()
    monkeypatch.setenv("SPARSELEARN_MARCH", "x86-64-v2")  # the -march of the build
    assert build._build_key() != key
    monkeypatch.undo()
    monkeypatch.setattr(build, "_LDFLAGS", ["-fopenmp", "-lm"])
    assert build._build_key() != key
    monkeypatch.undo()
    monkeypatch.setenv("CXX", "/nonexistent/clang++")
    assert build._build_key() != key


# ----------------------------------------------------------------------------- the 2019 API


def test_add_sparse_args_has_the_2019_flags_and_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_sparse_args(parser)
    assert vars(parser.parse_args([])) == {
        "growth": "momentum",
        "prune": "magnitude",
        "redistribution": "momentum",
        "prune_rate": 0.5,
        "density": 0.05,
        "dense": False,
        "verbose": False,
    }
    import sparselearn.compat as sparselearning

    parser = argparse.ArgumentParser()
    sparselearning.core.add_sparse_args(parser)  # the 2019 spelling
    assert parser.parse_args(["--prune-rate", "0.3", "--dense"]).prune_rate == 0.3


def _masking() -> tuple[Masking, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Masking(opt, CosineDecay(0.5, 100)), model, opt


def test_remove_before_add_module_never_masks_those_weights() -> None:
    mask, model, _ = _masking()
    before = model.fc2.weight.detach().clone()
    mask.remove_weight("fc2")  # the 2019 spelling: a module name, .weight implied
    mask.add_module(model, density=0.2)
    assert sorted(mask.masks) == ["fc1.weight", "fc3.weight"]
    assert torch.equal(model.fc2.weight, before)


def test_remove_after_add_module_leaves_the_weight_dense_from_then_on() -> None:
    mask, model, opt = _masking()
    mask.add_module(model, density=0.2)
    mask.remove_weight_partial_name("fc3")
    assert "fc3.weight" not in mask.masks
    zeros = int((model.fc3.weight == 0).sum())
    for x, y in batches("mlp", 3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        mask.step()
    assert int((model.fc3.weight == 0).sum()) < zeros  # trains dense now
    budget = mask.baseline_nonzero
    mask.at_end_of_epoch()
    assert mask.baseline_nonzero == budget


def test_remove_type_and_names_that_match_nothing() -> None:
    mask, model, _ = _masking()
    mask.add_module(model, density=0.2)
    with pytest.raises(ValueError, match=r"remove: 'fc9' names no parameter"):
        mask.remove_weight("fc9")
    with pytest.raises(ValueError, match="names no module"):
        mask.remove_type(nn.Conv2d)
    conv_model = ConvBN()
    opt = torch.optim.SGD(conv_model.parameters(), lr=0.1, momentum=0.9)
    conv_mask = Masking(opt, CosineDecay(0.5, 100))
    conv_mask.remove_type(nn.Conv2d)
    conv_mask.add_module(conv_model, density=0.2)
    assert sorted(conv_mask.masks) == ["classifier.weight"]


def test_an_apex_fp16_optimizer_is_refused_with_a_pointer_to_torch_amp() -> None:
    class FP16_Optimizer:  # noqa: N801 - apex's name
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.optimizer = optimizer
            self.fp32_from_fp16_groups: list[Any] = []

    model = MLP()
    wrapped = FP16_Optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match=r"FP16_Optimizer .*torch\.amp"):
        Masking(wrapped, CosineDecay(0.5, 100))
    with pytest.raises(TypeError, match=r"FP16_Optimizer .*torch\.amp"):
        sl.sparsify(model, wrapped, method="static", density=0.2)


def test_editing_a_mask_in_place_raises_at_the_next_step() -> None:
    mask, model, opt = _masking()
    mask.add_module(model, density=0.2)
    mask.masks["fc1.weight"][0, :] = True
    x, y = make_batch("mlp")
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"mask of fc1.weight was changed in place"):
        mask.step()


def test_the_readme_lists_every_2019_member_and_says_which_exist() -> None:
    readme = (REPO / "docs" / "guide.md").read_text()
    table = readme[readme.index("| 2019 `Masking` member | here |") :].split("\n\n")[0]
    provided: list[str] = []
    missing: list[str] = []
    for row in table.splitlines()[2:]:
        members, here = row.strip("|").split("|")
        names = re.findall(r"`(\w+)(?:\(\))?`", members)
        (missing if here.strip().startswith("not provided") else provided).extend(names)
    mask, model, _ = _masking()
    mask.add_module(model, density=0.2)
    assert [n for n in provided if not hasattr(mask, n)] == []
    assert [n for n in missing if hasattr(mask, n)] == []
    assert {"remove_weight", "remove_weight_partial_name", "remove_type"} <= set(provided)
    core_2019 = [
        "masks",
        "modules",
        "names",
        "optimizer",
        "prune_rate",
        "prune_rate_decay",
        "prune_mode",
        "growth_mode",
        "redistribution_mode",
        "prune_every_k_steps",
        "verbose",
        "steps",
        "half",
        "baseline_nonzero",
        "name2nonzeros",
        "name2zeros",
        "name2removed",
        "total_nonzero",
        "total_zero",
        "total_removed",
        "global_prune",
        "global_growth",
        "gather_statistics",
        "add_module",
        "step",
        "at_end_of_epoch",
        "truncate_weights",
        "apply_mask",
        "remove_weight",
        "remove_weight_partial_name",
        "remove_type",
        "print_nonzero_counts",
        "init",
        "init_optimizer",
        "init_growth_prune_and_redist",
        "adjust_prune_rate",
        "calc_growth_redistribution",
        "get_momentum_for_weight",
        "is_at_start_of_pruning",
        "growth_func",
        "prune_func",
        "redistribution_func",
        "adjusted_growth",
        "adjustments",
        "name2baseline_nonzero",
        "name2variance",
        "total_variance",
        "name2prune_rate",
        "prune_threshold",
        "growth_threshold",
        "growth_increment",
        "increment",
        "tolerance",
        "start_name",
        "name_to_32bit",
    ]  # every member of the 2019 Masking
    assert sorted(set(core_2019) - set(provided) - set(missing)) == []
