"""`sparselearn report`: mean ± standard error over seeds, tables and plots."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from sparselearn.experiments.report import END, START, collect, replace_section, report

ACCURACIES = {
    ("dense", 1.0): [0.90, 0.91, 0.92],
    ("sparse_momentum", 0.05): [0.88, 0.89, 0.86],
    ("sparse_momentum", 0.1): [0.895, 0.90],
    ("set", 0.05): [0.85, 0.87, 0.86],
    ("set", 0.1): [0.91],
}


def fake_runs(root: Path) -> Path:
    for (method, density), accs in ACCURACIES.items():
        for seed, acc in enumerate(accs, start=1):
            run = root / method / f"density-{density}" / f"seed-{seed}"
            run.mkdir(parents=True)
            (run / "summary.json").write_text(
                json.dumps(
                    {
                        "data": "fashion-mnist",
                        "model": "lenet5",
                        "method": method,
                        "density": density,
                        "seed": seed,
                        "test_acc": acc,
                        "wall_time": 1.0,
                    }
                )
            )
    return root


def test_cells_are_mean_and_standard_error(tmp_path: Path) -> None:
    results = collect([fake_runs(tmp_path)])
    cells = results[("fashion-mnist", "lenet5")]
    for (method, density), accs in ACCURACIES.items():
        cell = cells[method][density]
        assert cell.n == len(accs)
        assert cell.mean == pytest.approx(statistics.fmean(accs))
        expected_se = statistics.stdev(accs) / math.sqrt(len(accs)) if len(accs) > 1 else 0.0
        assert cell.se == pytest.approx(expected_se)


def test_markdown_table_and_plots(tmp_path: Path) -> None:
    runs = fake_runs(tmp_path / "runs")
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text("# Results\n\nIntro.\n\n" + START + "\nold table\n" + END + "\n\nDiscussion.\n")
    text = report([runs], markdown=doc, plots=tmp_path / "docs" / "figures")
    assert "| method | 5% | 10% |" in text
    assert "| sparse_momentum | **87.67 ± 0.88 (3)** | 89.75 ± 0.25 (2) |" in text
    assert "| set | 86.00 ± 0.58 (3) | **91.00 (n=1)** |" in text
    assert "| dense (100%) | 91.00 ± 0.58 (3) |" in text
    written = doc.read_text()
    assert written.startswith("# Results\n\nIntro.\n\n")
    assert written.endswith("\n\nDiscussion.\n")
    assert "old table" not in written
    assert text.strip() in written
    png = tmp_path / "docs" / "figures" / "fashion-mnist-lenet5-accuracy-vs-density.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "(figures/fashion-mnist-lenet5-accuracy-vs-density.png)" in written


def test_replace_section_appends_when_markers_are_missing(tmp_path: Path) -> None:
    doc = tmp_path / "a.md"
    doc.write_text("text\n")
    replace_section(doc, START, END, "body")
    assert doc.read_text() == f"text\n\n{START}\nbody\n{END}\n"


def test_no_runs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no finished runs"):
        report([tmp_path])


def test_two_reports_in_one_file(tmp_path: Path) -> None:
    runs = fake_runs(tmp_path / "runs")
    doc = tmp_path / "results.md"
    doc.write_text("# A\n\n<!-- first:start -->\n<!-- first:end -->\n\n# B\n")
    report([runs], markdown=doc, section="first")
    report([runs / "set"], markdown=doc, section="second")
    text = doc.read_text()
    first = text.split("<!-- first:start -->")[1].split("<!-- first:end -->")[0]
    second = text.split("<!-- second:start -->")[1].split("<!-- second:end -->")[0]
    assert "sparse_momentum" in first
    assert "sparse_momentum" not in second
    assert "| set |" in second
    assert text.index("# B") < text.index("<!-- second:start -->")  # appended at the end


def test_labelled_variants_get_their_own_rows(tmp_path: Path) -> None:
    for label, acc in [("sparse_momentum", 0.8), ("sm-window-50", 0.7)]:
        run = tmp_path / label / "seed-1"
        run.mkdir(parents=True)
        summary = {
            "data": "mnist",
            "model": "lenet5",
            "method": "sparse_momentum",
            "label": label,
            "density": 0.05,
            "seed": 1,
            "test_acc": acc,
        }
        (run / "summary.json").write_text(json.dumps(summary))
    cells = collect([tmp_path])[("mnist", "lenet5")]
    assert cells["sparse_momentum"][0.05].mean == pytest.approx(0.8)
    assert cells["sm-window-50"][0.05].mean == pytest.approx(0.7)


def test_claims_get_verdicts_from_their_numbers(tmp_path: Path) -> None:
    from sparselearn.experiments.claims import check

    verdicts = {
        v.claim: v for v in check(collect([fake_runs(tmp_path)]))[("fashion-mnist", "lenet5")]
    }
    # 5%: sparse momentum 87.67 ± 0.88, dense 91.00 ± 0.58: 3.33 below, more than 2 x 1.05
    reach = verdicts["at 5%, sparse momentum reaches dense accuracy"]
    assert reach.difference == pytest.approx(statistics.fmean([0.88, 0.89, 0.86]) - 0.91)
    assert reach.error == pytest.approx(
        math.hypot(
            statistics.stdev([0.88, 0.89, 0.86]) / 3**0.5,
            statistics.stdev([0.90, 0.91, 0.92]) / 3**0.5,
        )
    )
    assert reach.verdict == "fails"
    # 10%: 89.75 ± 0.25 (2 seeds) against 91.00 ± 0.58: 1.25 below, within 2 x 0.63
    assert (
        verdicts["at 10%, sparse momentum reaches dense accuracy"].verdict == "holds within error"
    )
    # 5%: 87.67 against SET's 86.00: above
    assert verdicts["at 5%, sparse momentum ranks above set"].verdict == "holds"
    # 10%: 89.75 ± 0.25 against SET's single seed 91.0, whose spread is unknown: no verdict
    assert verdicts["at 10%, sparse momentum ranks above set"].verdict == "no verdict (one seed)"
    # no DSR or static runs, and no claim at 20% without runs there
    assert not any("dsr" in c or "static" in c or "20%" in c for c in verdicts)


def test_report_writes_the_claims_and_learning_curves(tmp_path: Path) -> None:
    runs = fake_runs(tmp_path / "runs")
    for summary in runs.rglob("summary.json"):
        s = json.loads(summary.read_text())
        rows = [{"epoch": e, "test_acc": s["test_acc"] - 0.1 / e} for e in (1, 2, 3)]
        (summary.parent / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    figures = tmp_path / "figures"
    text = report([runs], plots=figures, claims=True,
                  learning_curves=["dense", "sparse_momentum@0.05"])  # fmt: skip
    assert "### The paper's claims: lenet5 on fashion-mnist" in text
    row = next(line for line in text.splitlines() if line.startswith("| at 5%, sparse momentum r"))
    assert row.split(" | ")[1:] == [
        "87.67 ± 0.88 (3)",
        "dense: 91.00 ± 0.58 (3)",
        "-3.33 ± 1.05",
        "**fails** |",
    ]
    assert (figures / "fashion-mnist-lenet5-learning-curves.png").stat().st_size > 0
    with pytest.raises(ValueError, match="ROW@DENSITY"):
        report([runs], plots=figures, learning_curves=["sparse_momentum"])
    with pytest.raises(ValueError, match="--plots"):
        report([runs], learning_curves=["dense"])


def _summaries(root: Path, rows: dict[tuple[str, str, float], list[float]], metric: str) -> Path:
    for (method, label, density), values in rows.items():
        for seed, value in enumerate(values, start=1):
            run = root / label / f"density-{density}" / f"seed-{seed}"
            run.mkdir(parents=True)
            summary = {"data": "d", "model": "m", "method": method, "label": label,
                       "density": density, "seed": seed, "metric": metric,
                       metric: value}  # fmt: skip
            (run / "summary.json").write_text(json.dumps(summary))
    return root


def test_structure_costs_pair_each_structured_row_with_its_twin(tmp_path: Path) -> None:
    runs = _summaries(
        tmp_path,
        {
            ("rigl", "rigl", 0.1): [0.90, 0.91, 0.92],
            ("rigl", "rigl-fan_in", 0.1): [0.85, 0.86, 0.87],  # 5 points below: costs
            ("rigl", "rigl", 0.5): [0.90, 0.91, 0.92],
            ("rigl", "rigl-2_4", 0.5): [0.905, 0.91, 0.915],  # level: no cost within error
            ("set", "set-fan_in", 0.1): [0.8, 0.8],  # no unstructured twin: left out
        },
        "test_acc",
    )
    text = report([runs], structure_costs=True)
    costs = text[text.index("### What structure costs") :]
    rows = [line for line in costs.splitlines() if line.startswith("| rigl | ")]
    assert rows == [
        "| rigl | 2:4 | 50% | 91.00 ± 0.58 (3) | 91.00 ± 0.29 (3) | +0.00 ± 0.65 points "
        "| **no cost within error** |",
        "| rigl | fan_in | 10% | 91.00 ± 0.58 (3) | 86.00 ± 0.58 (3) | +5.00 ± 0.82 points "
        "| **costs** |",
    ]
    assert "| set |" not in text


def test_structure_costs_of_perplexity_count_higher_as_worse(tmp_path: Path) -> None:
    runs = _summaries(
        tmp_path,
        {
            ("rigl", "rigl", 0.1): [10.0, 10.1, 9.9],
            ("rigl", "rigl-fan_in", 0.1): [9.0, 9.1, 8.9],  # lower perplexity: gains
        },
        "test_ppl",
    )
    text = report([runs], structure_costs=True)
    row = next(line for line in text.splitlines() if line.startswith("| rigl | fan_in"))
    assert "-1.000 ± 0.082 (-10.0%)" in row
    assert row.endswith("| **gains** |")
