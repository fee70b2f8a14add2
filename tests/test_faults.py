"""Fault injection: writers killed mid-write, a disk that fills up, damaged bytes, two writers
at once. Nothing the user saved is lost or corrupted, and every fault is one clear message."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import sparselearn.experiments.cli as cli
from sparselearn._io import atomic_file, write_atomic
from sparselearn.experiments.runs import lock_run_dir, read_metrics
from tests.datafiles import write_mnist_like

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # seconds any one subprocess may take here


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mnist_like(tmp_path_factory.mktemp("data") / "mnist", n_train=300, n_test=100)


def flags(data_dir: Path, out: Path, epochs: int = 3) -> list[str]:
    return [
        "--model", "lenet300-100", "--data", "mnist", "--data-dir", str(data_dir),
        "--no-download", "--epochs", str(epochs), "--batch-size", "50", "--density", "0.1",
        "--update-every", "epoch", "--threads", "1", "--no-progress", "--out", str(out),
    ]  # fmt: skip


def python(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.time() + TIMEOUT
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def lock_holder(out: Path, locked: Path) -> subprocess.Popen[str]:
    """A process that holds ``out``'s run lock for a minute; returns once it holds it."""
    proc = python(
        """
        import sys, time
        from pathlib import Path
        from sparselearn.experiments.runs import lock_run_dir
        with lock_run_dir(Path(sys.argv[1])):
            Path(sys.argv[2]).touch()
            time.sleep(60)
        """,
        str(out),
        str(locked),
    )
    try:
        wait_for(locked, proc)
    except BaseException:
        proc.kill()
        proc.wait(TIMEOUT)
        raise
    return proc


def epoch_of(checkpoint: Path) -> int:
    return int(torch.load(checkpoint, weights_only=True)["epoch"])


def stopped_run(data_dir: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 3-epoch run whose second epoch ran out of disk while writing its checkpoint."""
    real = os.fsync
    state = {"checkpoints": 0}

    def fsync(fd: int) -> None:
        if ".checkpoint.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            state["checkpoints"] += 1
            if state["checkpoints"] == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", fsync)
        assert cli.main(["train", *flags(data_dir, out)]) == 2
    assert state["checkpoints"] == 2


# ----------------------------------------------------------------------------- killed writers


def test_a_writer_killed_mid_write_leaves_the_previous_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    write_atomic(target, b"previous content")
    proc = python(
        """
        import sys, time
        from pathlib import Path
        from sparselearn._io import atomic_file
        with atomic_file(sys.argv[1]) as f:
            f.write(b"x" * 1_000_000)
            f.flush()
            Path(sys.argv[2]).touch()
            time.sleep(60)  # killed here, half written
        """,
        str(target),
        str(tmp_path / "writing"),
    )
    wait_for(tmp_path / "writing", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(TIMEOUT)
    assert target.read_bytes() == b"previous content"
    (left,) = tmp_path.glob(".file.bin.*.tmp")
    assert left.stat().st_size == 1_000_000


def test_a_training_killed_while_writing_its_checkpoint_resumes(
    data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    proc = python(
        """
        import sys, time, torch
        from pathlib import Path
        import sparselearn.checkpoint as checkpoint
        real = torch.save
        seen = []
        def save(obj, f, *args, **kwargs):
            seen.append(1)
            if len(seen) == 2:  # the second epoch's checkpoint: half of it, then killed
                f.write(b"PK" + b"\\0" * 500_000)
                f.flush()
                Path(sys.argv[1]).touch()
                time.sleep(60)
            real(obj, f, *args, **kwargs)
        checkpoint.torch.save = save
        from sparselearn.experiments.cli import main
        sys.exit(main(sys.argv[2:]))
        """,
        str(tmp_path / "writing"),
        "train",
        *flags(data_dir, out),
    )
    wait_for(tmp_path / "writing", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(TIMEOUT)
    assert epoch_of(out / "checkpoint.pt") == 1  # the previous checkpoint, whole
    assert list(out.glob(".checkpoint.pt.*.tmp"))  # what the killed writer left
    assert cli.main(["train", "--out", str(out), "--resume"]) == 0
    assert not list(out.glob(".*.tmp"))  # cleared when the resumed run took the lock
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1, 2, 3]


def test_a_killed_runs_lock_is_taken_over(
    data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    proc = lock_holder(out, tmp_path / "locked")
    proc.send_signal(signal.SIGKILL)
    proc.wait(TIMEOUT)
    assert json.loads((out / ".lock").read_text())["pid"] == proc.pid  # its record stays
    with caplog.at_level("INFO", logger="sparselearn"):
        assert cli.main(["train", *flags(data_dir, out, epochs=1)]) == 0
    assert f"took over the lock left by pid {proc.pid}" in caplog.text


# ----------------------------------------------------------------------------- a full disk


def test_a_full_disk_is_one_message_and_the_previous_checkpoint_survives(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    stopped_run(data_dir, out, capsys)
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "sparselearn train: error: could not write" in err
    assert "checkpoint.pt: No space left on device (its previous content is unchanged)" in err
    assert epoch_of(out / "checkpoint.pt") == 1
    assert not list(out.glob(".*.tmp"))
    assert cli.main(["train", "--out", str(out), "--resume"]) == 0  # space again: it resumes


def test_a_read_only_output_folder_is_one_message(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = os.open

    def read_only(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(tmp_path / "run") in str(path) and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, flags, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "open", read_only)
        assert cli.main(["train", *flags(data_dir, tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "sparselearn train: error: " in err
    assert "Permission denied" in err


# ----------------------------------------------------------------------------- damaged bytes


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        _flip,
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
        lambda p: p.write_bytes(b""),
    ],
    ids=["flipped", "truncated", "empty"],
)
def test_a_damaged_checkpoint_is_named_and_nothing_is_overwritten(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Any
) -> None:
    out = tmp_path / "run"
    stopped_run(data_dir, out, capsys)
    capsys.readouterr()
    damage(out / "checkpoint.pt")
    damaged = (out / "checkpoint.pt").read_bytes()
    metrics = (out / "metrics.jsonl").read_bytes()
    assert cli.main(["train", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{out / 'checkpoint.pt'} is damaged" in err
    assert (out / "checkpoint.pt").read_bytes() == damaged
    assert (out / "metrics.jsonl").read_bytes() == metrics


def test_damaged_metrics_and_summaries_are_named(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    stopped_run(data_dir, out, capsys)
    capsys.readouterr()
    rows = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(rows[0] + "\n" + rows[1][: len(rows[1]) // 2] + "\n")
    assert cli.main(["train", "--out", str(out), "--resume"]) == 2
    assert f"{out / 'metrics.jsonl'} is damaged: line 2" in capsys.readouterr().err

    finished = tmp_path / "finished"
    assert cli.main(["train", *flags(data_dir, finished, epochs=1)]) == 0
    (finished / "summary.json").write_text('{"data": "mnist", "model": ')
    capsys.readouterr()
    assert cli.main(["report", str(finished)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{finished / 'summary.json'} is damaged" in err


# ----------------------------------------------------------------------------- two writers


def test_a_second_writer_is_refused_naming_the_holder(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    holder = lock_holder(out, tmp_path / "locked")
    try:
        assert cli.main(["train", *flags(data_dir, out, epochs=1)]) == 2
        err = capsys.readouterr().err
        assert f"{out} is in use by another run (pid {holder.pid} on " in err
        assert not (out / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait(TIMEOUT)


def test_two_trainings_started_at_once_into_one_folder(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sparselearn", "train", *flags(data_dir, out, epochs=3)]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(TIMEOUT), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    (refusal,) = [err for code, err in results if code == 2]
    assert "is in use by another run" in refusal or "already holds a run" in refusal
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1, 2, 3]  # one run's, whole
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 3


def test_the_lock_is_released_and_reusable_in_one_process(tmp_path: Path) -> None:
    with lock_run_dir(tmp_path / "run"):
        pass
    with lock_run_dir(tmp_path / "run"), atomic_file(tmp_path / "run" / "x") as f:
        f.write(b"ok")
    assert (tmp_path / "run" / "x").read_bytes() == b"ok"
    assert (tmp_path / "run" / ".lock").read_bytes() == b""
