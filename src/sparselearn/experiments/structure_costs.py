"""What a mask structure costs: each structured row of a report against its unstructured twin.

A study names a structured variant ``<method>-<structure>`` (``rigl-fan_in``,
``sparse_momentum-2_4``) beside the row of the same method without it (``rigl``); every
density both hold gives one comparison. The cost is how much worse the structured mean is
(accuracy: points lost; perplexity: how much higher, also as a share), with the standard
error of the difference, sqrt(se_a² + se_b²). The verdict follows the two-standard-error rule
of the paper-budget claims (:mod:`.claims`): **no cost within error** where the difference is
at most two standard errors either way, **costs** or **gains** beyond it.
"""

from __future__ import annotations

import math
import re

from .cells import METRICS, Cell, Key, is_dense


def structure_of(tag: str) -> str | None:
    """The structure a row's suffix names (``fan_in``; ``2_4`` -> ``2:4``), else None."""
    if tag == "fan_in":
        return tag
    found = re.fullmatch(r"(\d+)_(\d+)", tag)
    return f"{found.group(1)}:{found.group(2)}" if found else None


def pairs(rows: dict[str, dict[float, Cell]]) -> list[tuple[str, str, str, float]]:
    """(method, structure, structured row, density) for every structured row whose
    unstructured twin holds the same density."""
    out = []
    for row, by_d in sorted(rows.items()):
        base, _, tag = row.rpartition("-")
        structure = structure_of(tag)
        if not base or structure is None or base not in rows or is_dense(base):
            continue
        for d in sorted(by_d):
            if d in rows[base]:
                out.append((base, structure, row, d))
    return out


def table(results: dict[Key, dict[str, dict[float, Cell]]]) -> str:
    """The costs as markdown, one table per (dataset, model); empty where no row pairs up."""
    lines = []
    for (data, model), rows in sorted(results.items()):
        found = pairs(rows)
        if not found:
            continue
        metric = next(iter(next(iter(rows.values())).values())).metric
        _, scale, digits, higher = METRICS[metric]
        unit = "points" if metric == "test_acc" else ""
        lines += [
            f"### What structure costs: {model} on {data}",
            "",
            "| method | structure | density | unstructured | structured | cost (± its standard "
            "error) | verdict |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for base, structure, row, d in found:
            a, b = rows[base][d], rows[row][d]
            cost = (a.mean - b.mean) if higher else (b.mean - a.mean)
            error = math.hypot(a.se, b.se)
            if min(a.n, b.n) < 2:
                verdict = "no verdict (one seed)"
            elif abs(cost) <= 2 * error:
                verdict = "no cost within error"
            else:
                verdict = "costs" if cost > 0 else "gains"
            shown = f"{scale * cost:+.{digits}f} ± {scale * error:.{digits}f}"
            if unit:
                shown += f" {unit}"
            else:
                shown += f" ({100 * cost / a.mean:+.1f}%)"
            lines.append(
                f"| {base} | {structure} | {100 * d:g}% | {a.text()} | {b.text()} | {shown} "
                f"| **{verdict}** |"
            )
        lines.append("")
    return "\n".join(lines)
