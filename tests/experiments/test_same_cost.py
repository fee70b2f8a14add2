"""Wider sparse models at the same cost as a small dense one: the densities that match its
non-zeros or training FLOPs, the study entries that name them, and the report's comparisons
at the same steps and at the same wall time."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparselearn as sl
from sparselearn.data import text
from sparselearn.experiments import same_cost, study
from sparselearn.experiments.cells import Cell
from sparselearn.experiments.cli import main
from sparselearn.experiments.same_cost_report import read_curve, table, verdict
from sparselearn.flops import count_flops
from sparselearn.models import create_model

# ---------------------------------------------------------------------- the densities


@pytest.fixture
def corpus(stdlib_corpus: Path) -> Path:
    return stdlib_corpus


def _run(corpus: Path, **settings: Any) -> dict[str, Any]:
    return {
        "data": "stdlib-text",
        "data_dir": str(corpus),
        "epochs": 1,
        "model": "tiny-gpt-256",
        "seed": 1,
        **settings,
    }


def test_same_nnz_keeps_the_dense_models_parameters(corpus: Path) -> None:
    cfg = _run(corpus, method="rigl", update_every=100)
    density = same_cost.resolve(cfg, "tiny-gpt", "same-nnz")
    costs = same_cost.Costs(cfg, "tiny-gpt")
    target = costs.reference().parameters
    dense = create_model("tiny-gpt", (text.BLOCK_SIZE,), text.VOCAB)
    assert target == sum(p.numel() for p in dense.parameters())
    got = costs.at(density)
    # within the grid's step of the sparsified weights (and a weight per layer of rounding)
    assert abs(got.parameters - target) <= got.sparsified * 10.0**-same_cost.DIGITS / 2 + 16
    assert 0.2 < density < 0.25  # 4x the Linear weights, less the wider dense parts


@pytest.mark.parametrize(
    ("method", "settings"),
    [("rigl", {}), ("sparse_momentum", {"momentum_window": 10})],
)
def test_same_flops_is_the_largest_density_within_the_dense_models_flops(
    corpus: Path, method: str, settings: dict[str, Any]
) -> None:
    cfg = _run(corpus, method=method, update_every=100, **settings)
    density = same_cost.resolve(cfg, "tiny-gpt", "same-flops")
    costs = same_cost.Costs(cfg, "tiny-gpt")
    target = costs.reference().flops
    step = 10.0**-same_cost.DIGITS
    assert costs.at(density).flops <= target < costs.at(round(density + step, 4)).flops
    # attention's products count: without them the same FLOPs would buy more weights
    model = create_model("tiny-gpt", (text.BLOCK_SIZE,), text.VOCAB)
    engine = sl.sparsify(model, torch.optim.AdamW(model.parameters()), method="dense")
    report = sl.flops(model, engine, (text.BLOCK_SIZE,), dtype=torch.long)
    assert report.attention > 0
    assert target == report.train_dense_total


def test_sparse_momentum_pays_for_its_window(corpus: Path) -> None:
    # the window's steps compute the dense weight gradient: fewer weights for the same FLOPs
    window = _run(corpus, method="sparse_momentum", update_every=100, momentum_window=10)
    rigl = _run(corpus, method="rigl", update_every=100)
    assert same_cost.resolve(window, "tiny-gpt", "same-flops") < same_cost.resolve(
        rigl, "tiny-gpt", "same-flops"
    )


def test_a_model_that_is_not_wider_is_refused(corpus: Path) -> None:
    cfg = _run(corpus, model="tiny-gpt", method="static")
    with pytest.raises(ValueError, match=r"costs no more than dense tiny-gpt-256.*not wider"):
        same_cost.resolve(cfg, "tiny-gpt-256", "same-nnz")
    with pytest.raises(ValueError, match="one of same-nnz, same-flops, got 'same-time'"):
        same_cost.resolve(cfg, "tiny-gpt-256", "same-time")


def test_attention_is_counted_per_query_and_key() -> None:
    model = create_model("tiny-gpt-256", (64,), 97)
    report = count_flops(model, (64,), dtype=torch.long)
    # 4 blocks; 8 heads of 32; scores and weighted values: 2 products of 64 x 64 x 32 each
    assert report.attention == 4 * 8 * 2 * (2 * 64 * 64 * 32)


# ---------------------------------------------------------------------- the study entries


def test_a_study_resolves_each_methods_own_density(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = []

    def resolve(cfg: dict[str, Any], reference: str, view: str) -> float:
        asked.append((cfg["model"], cfg["method"], reference, view))
        return 0.2 if view == "same-nnz" else 0.15

    monkeypatch.setattr(same_cost, "resolve", resolve)
    spec = {
        "reference": "tiny-gpt",
        "base": {"data": "stdlib-text", "epochs": 1},
        "models": ["tiny-gpt-256"],
        "methods": {
            "rigl-same-nnz": {"method": "rigl", "density": "same-nnz"},
            "rigl-same-flops": {"method": "rigl", "density": "same-flops"},
            "static": {"density": 0.3},
        },
        "seeds": [1, 2],
    }
    runs = study.expand(spec, tmp_path)
    folders = sorted(r.folder.relative_to(tmp_path).as_posix() for r in runs)
    assert folders == [
        "tiny-gpt-256/rigl-same-flops/density-0.15/seed-1",
        "tiny-gpt-256/rigl-same-flops/density-0.15/seed-2",
        "tiny-gpt-256/rigl-same-nnz/density-0.2/seed-1",
        "tiny-gpt-256/rigl-same-nnz/density-0.2/seed-2",
        "tiny-gpt-256/static/density-0.3/seed-1",
        "tiny-gpt-256/static/density-0.3/seed-2",
    ]
    assert len(asked) == 2  # once per entry, not once per seed
    assert {r.config["density"] for r in runs if "same-nnz" in str(r.folder)} == {0.2}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"reference": None}, "density same-nnz needs the spec's reference"),
        ({"reference": "tiny-gtp"}, "reference: unknown model 'tiny-gtp'"),
        ({"density": "same-time"}, "a number in .0, 1. or one of same-nnz, same-flops"),
        ({"method": "dense"}, "'dense' takes no density"),
    ],
)
def test_bad_same_cost_entries_are_named(change: dict[str, Any], message: str) -> None:
    entry = {"method": change.get("method", "rigl"), "density": change.get("density", "same-nnz")}
    spec = {
        "reference": change.get("reference", "tiny-gpt"),
        "base": {"data": "stdlib-text", "epochs": 1},
        "models": ["tiny-gpt-256"],
        "methods": {"rigl-same-nnz": entry},
        "seeds": [1],
    }
    if spec["reference"] is None:
        del spec["reference"]
    with pytest.raises(ValueError, match=message):
        study.expand(spec, Path("unused"))


# ---------------------------------------------------------------------- the report


@given(
    st.lists(
        st.tuples(st.floats(1.0, 1e4), st.floats(-100.0, 100.0)),
        min_size=2,
        max_size=5,
        unique_by=lambda p: round(p[0], 3),
    ),
    st.floats(0.0, 1.0),
)
def test_the_dense_curve_is_read_between_its_points_only(
    points: list[tuple[float, float]], where: float
) -> None:
    pts = sorted(points)
    lo, hi = pts[0][0], pts[-1][0]
    for t, v in pts:
        assert read_curve(pts, t) == pytest.approx(v, abs=1e-9) or any(
            t2 == t and v2 != v for t2, v2 in pts
        )
    x = lo + where * (hi - lo)
    got = read_curve(pts, x)
    assert got is not None
    left = max((p for p in pts if p[0] <= x), key=lambda p: p[0])
    right = min((p for p in pts if p[0] >= x), key=lambda p: p[0])
    assert min(left[1], right[1]) - 1e-9 <= got <= max(left[1], right[1]) + 1e-9
    assert read_curve(pts, lo * 0.99) is None
    assert read_curve(pts, hi * 1.01) is None


def test_the_curve_is_linear_in_log_steps() -> None:
    # halfway in log steps between 100 and 400 is 200
    assert read_curve([(100.0, 14.0), (400.0, 12.0)], 200.0) == pytest.approx(13.0)


def test_verdicts_follow_the_two_standard_error_rule() -> None:
    dense = Cell((12.4, 12.5, 12.3), "test_ppl")
    assert verdict(Cell((12.0, 12.1, 11.9), "test_ppl"), dense, higher=False)[2] == "beats"
    assert verdict(Cell((12.9, 13.0, 12.8), "test_ppl"), dense, higher=False)[2] == "loses"
    assert verdict(Cell((12.3, 12.6, 12.4), "test_ppl"), dense, higher=False)[2] == (
        "ties within error"
    )
    assert verdict(Cell((12.0,), "test_ppl"), dense, higher=False)[2] == "no verdict (one seed)"
    gain, error, _ = verdict(Cell((0.9, 0.8), "test_acc"), Cell((0.7, 0.8), "test_acc"), True)
    assert gain == pytest.approx(0.1)
    assert error == pytest.approx(math.hypot(0.05, 0.05))


def _summary(
    folder: Path,
    model: str,
    label: str,
    seed: int,
    ppl: float,
    wall: float,
    density: float,
    steps: int = 100,
    machine: str | None = "machine X",
) -> None:
    folder.mkdir(parents=True)
    sparsified = 786_432 if model == "tiny-gpt" else 3_145_728
    dense = 35_712 if model == "tiny-gpt" else 71_424
    summary = {
        "data": "stdlib-text",
        "model": model,
        "method": "dense" if label.startswith("dense") else label.split("-same-")[0],
        "label": label,
        "density": density,
        "seed": seed,
        "metric": "test_ppl",
        "test_ppl": ppl,
        "wall_time": wall,
        "steps": steps,
        "parameters": sparsified + dense,
        "sparsified_weights": sparsified,
        "active_weights": round(density * sparsified),
        "training_flops": {"total": 1e12 if model == "tiny-gpt" else 0.9e12},
    }
    if machine is not None:
        summary["machine"] = machine
    (folder / "summary.json").write_text(json.dumps(summary))


JITTER = ((1, -0.01), (2, 0.0), (3, 0.01))


def _dense_ladder(runs: Path) -> None:
    """Dense tiny-gpt over 100 and 200 steps, 3 s a step on machine X, 3 seeds."""
    for seed, jitter in JITTER:
        for label, ppl, steps in (("dense", 12.4, 100), ("dense-2x", 11.5, 200)):
            folder = runs / "tiny-gpt" / label / f"seed-{seed}"
            _summary(folder, "tiny-gpt", label, seed, ppl + jitter, 3 * steps, 1.0, steps)


def test_the_report_compares_at_the_same_steps_and_the_same_wall_time(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _dense_ladder(runs)
    for seed, jitter in JITTER:
        # better than dense at the same steps; 1.5x dense's step time, worse given that time
        folder = runs / "tiny-gpt-256" / "rigl-same-nnz" / "density-0.2386" / f"seed-{seed}"
        _summary(folder, "tiny-gpt-256", "rigl-same-nnz", seed, 12.0 + jitter, 450, 0.2386)
        # 3x dense's step time, beyond the longest dense run: no reading in the same time
        folder = runs / "tiny-gpt-256" / "static-same-flops" / "density-0.2" / f"seed-{seed}"
        _summary(folder, "tiny-gpt-256", "static-same-flops", seed, 12.6 + jitter, 900, 0.2)
    md = tmp_path / "results.md"
    md.write_text("# Results\n")
    code = main(
        ["report", str(runs), "--same-cost", "tiny-gpt", "--markdown", str(md), "--plots",
         str(tmp_path / "fig"), "--section", "same"]
    )  # fmt: skip
    assert code == 0
    text = md.read_text()
    same_steps, same_time = text.split("the same wall time")
    rigl = next(line for line in same_steps.splitlines() if "| rigl |" in line)
    assert "| non-zeros | 23.86% |" in rigl
    assert "**beats**" in rigl
    assert "| 0.90 |" in rigl  # its training FLOPs against dense's
    static = next(line for line in same_steps.splitlines() if "| static |" in line)
    assert "training FLOPs" in static
    assert "**loses**" in static
    assert "- machine **A**: machine X; dense tiny-gpt 3000 ms a step (6 runs)" in same_time
    rigl = next(line for line in same_time.splitlines() if "| rigl |" in line)
    # dense in 1.5x its steps' time: 150 steps, read between 100 and 200 in log steps
    read = [12.4 + j - 0.9 * math.log(1.5) / math.log(2) for _, j in JITTER]
    assert "| A | 4500 ± 0.0 (3) | 1.50 |" in rigl
    assert f"| {sum(read) / 3:.3f} ± " in rigl
    assert "**loses**" in rigl
    static = next(line for line in same_time.splitlines() if "| static |" in line)
    assert "beyond the dense runs" in static
    assert (tmp_path / "fig" / "stdlib-text-tiny-gpt-same-cost.png").stat().st_size > 0
    assert text.startswith("# Results\n")


def test_a_wall_time_is_compared_with_dense_on_its_own_machine_only(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _dense_ladder(runs)
    # machine Z: dense timed by a run that counts for its time only (1 s a step), not quality
    _summary(runs / "timing" / "z" / "tiny-gpt" / "dense-timing" / "seed-1", "tiny-gpt",
             "dense-timing", 1, 99.0, 100, 1.0, machine="machine Z")  # fmt: skip
    # RigL: seeds 1 and 2 on X at 1.5x dense's step there, seed 3 on Z at 2x dense's step there
    for seed, jitter in JITTER:
        machine, wall = ("machine Z", 200) if seed == 3 else ("machine X", 450)
        folder = runs / "tiny-gpt-256" / "rigl-same-nnz" / "density-0.2386" / f"seed-{seed}"
        _summary(folder, "tiny-gpt-256", "rigl-same-nnz", seed, 12.0 + jitter, wall, 0.2386,
                 machine=machine)  # fmt: skip
    # SET on a machine with no dense run, and one run whose machine was not recorded
    for seed, recorded in ((1, "machine Y"), (2, None)):
        folder = runs / "tiny-gpt-256" / "set-same-nnz" / "density-0.2386" / f"seed-{seed}"
        _summary(folder, "tiny-gpt-256", "set-same-nnz", seed, 12.1, 450, 0.2386,
                 machine=recorded)  # fmt: skip
    text = table([runs], "tiny-gpt")
    same_steps, same_time = text.split("the same wall time")
    assert "Dense tiny-gpt: 12.400 ± 0.006 (3)" in same_steps  # the timing run is not counted
    assert "- machine **C**: machine Z; dense tiny-gpt 1000 ms a step (1 run)" in same_time
    assert "- machine **B**: machine Y; no dense tiny-gpt run timed there" in same_time
    rigl = [line for line in same_time.splitlines() if "| rigl |" in line]
    # machine X's ratio (its two runs) applied to all three seeds; machine Z's likewise
    on_x = next(line for line in rigl if "| A |" in line)
    assert "| 1.50 | 12.000 ± 0.006 (3) |" in on_x
    read = [12.4 + j - 0.9 * math.log(1.5) / math.log(2) for _, j in JITTER]
    assert f"| {sum(read) / 3:.3f} ± 0.006 (3) |" in on_x
    on_z = next(line for line in rigl if "| C |" in line)
    assert "| 2000 (n=1) | 2.00 |" in on_z
    assert "| 11.500 ± 0.006 (3) |" in on_z  # exactly the 2x runs
    set_rows = [line for line in same_time.splitlines() if "| set |" in line]
    assert len(set_rows) == 2
    assert all("no dense run timed on this machine" in line for line in set_rows)
    assert "| not recorded |" in set_rows[1]


def test_the_same_cost_report_stands_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tmp_path), "--same-cost", "tiny-gpt", "--claims"]) == 2
    assert "--same-cost is a report of its own" in capsys.readouterr().err


def test_a_steps_time_is_read_from_the_runs_acceleration_report(tmp_path: Path) -> None:
    from sparselearn.accel.accelerate import AccelerationReport, LayerChoice
    from sparselearn.experiments.same_cost_report import _layer_times

    def layer(name: str, steps: str | None, live: str | None) -> LayerChoice:
        return LayerChoice(
            name, "linear", 0.2, 10.0, 5.0, "sparse", "faster", backend="cpp",
            inference="sparse", dense_inference_ms=3.0, sparse_inference_ms=2.0, steps=steps,
            live=live,
        )  # fmt: skip

    report = AccelerationReport(
        "auto",
        [
            layer("a.weight", "sparse", "sparse 50.98, dense 86.17"),
            layer("b.weight", "dense", "sparse 30.00, dense 20.50"),  # the check chose dense
            layer("c.weight", None, None),  # not checked: not counted
            LayerChoice("d.weight", "linear", 0.2, 10.0, 12.0, "dense", "slower"),
        ],
        march="native",
    )
    (tmp_path / "acceleration.txt").write_text(f"{report}\n")
    used, dense = _layer_times(tmp_path)  # type: ignore[misc]
    assert used == pytest.approx(50.98 + 20.50)
    assert dense == pytest.approx(86.17 + 20.50)
    assert _layer_times(tmp_path / "nothing") is None
