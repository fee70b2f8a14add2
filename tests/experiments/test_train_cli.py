"""The training run and the command line: run directories, resume, config files, flags."""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sparselearn.accel
import sparselearn.experiments.cli as cli
from sparselearn.experiments.config import SPARSITY_OPTIONS, TrainConfig
from sparselearn.experiments.runs import load_yaml, read_metrics
from sparselearn.experiments.train import train
from sparselearn.kernels import extension
from tests.datafiles import write_mnist_like


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mnist_like(tmp_path_factory.mktemp("data") / "mnist", n_train=1000, n_test=200)


def small(data_dir: Path, **kw: object) -> TrainConfig:
    values = {
        "model": "lenet300-100",
        "data": "mnist",
        "data_dir": str(data_dir),
        "epochs": 3,
        "batch_size": 50,
        "download": False,
        "method": "sparse_momentum",
        "density": 0.1,
        "sparsity": {"update_every": "epoch"},
    }
    values.update(kw)
    return TrainConfig(**values)


def test_a_run_directory_holds_everything(tmp_path: Path, data_dir: Path) -> None:
    cfg = small(data_dir)
    summary = train(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == [
        ".lock",  # held while a run writes here, empty after
        "checkpoint.pt",
        "config.yaml",
        "metrics.jsonl",
        "plots",
        "sparsity.yaml",
        "summary.json",
    ]
    assert (run / ".lock").read_bytes() == b""
    assert sorted(p.name for p in (run / "plots").iterdir()) == [
        "layer_density.png",
        "learning_curves.png",
    ]
    for png in (run / "plots").iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    keys = {
        "train_loss",
        "val_acc",
        "test_acc",
        "density",
        "layer_density",
        "pruned",
        "regrown",
        "lr",
        "prune_rate",
        "wall_time",
    }
    assert keys <= set(rows[1])
    assert rows[1]["pruned"] == rows[1]["regrown"] > 0
    assert rows[1]["mask_updates"] == 1
    assert rows[3]["mask_updates"] == 0  # no update after the last step
    assert all(abs(r["density"] - 0.1) < 1e-3 for r in rows)
    assert rows[-1]["test_acc"] > 0.5 > rows[0]["test_acc"]  # it learned the class templates
    assert summary["test_acc"] == rows[-1]["test_acc"]
    assert summary["active_weights"] == round(0.1 * summary["sparsified_weights"])
    assert summary["inference_flops"]["ratio"] == pytest.approx(0.1, abs=0.01)
    # the machine its wall time was taken on: this CPU and the kernel build
    cpuinfo = Path("/proc/cpuinfo")
    names = [line for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
    if names:
        assert summary["machine"].startswith(names[0].split(":", 1)[1].strip() + " (")
    march = os.environ.get("SPARSELEARN_MARCH") or "native"
    assert summary["machine"].endswith(f"; kernels -march={march}")
    # the saved config reproduces the run's settings
    assert TrainConfig.from_dict(load_yaml(run / "config.yaml")) == cfg
    assert load_yaml(run / "sparsity.yaml")["update_every"] == "epoch"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 3
    assert state["machine"] == summary["machine"]


def test_a_run_resumed_on_another_machine_records_both() -> None:
    from sparselearn.kernels.machine import resumed_on

    assert resumed_on("A", "A") == "A"
    assert resumed_on("A", "B") == "several: A | B"
    assert resumed_on("several: A | B", "A") == "several: A | B"
    assert resumed_on("several: A | B", "C") == "several: A | B | C"


def test_steps_per_epoch_trains_the_first_batches_of_each_epoch(
    tmp_path: Path, data_dir: Path
) -> None:
    # 900 training samples after the validation split: 18 batches of 50
    train(small(data_dir, steps_per_epoch=4), tmp_path / "four", progress=False)
    rows = read_metrics(tmp_path / "four")
    assert [r["step"] for r in rows] == [0, 4, 8, 12]
    assert [r["mask_updates"] for r in rows[1:]] == [1, 1, 0]  # "epoch" is 4 steps now
    assert load_yaml(tmp_path / "four" / "sparsity.yaml")["steps_per_epoch"] == 4
    assert rows[-1]["lr"] < rows[1]["lr"]  # the drops come at fractions of the 12 steps
    # all 18 batches asked for: the same run, to the bit, as the whole split
    train(small(data_dir, epochs=2), tmp_path / "whole", progress=False)
    train(small(data_dir, epochs=2, steps_per_epoch=18), tmp_path / "18", progress=False)
    for key in ("step", "train_loss", "test_acc", "pruned"):
        assert [r[key] for r in read_metrics(tmp_path / "18")] == [
            r[key] for r in read_metrics(tmp_path / "whole")
        ]
    with pytest.raises(ValueError, match="steps_per_epoch 19 is more than the 18 batches"):
        train(small(data_dir, steps_per_epoch=19), tmp_path / "19", progress=False)
    with pytest.raises(ValueError, match="steps_per_epoch must be a positive integer"):
        small(data_dir, steps_per_epoch=0)


def test_accelerate_auto_times_the_layers_on_a_training_batch(
    tmp_path: Path, data_dir: Path
) -> None:
    cfg = small(data_dir, method="rigl", accelerate="auto", sparsity={"update_every": 7})
    summary = train(cfg, tmp_path / "run", progress=False)
    report = (tmp_path / "run" / "acceleration.txt").read_text()
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        assert name in report
    assert "dense ms" in report
    assert "forced" not in report  # timed, on the batch's real shapes
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    # the "chosen" column, then the backend's (the check in the run names ways too, later)
    chosen_as = re.compile(r"\s(sparse|sparse \(1 thread\))\s+(cpp|torch)\s")
    rows = [(line.split()[0], chosen_as.search(line)) for line in report.splitlines()[1:]]
    assert state["accelerated"] == [name for name, m in rows if m]
    capped = {name: 1 for name, m in rows if m and m.group(1) != "sparse"}
    assert state["accelerated_threads"] == capped
    assert summary["final_density"] == pytest.approx(0.1, abs=1e-3)


@pytest.mark.skipif(extension() is None, reason="needs the compiled kernels")
def test_resume_reapplies_the_thread_caps(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # timings that make one thread the fastest for every layer's training step, and the dense
    # layer the fastest in inference; the resumed run must cap the same layers, and infer
    # densely with the same ones, without timing again
    acc = importlib.import_module("sparselearn.accel.accelerate")

    def timings(fns: list[object], repeats: int) -> list[float]:
        return [5.0, 2.0, 1.0] if len(fns) == 3 else [1.0, 2.0]  # (inference: dense, sparse)

    monkeypatch.setattr(acc, "_time_turns", timings)
    previous = torch.get_num_threads()
    try:
        cfg = small(data_dir, method="rigl", accelerate="auto", epochs=1, threads=2)
        train(cfg, tmp_path / "run", progress=False)
        state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
        assert state["accelerated"]
        assert state["accelerated_threads"] == dict.fromkeys(state["accelerated"], 1)
        assert state["accelerated_inference_dense"] == state["accelerated"]
        calls: list[dict[str, object]] = []
        real = sparselearn.accel.accelerate

        def recording(*args: object, **kwargs: object) -> object:
            calls.append(kwargs)
            return real(*args, **kwargs)

        monkeypatch.setattr(sparselearn.accel, "accelerate", recording)
        train(cfg, tmp_path / "run", resume=True, progress=False)
        assert len(calls) == 1
        assert calls[0]["mode"] == "sparse"
        assert calls[0]["threads"] == state["accelerated_threads"]
        assert calls[0]["inference_dense"] == state["accelerated_inference_dense"]
    finally:
        torch.set_num_threads(previous)


def test_accelerate_rejects_bad_values(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="accelerate must be 'off', 'auto'"):
        small(data_dir, accelerate="yes")


def test_accelerate_trains_under_amp(tmp_path: Path, data_dir: Path) -> None:
    # bfloat16 autocast on the CPU; the sparse layers compute in float32 and return bfloat16
    cfg = small(data_dir, method="rigl", accelerate="sparse", amp=True)
    summary = train(cfg, tmp_path / "amp", progress=False)
    masked = train(small(data_dir, method="rigl", amp=True), tmp_path / "masked", progress=False)
    assert summary["final_density"] == pytest.approx(0.1, abs=1e-3)
    assert summary["test_acc"] > 0.5  # it learned the class templates
    assert summary["test_acc"] == pytest.approx(masked["test_acc"], abs=0.05)


def test_an_existing_run_is_not_overwritten(tmp_path: Path, data_dir: Path) -> None:
    cfg = small(data_dir, epochs=1)
    train(cfg, tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "summary.json").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a run; pass --resume"):
        train(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "summary.json").read_bytes() == before
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(cfg, tmp_path / "other", resume=True)
    with pytest.raises(ValueError, match="different configuration"):
        train(small(data_dir, epochs=2), tmp_path / "run", resume=True)


# rigl: dense-gradient capture at updates; set: random growth from the engine's generator
@pytest.mark.parametrize(
    ("method", "extra"), [("rigl", []), ("set", []), ("rigl", ["--accelerate", "sparse"])]
)
def test_resume_after_a_kill_gives_the_same_final_numbers(
    tmp_path: Path, data_dir: Path, method: str, extra: list[str]
) -> None:
    args = [
        "--model",
        "lenet300-100",
        "--data",
        "mnist",
        "--data-dir",
        str(data_dir),
        "--epochs",
        "8",
        "--batch-size",
        "20",
        "--method",
        method,
        "--no-download",
        "--threads",
        "1",
        "--no-progress",
    ]
    args += ["--density", "0.1", "--update-every", "17", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sparselearn", "train", *args]
    # the uninterrupted run beside the one to be killed (one thread each: the same numbers)
    reference = subprocess.Popen(
        [*cmd, "--out", str(tmp_path / "straight")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (killed / "metrics.jsonl").exists() and len(read_metrics(killed)) >= 3:
            proc.send_signal(signal.SIGKILL)  # mid-run: some epochs done, no summary yet
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "summary.json").exists()
    resumed = subprocess.run(
        [*cmd, "--out", str(killed), "--resume"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr
    _, reference_errors = reference.communicate(timeout=240)
    assert reference.returncode == 0, reference_errors

    a = json.loads((tmp_path / "straight" / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    for key in ("test_acc", "val_acc", "final_density", "active_weights", "steps", "machine"):
        assert a[key] == b[key], key
    assert not b["machine"].startswith("several")  # resumed on the machine it started on
    strip = ("wall_time", "epoch_seconds")
    rows_a = [
        {k: v for k, v in r.items() if k not in strip} for r in read_metrics(tmp_path / "straight")
    ]
    rows_b = [{k: v for k, v in r.items() if k not in strip} for r in read_metrics(killed)]
    assert rows_a == rows_b
    sa = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    sb = torch.load(killed / "checkpoint.pt", weights_only=True)
    for name, tensor in sa["model"].items():
        assert torch.equal(tensor, sb["model"][name]), name
    if extra:  # the resumed run computed with the same sparse layers as the first launch
        assert sa["accelerated"] == sb["accelerated"] == ["fc1.weight", "fc2.weight", "fc3.weight"]
        assert any(name.endswith("weight_sparse.values") for name in sb["model"])
        report = (tmp_path / "straight" / "acceleration.txt").read_text()
        assert report.count("forced") == 3


def test_every_engine_option_is_a_flag_and_a_config_key(tmp_path: Path) -> None:
    parser = cli.build_parser()
    values = {
        "update_every": ("epoch", "epoch"),
        "start_at": ("0.1", 0.1),
        "stop_at": ("0.9", 0.9),
        "prune_rate": ("0.3", 0.3),
        "prune_rate_schedule": ("linear", "linear"),
        "prune_rate_min": ("0.01", 0.01),
        "init": ("erk", "erk"),
        "prune": ("magnitude", "magnitude"),
        "growth": ("random", "random"),
        "redistribution": ("none", "none"),
        "schedule": ("periodic", "periodic"),
        "optimizer_state": ("keep", "keep"),
        "ema_decay": ("0.8", 0.8),
        "include": ("re:fc.*", ["re:fc.*"]),
        "exclude": ("fc3.weight", ["fc3.weight"]),
        "layer_density": ("fc1.weight=0.5", {"fc1.weight": 0.5}),
        "dense_first": (None, True),
        "dense_last": (None, True),
        "momentum_window": ("20", 20),
        "structure": ("2:4", "2:4"),
        "neuron_ablation": ("0", 0.0),  # (above 0 it needs structure="fan_in" and RigL)
    }
    assert set(values) == set(SPARSITY_OPTIONS)
    for name, (text, expected) in values.items():
        flag = "--" + name.replace("_", "-")
        argv = ["train", flag] if text is None else ["train", flag, text]
        cfg = cli.resolve_config(parser.parse_args(argv))
        assert cfg.sparsity == {name: expected}, name
        (tmp_path / "c.yaml").write_text(f"{name}: {json.dumps(expected)}\n")
        from_file = cli.resolve_config(
            parser.parse_args(["train", "--config", str(tmp_path / "c.yaml")])
        )
        assert from_file.sparsity == {name: expected}, name


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("model: lenet5\nepochs: 7\nprune-rate: 0.2\nlr: 0.05\n")
    parser = cli.build_parser()
    cfg = cli.resolve_config(
        parser.parse_args(["train", "--config", str(tmp_path / "c.yaml"), "--epochs", "9"])
    )
    assert (cfg.model, cfg.epochs, cfg.lr, cfg.sparsity) == ("lenet5", 9, 0.05, {"prune_rate": 0.2})
    (tmp_path / "bad.yaml").write_text("epoch: 3\n")
    with pytest.raises(ValueError, match="unknown option 'epoch'; did you mean 'epochs'"):
        cli.resolve_config(parser.parse_args(["train", "--config", str(tmp_path / "bad.yaml")]))


def test_cli_train_and_errors(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        [
            "train",
            "--model",
            "lenet300-100",
            "--data",
            "mnist",
            "--data-dir",
            str(data_dir),
            "--epochs",
            "1",
            "--density",
            "0.2",
            "--out",
            str(tmp_path / "r"),
            "--no-download",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "lenet300-100 mnist sparse_momentum density 0.2: test accuracy" in out
    code = cli.main(
        [
            "train",
            "--model",
            "lenet",
            "--data",
            "mnist",
            "--data-dir",
            str(data_dir),
            "--out",
            str(tmp_path / "r2"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown model 'lenet'" in err
    assert "Traceback" not in err
    code = cli.main(["train", "--density", "1.5", "--out", str(tmp_path / "r3")])
    assert code == 2
    assert "density must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("given", ["abc", "-3", "1.5"])
def test_a_bad_update_every_names_the_flag_and_what_it_takes(
    given: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--update-every", given, "--out", str(tmp_path / "r")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "argument --update-every: expected an integer >= 0 (optimizer steps between " in err
    assert f"or 'epoch', got '{given}'" in err
    config = tmp_path / "run.yaml"
    config.write_text(f"update_every: '{given}'\n")
    assert cli.main(["train", "--config", str(config), "--out", str(tmp_path / "r")]) == 2
    assert "update_every must be an integer >= 0" in capsys.readouterr().err


def test_progress_bar_only_on_a_terminal(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train(small(data_dir, epochs=1), tmp_path / "quiet")  # stderr is not a terminal here
    assert capsys.readouterr().err == ""
    train(small(data_dir, epochs=1), tmp_path / "bar", progress=True)
    err = capsys.readouterr().err
    assert "epoch 1/1" in err
    assert "density 0.1000" in err


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in (
        "lenet300-100",
        "wrn-28-2",
        "resnet50",
        "fashion-mnist",
        "cifar10",
        "imagenet",
        "sparse_momentum",
        "rigl",
        "dense",
    ):
        assert name in out


def test_train_config_validation() -> None:
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="lr_schedule must be"):
        TrainConfig(lr_schedule="exp")
    with pytest.raises(ValueError, match="unknown option 'prune_rat'"):
        TrainConfig(sparsity={"prune_rat": 0.1})
    with pytest.raises(ValueError, match="device must be"):
        TrainConfig(device="tpu")
    # checked when the run is configured, before any data is looked for
    for bad in (0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            TrainConfig(density=bad)
    assert TrainConfig(density=1.0).density == 1.0


def test_demo(
    tmp_path: Path,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dataclasses import replace

    from sparselearn.data import datasets as ds

    fashion = tmp_path / "fashion"
    # 54 steps an epoch: room for the kernels run's momentum window of 50 before its update
    write_mnist_like(fashion, n_train=6000, n_test=100)
    info = ds.DATASETS.get("fashion-mnist")
    monkeypatch.setitem(ds.DATASETS._items, "fashion-mnist", replace(info, system_dirs=()))
    assert (
        cli.main(
            ["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--data-dir", str(fashion)]
        )
        == 0
    )
    out = capsys.readouterr().out
    table = {
        tuple(cell.strip() for cell in line.split("  ") if cell.strip())[:2]: line
        for line in out.splitlines()
        if line.startswith(("lenet300-100 ", "lenet5 "))
    }
    assert set(table) == {
        ("lenet300-100", "dense"),
        ("lenet300-100", "sparse momentum, masks (5%)"),
        ("lenet300-100", "sparse momentum, sparse kernels (5%)"),
        ("lenet5", "dense"),
        ("lenet5", "sparse momentum, sparse kernels (5%)"),
    }, out
    for name in ("sparse momentum, masks (5%)", "sparse momentum, sparse kernels (5%)"):
        assert "13,310 / 266,200" in table["lenet300-100", name]  # 5% of LeNet-300-100's weights
        assert "5.0%" in table["lenet300-100", name]  # inference FLOPs relative to dense
    for model in ("lenet300-100", "lenet5"):
        assert table[model, "dense"].rstrip().endswith("1.00x")  # each against its own dense run
    # the runs that computed with the sparse weights: their layer reports are in their folders
    (run,) = (tmp_path / "demo").iterdir()
    for sub, layer in (("sparse_momentum-kernels", "fc1.weight"),
                       ("lenet5-sparse_momentum-kernels", "conv2.weight")):  # fmt: skip
        assert layer in (run / sub / "acceleration.txt").read_text()
        summary = json.loads((run / sub / "summary.json").read_text())
        assert summary["config"]["accelerate"] == "auto"
        assert summary["config"]["momentum_window"] == 50
    lenet5 = json.loads((run / "lenet5-dense" / "summary.json").read_text())
    assert lenet5["config"]["grad_clip"] == 5.0


def test_a_checkpoint_from_before_an_option_existed_still_resumes(data_dir: Path) -> None:
    from sparselearn.experiments.config import jsonable as _jsonable
    from sparselearn.experiments.config import same_config as _same_config

    cfg = small(data_dir)
    saved = _jsonable(cfg.to_dict())
    older = {k: v for k, v in saved.items() if k != "accelerate"}  # written before it existed
    assert _same_config(older, cfg)
    assert not _same_config({**older, "lr": 0.5}, cfg)
    assert not _same_config({**saved, "accelerate": "sparse"}, cfg)
    assert not _same_config({**saved, "no_such_option": 1}, cfg)
    assert not _same_config(None, cfg)


def test_an_n_m_structure_sets_the_default_density() -> None:
    parser = cli.build_parser()
    assert cli.resolve_config(parser.parse_args(["train", "--method", "srigl_2_4"])).density == 0.5
    got = cli.resolve_config(parser.parse_args(["train", "--structure", "1:4"]))
    assert got.density == 0.25
    assert cli.resolve_config(parser.parse_args(["train", "--method", "srigl"])).density == 0.05
    with pytest.raises(ValueError, match=r"the density must be 0\.5, got 0\.1"):
        cli.resolve_config(parser.parse_args(["train", "--structure", "2:4", "--density", "0.1"]))
