"""The paper's claims about its MNIST networks, each checked against finished runs: the claim,
the numbers (mean ± standard error, seeds) and a verdict computed from them.

Dettmers & Zettlemoyer (2019) claim that at 5-20% density sparse momentum reaches dense
accuracy (at 20% it matches or exceeds it), and that it ranks above SET, DSR and static sparse
networks. Each claim is "A is at least B": it **holds** when A's mean is at least B's, **holds
within error** when A's mean is below B's by no more than two standard errors of the difference
(sqrt(se_A² + se_B²); with three seeds a rough test, not a significance level), and **fails**
otherwise. A side with a single seed has no standard error to judge the difference by: such a
claim gets its numbers and no verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .cells import METRICS, Cell, Key, is_dense

SM = "sparse_momentum"
REACHES_DENSE = (0.05, 0.1)  # "reaches dense accuracy"
MATCHES_DENSE = (0.2,)  # "matches or exceeds dense accuracy"
RIVALS = ("set", "dsr", "static")  # "ranks above"


@dataclass(frozen=True)
class Verdict:
    claim: str
    a: Cell
    b: Cell
    a_name: str
    b_name: str

    @property
    def difference(self) -> float:
        return self.a.mean - self.b.mean

    @property
    def error(self) -> float:
        """The standard error of the difference of the two means."""
        return math.hypot(self.a.se, self.b.se)

    @property
    def verdict(self) -> str:
        if min(self.a.n, self.b.n) < 2:
            return "no verdict (one seed)"
        if self.difference >= 0:
            return "holds"
        if -self.difference <= 2 * self.error:
            return "holds within error"
        return "fails"


def check(results: dict[Key, dict[str, dict[float, Cell]]]) -> dict[Key, list[Verdict]]:
    """The verdict on every claim the runs can speak to, per (dataset, model)."""
    out: dict[Key, list[Verdict]] = {}
    for key, rows in sorted(results.items()):
        metric = next(iter(next(iter(rows.values())).values())).metric
        if not METRICS[metric][3]:
            continue  # the claims are about accuracy (higher is better)
        sm, found = rows.get(SM, {}), []
        dense = next((by_d[1.0] for m, by_d in rows.items() if is_dense(m)), None)
        for d in sorted(sm):
            pct = f"{100 * d:g}%"
            if dense is not None and d in REACHES_DENSE + MATCHES_DENSE:
                said = "matches or exceeds" if d in MATCHES_DENSE else "reaches"
                found.append(
                    Verdict(
                        f"at {pct}, sparse momentum {said} dense accuracy",
                        sm[d],
                        dense,
                        f"sparse momentum {pct}",
                        "dense",
                    )
                )
            for rival in RIVALS:
                cell = rows.get(rival, {}).get(d)
                if cell is not None:
                    found.append(
                        Verdict(
                            f"at {pct}, sparse momentum ranks above {rival}",
                            sm[d],
                            cell,
                            f"sparse momentum {pct}",
                            f"{rival} {pct}",
                        )
                    )
        if found:
            out[key] = found
    return out


def table(results: dict[Key, dict[str, dict[float, Cell]]]) -> str:
    """The verdicts as markdown, one table per (dataset, model); empty if no claim applies."""
    lines = []
    for (data, model), verdicts in check(results).items():
        metric = verdicts[0].a.metric
        _, scale, digits, _ = METRICS[metric]
        lines += [
            f"### The paper's claims: {model} on {data}",
            "",
            "| claim | sparse momentum | compared with | difference (± its standard error) "
            "| verdict |",
            "|---|---:|---:|---:|---|",
        ]
        for v in verdicts:
            diff = f"{scale * v.difference:+.{digits}f} ± {scale * v.error:.{digits}f}"
            lines.append(
                f"| {v.claim} | {v.a.text()} | {v.b_name}: {v.b.text()} | {diff} | "
                f"**{v.verdict}** |"
            )
        lines.append("")
    return "\n".join(lines)
