"""Wider sparse models against a small dense one at the same cost (``sparselearn report
--same-cost MODEL``).

The runs hold a dense ``reference`` model trained for its recipe (the row ``dense``) and for
longer (rows ``dense-<k>x``: the same recipe over k times the epochs), and wider models
trained sparse at a same-cost density (rows ``<method>-same-nnz`` and ``<method>-same-flops``,
see :mod:`.same_cost`), every run for the reference recipe's steps. Three comparisons each:

- **the same steps** (and so the same non-zeros, or the same training FLOPs, by the row's
  view): the sparse row against the dense one;
- **the same wall time**: the sparse row against the dense model trained for as long as the
  sparse one took, on the same machine. Every run records the machine its wall time was taken
  on (``machine`` in its summary: the CPU, its vector extensions and the kernel build), and a
  wall time is compared only with dense runs of the same machine: the sparse runs' time a step
  on machine M over the dense reference's time a step on M (any of its dense runs there: the
  ladder's, or ``dense-timing`` runs that exist for this) gives the steps dense trains in the
  sparse run's time, and the dense quality at those steps is read off each seed's dense runs
  (``dense`` and ``dense-<k>x``, linear in the logarithm of the steps between the two that
  bracket it; a seed whose dense runs do not bracket it is left out: the comparison is never
  extrapolated). Quality does not depend on the machine, time does: the ratio of a machine
  applies to every seed's run, and each machine gets its own rows.

A verdict follows the two-standard-error rule of the paper-budget claims (:mod:`.claims`):
the sparse model **beats** the dense one where its mean is better by more than two standard
errors of the difference (sqrt(se_a² + se_b²)), **ties within error** within two, and
**loses** beyond them the other way; a side with one seed gets no verdict.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..kernels.machine import SEVERAL
from .cells import METRICS, Cell
from .runs import iter_runs, read_json

_VIEWS = {"same-nnz": "non-zeros", "same-flops": "training FLOPs"}
_LADDER = re.compile(r"dense(?:-(\d+(?:\.\d+)?)x)?")


@dataclass
class _Run:
    seed: int
    value: float  # the task's metric (test accuracy or perplexity)
    wall: float
    flops: float | None  # training FLOPs of the run (None: not recorded)
    nonzeros: int
    density: float
    steps: int = 0
    layers: tuple[float, float] | None = None  # sparse layers' ms a step: as run, as dense
    machine: str | None = None  # what the wall time was taken on (None: not recorded)

    @property
    def step_ms(self) -> float:
        return 1000 * self.wall / self.steps


_LIVE = re.compile(r"\b(sparse|dense) ([\d.]+)")  # "sparse 50.98, dense 86.17"


def _layer_times(run: Path) -> tuple[float, float] | None:
    """From a run's ``acceleration.txt``: the ms a training step spends in its accelerated
    layers as they computed (sparse, or dense where the check in the run chose that), and as
    the dense products of the same layers, by the medians the check in the run timed; None
    where the run accelerated nothing or kept no such report."""
    path = run / "acceleration.txt"
    if not path.exists():
        return None
    used = dense = 0.0
    for line in path.read_text().splitlines()[1:]:
        fields = re.split(r"\s{2,}", line.strip())  # the report's columns
        if len(fields) != 12:
            continue  # the closing line, or a layer that was not accelerated
        timed = {way: float(ms) for way, ms in _LIVE.findall(fields[11])}
        if fields[10] not in timed or "dense" not in timed:
            continue  # not checked in the run
        used += timed[fields[10]]  # the way its steps computed
        dense += timed["dense"]
    return (used, dense) if dense else None


@dataclass
class _Row:
    model: str
    method: str
    view: str
    runs: dict[int, _Run] = field(default_factory=dict)

    def cell(self, metric: str, what: str = "value") -> Cell:
        return Cell(tuple(getattr(r, what) for _, r in sorted(self.runs.items())), metric)


def _read(paths: Sequence[str | os.PathLike[str]], reference: str) -> dict[str, Any]:
    """The reference's dense runs by ladder factor and seed, and the sparse rows, per data."""
    by_data: dict[str, Any] = {}
    for run in iter_runs(list(paths)):
        s = read_json(run / "summary.json")
        metric = s.get("metric", "test_acc")
        if metric not in METRICS or s.get(metric) is None or s.get("wall_time") is None:
            raise ValueError(f"{run / 'summary.json'} is damaged: it has no {metric}")
        label = s.get("label") or s["method"]
        flops = (s.get("training_flops") or {}).get("total")
        nonzeros = s.get("nonzero_parameters")
        if nonzeros is None:  # a summary from before the field: its parameters were counted
            accelerated = (s.get("config") or {}).get("accelerate", "off") != "off"
            # as stored (an accelerated layer holds its active weights only), or dense
            nonzeros = int(s["parameters"]) + (
                0 if accelerated else int(s["active_weights"]) - int(s["sparsified_weights"])
            )
        one = _Run(
            int(s["seed"]),
            float(s[metric]),
            float(s["wall_time"]),
            None if flops is None else float(flops),
            nonzeros,
            float(s["density"]),
            int(s.get("steps") or 0),
            _layer_times(run),
            s.get("machine"),
        )
        data = by_data.setdefault(
            s["data"],
            {
                "metric": metric,
                "ladder": defaultdict(dict),
                "rows": {},
                "timing": defaultdict(list),
            },
        )
        if data["metric"] != metric:
            raise ValueError(f"{run / 'summary.json'}: {metric} among runs reporting another")
        ladder = _LADDER.fullmatch(label)
        if s["model"] == reference and s["method"] == "dense":
            if one.steps and one.machine:
                data["timing"][one.machine].append(one)  # dense's time a step on its machine
            if ladder:
                data["ladder"][float(ladder.group(1) or 1)][one.seed] = one
                continue
        if s["model"] == reference:
            continue  # other runs of the reference: not part of this comparison
        method, _, view = label.rpartition("-same-")
        view = f"same-{view}"
        if not method or view not in _VIEWS:
            raise ValueError(
                f"{run}: a run of {s['model']} labelled {label!r}; a same-cost row is "
                f"labelled METHOD-same-nnz or METHOD-same-flops"
            )
        row = data["rows"].setdefault((s["model"], label), _Row(s["model"], method, view))
        row.runs[one.seed] = one
    if not by_data:
        raise FileNotFoundError(
            f"no finished runs (summary.json) under {', '.join(map(str, paths))}"
        )
    for name, data in by_data.items():
        if 1.0 not in data["ladder"]:
            raise ValueError(
                f"no dense run of {reference} on {name} (the row 'dense') under "
                f"{', '.join(map(str, paths))}: it is what the sparse rows are compared with"
            )
    return by_data


def read_curve(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """The quality at ``x`` steps on the curve through ``points`` ((steps, value) of one
    seed's dense runs): linear in log(steps) between the two that bracket it, None outside
    them."""
    pts = sorted(points)
    for (x0, v0), (x1, v1) in itertools.pairwise(pts):
        if x0 <= x <= x1:
            if x1 == x0:
                return (v0 + v1) / 2
            f = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return v0 + f * (v1 - v0)
    return None


@dataclass(frozen=True)
class _Machine:
    letter: str  # its name in the tables
    dense_ms: float | None  # the dense reference's time a step there (None: no run timed)
    dense_runs: int  # how many of its runs timed it


def _machines(found: dict[str, Any]) -> dict[str, _Machine]:
    """Every machine a run of the comparison names, lettered in order of name, with the dense
    reference's time a step there (a run resumed on another machine times none)."""
    timing = {m: runs for m, runs in found["timing"].items() if not m.startswith(SEVERAL)}
    named = set(timing) | {
        r.machine for row in found["rows"].values() for r in row.runs.values() if r.machine
    }
    return {
        m: _Machine(
            chr(ord("A") + i) if i < 26 else f"M{i + 1}",
            _mean([r.step_ms for r in timing[m]]) if m in timing else None,
            len(timing.get(m, [])),
        )
        for i, m in enumerate(sorted(named))
    }


def _machine_lines(reference: str, machines: dict[str, _Machine]) -> list[str]:
    lines = []
    for name, m in machines.items():
        dense = (
            f"dense {reference} {_ms(m.dense_ms)} ms a step "
            f"({m.dense_runs} run{'s' * (m.dense_runs != 1)})"
            if m.dense_ms is not None
            else f"no dense {reference} run timed there"
        )
        lines.append(f"- machine **{m.letter}**: {name}; {dense}")
    return lines


def _dense_ms(machines: dict[str, _Machine], machine: str | None) -> float | None:
    """The dense reference's time a step on ``machine`` (None: not timed, or not recorded)."""
    return machines[machine].dense_ms if machine in machines else None


def _letter(machines: dict[str, _Machine], machine: str | None) -> str:
    return machines[machine].letter if machine in machines else "not recorded"


def _by_machine(row: _Row) -> dict[str | None, list[_Run]]:
    """The row's runs by machine (None: not recorded), recorded machines first."""
    groups: dict[str | None, list[_Run]] = defaultdict(list)
    for _, r in sorted(row.runs.items()):
        groups[r.machine].append(r)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or "")))


def verdict(sparse: Cell, dense: Cell, higher: bool) -> tuple[float, float, str]:
    """(how much better the sparse mean is, the difference's standard error, the verdict)."""
    gain = (sparse.mean - dense.mean) if higher else (dense.mean - sparse.mean)
    error = math.hypot(sparse.se, dense.se)
    if min(sparse.n, dense.n) < 2:
        return gain, error, "no verdict (one seed)"
    if abs(gain) <= 2 * error:
        return gain, error, "ties within error"
    return gain, error, "beats" if gain > 0 else "loses"


def _gain_text(gain: float, error: float, scale: float, digits: int, metric: str) -> str:
    text = f"{scale * gain:+.{digits}f} ± {scale * error:.{digits}f}"
    return text + " points" if metric == "test_acc" else text


def table(paths: Sequence[str | os.PathLike[str]], reference: str) -> str:
    """The same-cost tables as markdown, one pair per dataset."""
    lines = []
    for data, found in sorted(_read(paths, reference).items()):
        metric = found["metric"]
        title, scale, digits, higher = METRICS[metric]
        what = title.split(" (")[0].lower()
        dense_runs = found["ladder"][1.0]
        dense = Cell(tuple(r.value for _, r in sorted(dense_runs.items())), metric)
        dense_flops = [r.flops for r in dense_runs.values() if r.flops]
        nonzeros = next(iter(dense_runs.values())).nonzeros
        lines += [
            f"### Wider and sparse against dense {reference} on {data}: the same steps",
            "",
            f"{title}, mean ± standard error over seeds (number of seeds). Dense {reference}: "
            f"{dense.text()}, {nonzeros:,} parameters, "
            f"{_flops_text(sum(dense_flops) / len(dense_flops)) if dense_flops else '–'} "
            "training FLOPs. Each wider model trains for the same steps at the density that "
            "matches the dense model's non-zeros or training FLOPs (its view); the gain is how "
            f"much better its {what} is than dense's.",
            "",
            "| model | method | same | density | non-zeros | training FLOPs (x dense) | "
            f"{what} | gain over dense (± its standard error) | verdict |",
            "|---|---|---|---:|---:|---:|---:|---:|---|",
        ]
        rows = sorted(found["rows"].values(), key=lambda r: (r.model, r.method, r.view))
        for row in rows:
            cell = row.cell(metric)
            runs = list(row.runs.values())
            ratio = (
                f"{_mean([r.flops for r in runs]) / _mean(dense_flops):.2f}"
                if dense_flops and all(r.flops for r in runs)
                else "–"
            )
            gain, error, said = verdict(cell, dense, higher)
            lines.append(
                f"| {row.model} | {row.method} | {_VIEWS[row.view]} | "
                f"{100 * runs[0].density:.2f}% | {round(_mean([r.nonzeros for r in runs])):,} | "
                f"{ratio} | {cell.text()} | {_gain_text(gain, error, scale, digits, metric)} | "
                f"**{said}** |"
            )
        factors = sorted(found["ladder"])
        ladder_text = ", ".join(
            f"{f:g}x ({_mean([r.steps for r in found['ladder'][f].values()]):,.0f} steps): "
            f"{Cell(tuple(r.value for r in found['ladder'][f].values()), metric).text()}"
            for f in factors
        )
        machines = _machines(found)
        curves: dict[int, list[tuple[float, float]]] = defaultdict(list)  # seed: (steps, value)
        for f in factors:
            for seed, r in found["ladder"][f].items():
                curves[seed].append((r.steps, r.value))
        lines += [
            "",
            f"### Wider and sparse against dense {reference} on {data}: the same wall time",
            "",
            f"Dense {reference} trained for its recipe's steps (1x) and longer: {ladder_text}. "
            "A wall time is compared only with dense runs on the same machine (the CPU, its "
            "vector extensions and the kernel build; every run records it): a sparse row's time "
            f"a step there over dense {reference}'s (*x dense*) gives the steps dense trains in "
            "the same time, and the dense quality at those steps is read off each seed's dense "
            "runs (linear in log steps between the two that bracket it; seeds outside them are "
            f"left out, and the number of seeds says how many remain). The {what} column holds "
            "every seed of the row, wherever it ran; a machine's rows apply its time ratio to "
            "them all. Mean ± standard error over seeds (number of seeds).",
            "",
            *_machine_lines(reference, machines),
            "",
            f"| model | method | same | machine | time a step (ms) | x dense | {what} | dense in "
            "that time | gain over dense (± its standard error) | verdict |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for row in rows:
            cell = row.cell(metric)
            for machine, runs in _by_machine(row).items():
                step = Cell(tuple(r.step_ms for r in runs), "wall_time")
                head = (
                    f"| {row.model} | {row.method} | {_VIEWS[row.view]} | "
                    f"{_letter(machines, machine)} | {_ms_text(step)} |"
                )
                dense_ms = _dense_ms(machines, machine)
                if dense_ms is None:
                    lines.append(
                        f"{head} – | {cell.text()} | no dense run timed on this machine | – | "
                        "no verdict |"
                    )
                    continue
                slower = step.mean / dense_ms
                matched = {}
                for seed, r in row.runs.items():
                    v = read_curve(curves[seed], slower * r.steps)
                    if v is not None:
                        matched[seed] = v
                if matched:
                    same_time = Cell(tuple(v for _, v in sorted(matched.items())), metric)
                    paired = Cell(tuple(row.runs[s].value for s in sorted(matched)), metric)
                    gain, error, said = verdict(paired, same_time, higher)
                    at = same_time.text()
                    gained = _gain_text(gain, error, scale, digits, metric)
                    said = f"**{said}**"
                else:
                    at, gained, said = "beyond the dense runs", "–", "no verdict"
                lines.append(f"{head} {slower:.2f} | {cell.text()} | {at} | {gained} | {said} |")
        lines += _time_table(reference, rows, machines)
        lines.append("")
    return "\n".join(lines)


def _time_table(
    reference: str,
    rows: list[_Row],
    machines: dict[str, _Machine],
) -> list[str]:
    """Where a training step's time goes, per machine: the accelerated layers as they
    computed, the same layers' dense products (both as the check in the run timed them), and
    the rest."""
    timed = [r for r in rows if all(x.steps for x in r.runs.values())]
    if not any(x.layers for r in timed for x in r.runs.values()):
        return []
    lines = [
        "",
        "Where a training step's time goes (ms, mean over the runs on each machine), beside "
        f"dense {reference}'s whole step on the same machine. The sparsified layers' times are "
        "the medians each layer's check in the run timed over its first steps (its forward "
        "and backward, sparse and as the dense product of the same weights; "
        "`acceleration.txt`); the rest is everything else in the step: layers left dense, "
        "attention, norms and embeddings where the model has them, the optimizer, mask updates "
        "and the dense-gradient steps.",
        "",
        f"| model | method | same | machine | dense {reference} step | step | sparsified layers "
        "| the same layers dense | their speedup | the rest |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in timed:
        for machine, runs in _by_machine(row).items():
            dense_ms = _dense_ms(machines, machine)
            head = (
                f"| {row.model} | {row.method} | {_VIEWS[row.view]} | "
                f"{_letter(machines, machine)} | {'–' if dense_ms is None else _ms(dense_ms)} | "
                f"{_ms(_mean([r.step_ms for r in runs]))} |"
            )
            if not all(r.layers for r in runs):
                lines.append(f"{head} – | – | none ran sparse (dense timed faster) | – |")
                continue
            used = _mean([r.layers[0] for r in runs if r.layers])
            dense = _mean([r.layers[1] for r in runs if r.layers])
            whole = _mean([r.step_ms for r in runs])
            lines.append(
                f"{head} {_ms(used)} | {_ms(dense)} | {dense / used:.2f}x | {_ms(whole - used)} |"
            )
    return lines


def _ms(x: float) -> str:
    return f"{x:.1f}" if abs(x) < 100 else f"{x:.0f}"


def _ms_text(cell: Cell) -> str:
    """Milliseconds, mean ± standard error (number), in :func:`_ms`'s digits."""
    if cell.n == 1:
        return f"{_ms(cell.mean)} (n=1)"
    return f"{_ms(cell.mean)} ± {_ms(cell.se)} ({cell.n})"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _flops_text(x: float) -> str:
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= size:
            return f"{x / size:.1f} {unit}"
    return f"{x:.0f}"


def plot(paths: Sequence[str | os.PathLike[str]], reference: str, folder: Path) -> list[Path]:
    """Quality against training time, one PNG per dataset, the time in units of the dense
    reference's run of its recipe on the same machine: the dense runs (its recipe and longer)
    as a line, each same-cost row as a point per machine timed, mean ± standard error on both
    axes."""
    from .plots import _pyplot, save_figure

    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    written = []
    for data, found in sorted(_read(paths, reference).items()):
        metric = found["metric"]
        title, scale, _, _ = METRICS[metric]
        fig, ax = plt.subplots(figsize=(6.8, 4.4))
        factors = sorted(found["ladder"])
        base = _mean([r.steps for r in found["ladder"][1.0].values()])
        values = [
            Cell(tuple(r.value for r in found["ladder"][f].values()), metric) for f in factors
        ]
        ax.errorbar(
            [_mean([r.steps for r in found["ladder"][f].values()]) / base for f in factors],
            [scale * v.mean for v in values],
            yerr=[scale * v.se for v in values],
            color="k",
            marker="s",
            ms=4,
            capsize=2,
            label=f"dense {reference} (" + ", ".join(f"{f:g}x" for f in factors) + " steps)",
        )
        machines = _machines(found)
        markers = {"same-nnz": "o", "same-flops": "^"}
        for row in sorted(found["rows"].values(), key=lambda r: (r.model, r.method, r.view)):
            value = row.cell(metric)
            for machine, runs in _by_machine(row).items():
                dense_ms = _dense_ms(machines, machine)
                if dense_ms is None:
                    continue
                times = Cell(
                    tuple(r.step_ms * r.steps / dense_ms / base for r in runs), "wall_time"
                )
                ax.errorbar(
                    [times.mean],
                    [scale * value.mean],
                    xerr=[times.se],
                    yerr=[scale * value.se],
                    marker=markers[row.view],
                    ms=5,
                    capsize=2,
                    ls="none",
                    label=f"{row.model} {row.method}, same {_VIEWS[row.view]} "
                    f"(machine {_letter(machines, machine)})",
                )
        ax.set_xscale("log")
        ratio = FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(ratio)
        ax.xaxis.set_minor_formatter(ratio)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel(f"training time (x dense {reference}'s 1x run on the same machine)")
        ax.set_ylabel(title[0].lower() + title[1:])
        ax.set_title(f"same cost as dense {reference} on {data}")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        path = folder / f"{data}-{reference}-same-cost.png"
        save_figure(fig, path)
        written.append(path)
    return written
