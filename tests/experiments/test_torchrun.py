"""`torchrun --nproc_per_node 2 -m sparselearn train`: two CPU ranks (gloo) train as one process
on the same global batches, rank 0 alone writes the run, and a checkpoint resumes only with
the world size that wrote it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.datafiles import write_mnist_like

# one process against two: the same global batches, float sums in another order
TOLERANCE = 1e-4


def _flags(data: Path, out: Path, method: str, epochs: int = 2) -> list[str]:
    return [
        "train", "--model", "lenet300-100", "--data", "mnist", "--data-dir", str(data),
        "--no-download", "--epochs", str(epochs), "--batch-size", "50", "--density", "0.1",
        "--method", method, "--threads", "1", "--no-progress", "--out", str(out),
    ]  # fmt: skip


def _run(args: list[str], ranks: int, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if ranks == 1:
        cmd = [sys.executable, "-m", "sparselearn", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={ranks}", "-m", "sparselearn", *args]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, check=False)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mnist_like(tmp_path_factory.mktemp("mnist"), n_train=400, n_test=100)


def test_two_ranks_train_as_one_process(data: Path, tmp_path: Path) -> None:
    method = "rigl"  # masks that change: the update must agree with one process's too
    one, two = tmp_path / "one", tmp_path / "two"
    _run(_flags(data, one, method), ranks=1)
    result = _run(_flags(data, two, method), ranks=2)
    assert result.stdout.count("test accuracy") == 1  # rank 0 alone reports
    a = torch.load(one / "checkpoint.pt", weights_only=True)
    b = torch.load(two / "checkpoint.pt", weights_only=True)
    assert b["world_size"] == 2
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=TOLERANCE, atol=TOLERANCE)
    for name, mask in a["engine"]["masks"].items():
        assert torch.equal(b["engine"]["masks"][name], mask), name
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert sb["test_acc"] == pytest.approx(sa["test_acc"], abs=0.011)  # one image in 100
    rows_a, rows_b = ((d / "metrics.jsonl").read_text().splitlines() for d in (one, two))
    assert len(rows_a) == len(rows_b) == 3
    for ra, rb in zip(rows_a, rows_b, strict=True):
        ja, jb = json.loads(ra), json.loads(rb)
        if ja["train_loss"] is not None:
            assert jb["train_loss"] == pytest.approx(ja["train_loss"], rel=1e-4)
        assert jb["step"] == ja["step"]


def test_a_checkpoint_resumes_with_its_world_size_only(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _run(_flags(data, run, "set", epochs=1), ranks=2)
    # a longer run cannot be resumed from a finished one; interrupt by removing the summary
    (run / "summary.json").unlink()
    refused = _run([*_flags(data, run, "set", epochs=1), "--resume"], ranks=1, check=False)
    assert refused.returncode != 0
    assert "written by 2 process(es) and this run has 1" in refused.stderr
    assert "torchrun --nproc_per_node 2" in refused.stderr
    assert not (run / "summary.json").exists()  # nothing written by the refused run
    _run([*_flags(data, run, "set", epochs=1), "--resume"], ranks=2)
    assert (run / "summary.json").exists()


def test_accelerate_under_torchrun_is_refused(data: Path, tmp_path: Path) -> None:
    out = _run([*_flags(data, tmp_path / "r", "set"), "--accelerate", "sparse"], 2, check=False)
    assert out.returncode != 0
    assert "--accelerate is not supported under torchrun" in out.stderr
