"""``sparselearn report``: test accuracy over seeds per model, method and density."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cells import METRICS, Cell, Key, is_dense
from .config import MACHINE_SETTINGS, TrainConfig, jsonable
from .runs import iter_runs, read_json, write_atomic

START, END = "<!-- report:start -->", "<!-- report:end -->"


# what does not make two runs different experiments: the seed, and settings of the machine
_NOT_THE_EXPERIMENT = {"seed", "label", "density", *MACHINE_SETTINGS}


def _summary(run: Path) -> dict[str, Any]:
    path = run / "summary.json"
    s = read_json(path)
    need = ("data", "model", "method", "density")
    if not isinstance(s, dict) or any(k not in s for k in need):
        raise ValueError(f"{path} is damaged: a summary holds {', '.join(need)}")
    return s


def collect(
    paths: Sequence[str | os.PathLike[str]], quantity: str | None = None
) -> dict[Key, dict[str, dict[float, Cell]]]:
    """``{(data, model): {row: {density: Cell}}}`` from every summary.json under ``paths``:
    each run's own metric (test accuracy, or perplexity for language models), or
    ``quantity`` (``"wall_time"``) where given.

    A row pools the seeds of one experiment: runs of one label whose settings differ in more
    than the seed (and the machine they ran on) are rows of their own, named by what differs.
    """
    found: list[tuple[Key, str, dict[str, Any], float, float]] = []
    metric_of: dict[Key, str] = {}
    for run in iter_runs(list(paths)):
        s = _summary(run)
        metric = quantity or s.get("metric", "test_acc")
        if metric not in METRICS or s.get(metric) is None:
            raise ValueError(f"{run / 'summary.json'} is damaged: it has no {metric}")
        key = (s["data"], s["model"])
        if metric_of.setdefault(key, metric) != metric:
            raise ValueError(
                f"{run / 'summary.json'}: {metric} among runs reporting {metric_of[key]}"
            )
        config = _filled(s.get("config", {}))
        settings = {k: v for k, v in config.items() if k not in _NOT_THE_EXPERIMENT}
        label = s.get("label") or s["method"]
        found.append((key, label, settings, float(s["density"]), s[metric]))
    if not found:
        raise FileNotFoundError(
            f"no finished runs (summary.json) under {', '.join(map(str, paths))}"
        )
    variants: dict[tuple[Key, str], list[dict[str, Any]]] = defaultdict(list)
    for key, label, settings, _, _ in found:
        if settings not in variants[(key, label)]:
            variants[(key, label)].append(settings)
    raw: dict[Key, dict[str, dict[float, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for key, label, settings, density, acc in found:
        raw[key][_row_name(label, settings, variants[(key, label)])][density].append(acc)
    return {
        key: {
            m: {d: Cell(tuple(v), metric_of[key]) for d, v in by_d.items()}
            for m, by_d in by_m.items()
        }
        for key, by_m in raw.items()
    }


def _filled(config: dict[str, Any]) -> dict[str, Any]:
    """A run's settings with the defaults of options added since it ran (so that an older
    run and a newer one with the same settings compare equal)."""
    try:
        return jsonable(TrainConfig.from_dict(config).to_dict())
    except (TypeError, ValueError):
        return dict(config)


def _row_name(label: str, settings: dict[str, Any], variants: list[dict[str, Any]]) -> str:
    if len(variants) == 1:
        return label
    keys = sorted({k for v in variants for k in v})
    differ = [k for k in keys if len({json.dumps(v.get(k), sort_keys=True) for v in variants}) > 1]
    shown = ", ".join(f"{k}={json.dumps(settings.get(k))}" for k in differ)
    return f"{label} ({shown})"


def table(results: dict[Key, dict[str, dict[float, Cell]]]) -> str:
    """Markdown tables, one per (dataset, model)."""
    lines = []
    for (data, model), by_method in sorted(results.items()):
        densities = sorted({d for m, by_d in by_method.items() if not is_dense(m) for d in by_d})
        metric = next(iter(next(iter(by_method.values())).values())).metric
        title, _, _, higher = METRICS[metric]
        pick = max if higher else min
        lines += [
            f"### {model} on {data}",
            "",
            f"{title}, mean ± standard error over seeds (number of seeds); the best "
            "sparse method at each density in bold.",
            "",
            "| method | " + " | ".join(f"{100 * d:g}%" for d in densities) + " |",
            "|---|" + "---:|" * len(densities),
        ]
        best = {
            d: pick(
                (
                    c.mean
                    for m, by_d in by_method.items()
                    if not is_dense(m)
                    for dd, c in by_d.items()
                    if dd == d
                ),
                default=None,
            )
            for d in densities
        }
        for method in sorted(by_method, key=lambda m: (is_dense(m), m)):
            by_d = by_method[method]
            if is_dense(method):
                cell = by_d[1.0]
                lines.append(f"| {method} (100%) | {cell.text()} |" + " |" * (len(densities) - 1))
                continue
            cells = []
            for d in densities:
                c = by_d.get(d)
                text = "–" if c is None else c.text()
                cells.append(f"**{text}**" if c is not None and c.mean == best[d] else text)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[Key, dict[str, dict[float, Cell]]], folder: Path) -> list[Path]:
    """One accuracy-versus-density PNG per model."""
    from .plots import _pyplot, save_figure

    plt = _pyplot()
    written = []
    for (data, model), by_method in sorted(results.items()):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        metric = next(iter(next(iter(by_method.values())).values())).metric
        title, k, _, _ = METRICS[metric]
        for method, by_d in sorted(by_method.items()):
            if is_dense(method):
                c = by_d[1.0]
                ax.axhline(k * c.mean, color="k", ls="--", lw=1, label=method)
                ax.axhspan(k * (c.mean - c.se), k * (c.mean + c.se), color="k", alpha=0.08)
                continue
            ds = sorted(by_d)
            ax.errorbar(
                [100 * d for d in ds],
                [k * by_d[d].mean for d in ds],
                yerr=[k * by_d[d].se for d in ds],
                marker="o",
                ms=3,
                capsize=2,
                label=method,
            )
        ax.set_xscale("log")
        ax.set_xlabel("density (% of weights active)")
        ax.set_ylabel(title[0].lower() + title[1:])
        ax.set_title(f"{model} on {data}")
        ax.legend(fontsize=8)
        what = "accuracy" if metric == "test_acc" else "perplexity"
        path = folder / f"{data}-{model}-{what}-vs-density.png"
        save_figure(fig, path)
        written.append(path)
    return written


def parse_curve(text: str) -> tuple[str, float]:
    """``"dense"`` or ``"ROW@DENSITY"`` (``sparse_momentum@0.05``) -> (row, density)."""
    row, _, density = text.partition("@")
    if is_dense(row) and not density:
        return row, 1.0
    try:
        value = float(density)
    except ValueError:
        value = math.nan
    if not row or not 0 < value <= 1:
        raise ValueError(
            f"learning curve {text!r}: give ROW@DENSITY (e.g. sparse_momentum@0.05) or dense"
        )
    return row, value


def curves(
    paths: Sequence[str | os.PathLike[str]], wanted: Sequence[str], folder: Path
) -> list[Path]:
    """Test accuracy against epoch for the rows and densities ``wanted`` (see
    :func:`parse_curve`), the mean over seeds with a band of one standard error; one PNG per
    (dataset, model)."""
    from .plots import _pyplot, save_figure

    picked = [parse_curve(w) for w in wanted]
    found: dict[Key, dict[tuple[str, float], list[dict[int, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for run in iter_runs(list(paths)):
        s = _summary(run)
        label = s.get("label") or s["method"]
        density = 1.0 if is_dense(label) else float(s["density"])
        if (label, density) not in picked:
            continue
        by_epoch = {}
        for line in (run / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row.get("test_acc") is not None and row.get("epoch", 0) > 0:
                by_epoch[int(row["epoch"])] = float(row["test_acc"])
        found[(s["data"], s["model"])][(label, density)].append(by_epoch)
    if not found:
        raise FileNotFoundError(
            f"no runs of {', '.join(wanted)} under {', '.join(map(str, paths))}"
        )
    plt = _pyplot()
    written = []
    for (data, model), by_row in sorted(found.items()):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for (label, density), runs in sorted(by_row.items(), key=lambda kv: picked.index(kv[0])):
            epochs = sorted(set.intersection(*(set(r) for r in runs)))
            cells = [Cell(tuple(r[e] for r in runs)) for e in epochs]
            mean = [100 * c.mean for c in cells]
            se = [100 * c.se for c in cells]
            name = label if is_dense(label) else f"{label} {100 * density:g}%"
            seeds = f"{len(runs)} seed{'' if len(runs) == 1 else 's'}"
            (line,) = ax.plot(epochs, mean, lw=1.2, label=f"{name} ({seeds})")
            ax.fill_between(
                epochs,
                [m - e for m, e in zip(mean, se, strict=True)],
                [m + e for m, e in zip(mean, se, strict=True)],
                color=line.get_color(),
                alpha=0.2,
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{model} on {data}: learning curves (mean ± standard error)")
        ax.legend(fontsize=8)
        path = folder / f"{data}-{model}-learning-curves.png"
        save_figure(fig, path)
        written.append(path)
    return written


def replace_section(path: Path, start: str, end: str, body: str) -> None:
    """Put ``body`` between the markers in ``path`` (appended if absent); the rest is kept."""
    section = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + section + "\n"
    write_atomic(path, text)


def _figures_text(figures: list[Path], markdown: Path) -> str:
    rel = [os.path.relpath(p, markdown.parent) for p in figures]
    return "\n" + "\n".join(f"![{Path(r).stem}]({r})" for r in rel) + "\n"


def _same_cost(
    paths: Sequence[str | os.PathLike[str]],
    reference: str,
    markdown: Path | None,
    plots: Path | None,
    section: str,
) -> str:
    from . import same_cost_report

    text = same_cost_report.table(paths, reference)
    if plots is not None:
        figures = same_cost_report.plot(paths, reference, plots)
        if markdown is not None:
            text += _figures_text(figures, markdown)
    if markdown is not None:
        replace_section(markdown, f"<!-- {section}:start -->", f"<!-- {section}:end -->", text)
    return text


def report(
    paths: Sequence[str | os.PathLike[str]],
    *,
    markdown: Path | None = None,
    plots: Path | None = None,
    section: str = "report",
    wall_time: bool = False,
    claims: bool = False,
    structure_costs: bool = False,
    learning_curves: Sequence[str] = (),
    same_cost: str | None = None,
) -> str:
    """Aggregate runs; optionally write the tables into a markdown file and the plots,
    (``wall_time``) a table of training wall time beside the metric's, (``claims``) the
    verdict on each of the paper's claims (:mod:`.claims`), (``structure_costs``) what each
    structured variant costs against its unstructured twin (:mod:`.structure_costs`) and
    (``learning_curves``, with
    ``plots``) test accuracy against epoch for the rows given as ``ROW@DENSITY``. With
    ``same_cost`` (a model name) the report is instead wider sparse models against that dense
    model at the same steps and the same wall time (:mod:`.same_cost_report`), with its
    figure of quality against wall time.

    The tables go between ``<!-- {section}:start -->`` and ``<!-- {section}:end -->``, so that
    one file can hold several reports; the rest of the file is kept.
    """
    if same_cost is not None:
        if wall_time or claims or structure_costs or learning_curves:
            raise ValueError(
                "--same-cost is a report of its own: give it without --wall-time, --claims, "
                "--structure-costs or --curves"
            )
        return _same_cost(paths, same_cost, markdown, plots, section)
    results = collect(paths)
    text = table(results)
    if wall_time:
        text += "\n" + table(collect(paths, "wall_time"))
    if claims:
        from .claims import table as claims_table

        text += "\n" + claims_table(results)
    if structure_costs:
        from .structure_costs import table as costs_table

        text += "\n" + costs_table(results)
    if learning_curves and plots is None:
        raise ValueError("learning curves are figures: give a folder for them (--plots)")
    if plots is not None:
        figures = plot(results, plots)
        if learning_curves:
            figures += curves(paths, learning_curves, plots)
        if markdown is not None:
            text += _figures_text(figures, markdown)
    if markdown is not None:
        replace_section(markdown, f"<!-- {section}:start -->", f"<!-- {section}:end -->", text)
    return text
