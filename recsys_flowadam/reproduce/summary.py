"""Compact summary tables from report JSON files (what the README's "Does FlowAdam help?" shows).

``python -m recsys_flowadam.reproduce.summary reports/matrix-completion.json ...`` prints one
markdown table per experiment and protocol: each scenario's mean ± std per optimizer, the
paper's figure where there is one, the Wilcoxon p-value against Adam and the gradient evaluations;
a tuned lr still at an edge of the lrs tried is marked ``(edge)``, one that validation could not
separate from its runner-up ``(tie)``, each explained in a line under the table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from recsys_flowadam.reproduce.report import choice_mark, flag_lines, mean_std


def _cell(row: dict[str, Any]) -> str:
    s = row["summary"]
    if s.get("mean") is None:
        return "n/a"
    text = mean_std(s["mean"], s["std"], s.get("n"), 3)
    if s.get("wilcoxon_p") is not None:
        text += f" (p={s['wilcoxon_p']:.2g})"
    return text


def _join(values: list[str]) -> str:
    """One value when every scenario has it, else the per-scenario values."""
    return values[0] if len(set(values)) == 1 else " / ".join(values)


def tables(result: dict[str, Any]) -> str:
    """Markdown: one table per protocol, optimizers as rows, scenarios as columns."""
    out = []
    for proto in result["protocols"]:
        scen = proto["scenarios"]
        labels: list[str] = []
        for sc in scen:
            labels += [k for k in sc["rows"] if k not in labels]
        head = ["Optimizer"] + [f"{sc['key']}: {sc['metric']}" for sc in scen] + ["grad evals / run", "lr"]
        lines = [f"**{result['experiment']}, protocol `{proto['protocol']['name']}`** "
                 f"(seeds {result['seeds']}, {proto['protocol'].get('steps')} steps)", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label in labels:
            cells = [label]
            evals, lrs = [], []
            for sc in scen:
                row = sc["rows"].get(label)
                if row is None:
                    cells.append("")
                    continue
                text = _cell(row)
                if row.get("paper"):
                    text += f" [paper {row['paper']}]"
                cells.append(text)
                evals.append(f"{row['summary']['grad_evals']:.0f}")
                lr = row["summary"].get("lr")
                wd = (row["summary"].get("kwargs") or {}).get("weight_decay")
                lrs.append(("" if lr is None else f"{lr:g}") + (f"/wd {wd:g}" if wd else "")
                           + choice_mark(row.get("choice")))
            cells += [_join(evals), _join(lrs)]
            lines.append("| " + " | ".join(cells) + " |")
        flags = [f"- {sc['key']}: {t}" for sc in scen for label, row in sc["rows"].items()
                 for t in flag_lines(label, row.get("choice"))]
        out.append("\n".join(lines + ([""] + flags if flags else [])))
    if result.get("spirals"):
        sp = result["spirals"]
        lines = [f"**two spirals** (seeds {result['seeds']}, {sp['steps']} steps)", "",
                 "| Optimizer | test accuracy | paper |", "|---|---|---|"]
        for label, row in sp["rows"].items():
            lines.append(f"| {label} | {mean_std(row['mean'], row['std'], len(row['runs']), 3)} | {row['paper']} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    paths = (argv if argv is not None else sys.argv[1:])
    if not paths:
        print("usage: python -m recsys_flowadam.reproduce.summary REPORT.json ...", file=sys.stderr)
        return 2
    for p in paths:
        result = json.loads(Path(p).read_text())
        wall = result.get("wall_seconds")
        took = f" ({wall / 60:.1f} min)" if wall is not None else ""
        print(f"Command: `{result['command']}`{took}\n")
        print(tables(result) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
