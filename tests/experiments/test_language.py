"""Language models end to end: the stdlib-text corpus (built from this Python's standard
library, deterministic, split by file, cached with its manifest), tiny-gpt trained dense and
sparse through the command with loss, perplexity and bits per character, and `report`
aggregating perplexity (lower is better)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from sparselearn.data import text
from sparselearn.experiments import cli
from sparselearn.experiments.report import collect, table

SMALL = {"train": 24_000, "val": 4_000, "test": 4_000}  # characters kept for the training test


@pytest.fixture
def corpus_dir(stdlib_corpus: Path) -> Path:
    return stdlib_corpus


def test_the_corpus_is_deterministic_split_by_file_and_recorded(
    corpus_dir: Path, tmp_path: Path
) -> None:
    manifest = json.loads((corpus_dir / text.NAME / "manifest.json").read_text())
    again = text.build(tmp_path, 0.1, 0)
    assert again["sha256"] == manifest["sha256"]  # the same bytes when built again
    files = manifest["files"]
    assert all(files[s] for s in ("train", "val", "test"))
    seen = [f for s in ("train", "val", "test") for f in files[s]]
    assert len(seen) == len(set(seen))  # no file in two splits
    # another split seed (the split the build gives each file): the same test files, other
    # validation files
    other_seed = {f: text._split_of(f, 0.1, 1) for f in seen}
    assert sorted(f for f, split in other_seed.items() if split == "test") == sorted(files["test"])
    assert sorted(f for f, split in other_seed.items() if split == "val") != sorted(files["val"])
    assert not any(part == "test" for f in seen for part in f.split("/")[:-1])
    assert manifest["characters"]["train"] > 10 * manifest["characters"]["test"] / 2


def test_windows_are_shifted_by_one_and_epochs_are_reshuffled(corpus_dir: Path) -> None:
    data = text.load_text(corpus_dir, 0.1, 0)
    (x, y), *_ = data.batches("train", 4, shuffle=True, seed=1, epoch=0, augment=False)
    assert x.shape == y.shape == (4, text.BLOCK_SIZE)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < text.VOCAB
    (x1, _), *_ = data.batches("train", 4, shuffle=True, seed=1, epoch=1, augment=False)
    (x0, _), *_ = data.batches("train", 4, shuffle=True, seed=1, epoch=0, augment=False)
    assert torch.equal(x0, x)
    assert not torch.equal(x1, x)
    assert text.decode(text.encode("def f(x):\n    return x\n")) == "def f(x):\n    return x\n"
    assert text.decode(text.encode("é")) == "\ufffd"


def test_an_edited_corpus_is_named(corpus_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(corpus_dir / text.NAME, tmp_path / text.NAME)
    path = tmp_path / text.NAME / "val.txt"
    path.write_bytes(path.read_bytes()[:-1] + b"#")
    with pytest.raises(ValueError, match=r"val.txt does not match its manifest"):
        text.load_text(tmp_path, 0.1, 0)


@pytest.fixture
def small_corpus(corpus_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The real corpus, cut to its first characters so that an epoch is a few steps."""
    real = text.load_text

    def load(data_dir: Any, val_fraction: float, split_seed: int) -> text.TextData:
        data = real(data_dir, val_fraction, split_seed)
        data.splits = {k: v[: SMALL[k]] for k, v in data.splits.items()}
        return data

    monkeypatch.setattr(text, "load_text", load)
    return corpus_dir


@pytest.mark.parametrize("method", ["dense", "sparse_momentum"])
def test_tiny_gpt_trains_through_the_command(
    small_corpus: Path, tmp_path: Path, method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / method
    argv = ["train", "--model", "tiny-gpt", "--data", "stdlib-text", "--data-dir",
            str(small_corpus), "--method", method, "--density", "0.1", "--epochs", "2",
            "--threads", "1", "--no-progress", "--out", str(out),
            "--update-every", "3"]  # fmt: skip
    if method == "dense":
        argv = argv[: argv.index("--update-every")]
    assert cli.main(argv) == 0
    assert "test perplexity" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    config = summary["config"]
    assert (config["optimizer"], config["lr_schedule"], config["warmup"]) == (
        "adamw",
        "cosine",
        0.02,
    )
    assert summary["metric"] == "test_ppl"
    assert summary["test_ppl"] == pytest.approx(math.exp(summary["test_loss"]))
    assert summary["test_bpc"] == pytest.approx(summary["test_loss"] / math.log(2))
    assert summary["test_ppl"] < text.VOCAB  # better than guessing every character
    manifest = json.loads((small_corpus / text.NAME / "manifest.json").read_text())
    assert summary["data_provenance"]["sha256"] == manifest["sha256"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["test_ppl"] > rows[-1]["test_ppl"]  # trained: perplexity went down
    # the run's training FLOPs: per sample of 128 characters, three products per weight use
    # (forward and two gradients) and attention's (4 blocks x 4 heads x 2 products of
    # 128 x 128 x 32), over the samples trained
    flops = summary["training_flops"]
    attention = 3 * 4 * 4 * 2 * (2 * 128 * 128 * 32)
    assert flops["attention_per_sample"] == attention
    weights = 786_432 + 97 * 128  # the sparsified Linear weights and the tied head
    assert flops["dense_per_sample"] == 3 * 2 * 128 * weights + attention
    assert flops["samples"] == summary["steps"] * 32
    assert flops["total"] == flops["per_sample"] * flops["samples"]
    if method == "dense":
        assert flops["per_sample"] == flops["dense_per_sample"]
    else:
        assert flops["per_sample"] < flops["dense_per_sample"] / 2
    if method != "dense":
        assert summary["final_density"] == pytest.approx(0.1, abs=0.002)
        assert sum(r["mask_updates"] for r in rows) >= 2  # update_every=3: masks changed
        assert sum(r["pruned"] for r in rows) == sum(r["regrown"] for r in rows) > 0


def test_an_image_model_on_text_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", "--model", "lenet5", "--data", "stdlib-text", "--no-progress"]) == 2
    assert "choose a model for it" in capsys.readouterr().err


def test_report_aggregates_perplexity_lower_is_better(tmp_path: Path) -> None:
    values = {("dense", 1.0): [10.0, 10.2], ("rigl", 0.1): [12.0, 12.4], ("set", 0.1): [13.0]}
    for (method, density), ppls in values.items():
        for seed, ppl in enumerate(ppls, start=1):
            run = tmp_path / method / f"seed-{seed}"
            run.mkdir(parents=True)
            summary = {"data": "stdlib-text", "model": "tiny-gpt", "method": method,
                       "density": density, "seed": seed, "metric": "test_ppl",
                       "test_ppl": ppl, "wall_time": 100.0 * seed}  # fmt: skip
            (run / "summary.json").write_text(json.dumps(summary))
    results = collect([tmp_path])
    cells = results[("stdlib-text", "tiny-gpt")]
    assert cells["rigl"][0.1].mean == pytest.approx(12.2)
    markdown = table(results)
    assert "Test perplexity (lower is better)" in markdown
    assert "**12.200 ± 0.200 (2)**" in markdown  # the lower of the sparse ones is the best
    walls = collect([tmp_path], "wall_time")[("stdlib-text", "tiny-gpt")]
    assert walls["rigl"][0.1].mean == pytest.approx(150.0)
