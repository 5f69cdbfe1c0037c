"""Reports: ``<out>/<experiment>.md`` (tables), ``.json`` (every per-seed number) and PNG learning curves.

Files are written atomically (temporary file, then ``os.replace``).
"""

from __future__ import annotations

import json
import math
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from recsys_flowadam.safe_write import atomic_write, json_safe


def versions() -> dict[str, str]:
    """Library versions recorded with every report."""
    import numpy
    import scipy
    import torch

    import recsys_flowadam

    out = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "numpy": numpy.__version__, "scipy": scipy.__version__, "recsys_flowadam": recsys_flowadam.__version__}
    try:
        import pytorch_optimizer

        out["pytorch_optimizer"] = getattr(pytorch_optimizer, "__version__", "unknown")
    except ImportError:  # pragma: no cover
        pass
    return out


QUICK_NOTE = ("A --quick run is a smoke test, not the comparison: one seed and short runs on the smallest "
              "scenario can reverse the paper's ranking; its lr grids are not extended past their edges and its "
              "compute-matched rows reuse the baseline's lr. Run without --quick for the figures that count.")


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def mean_std(mean: float | None, std: float | None, n: int | None, digits: int = 4) -> str:
    """``mean ± std`` over ``n`` seeds; one seed has no spread, so it reads ``mean (n = 1)``
    (``n`` None: not recorded, shown as ``mean ± std``)."""
    if n is not None and n <= 1:
        return f"{_fmt(mean, digits)} (n = 1)"
    return f"{_fmt(mean, digits)} ± {_fmt(std, digits)}"


def _fmt_lr(summary: dict[str, Any]) -> str:
    lr = summary.get("lr")
    text = "" if lr is None else f"{lr:g}"
    wd = (summary.get("kwargs") or {}).get("weight_decay")
    if wd:
        text += f", wd {wd:g}"
    return text


def choice_mark(choice: dict[str, Any] | None) -> str:
    """The lr column's mark: ``(edge)`` for a choice still at an edge or bound, ``(tie)`` when validation
    could not separate it from the runner-up ("" when neither)."""
    if not choice:
        return ""
    marks = [m for m, on in (("edge", choice.get("at_edge")), ("tie", choice.get("indistinguishable"))) if on]
    return f" ({', '.join(marks)})" if marks else ""


def flag_lines(label: str, choice: dict[str, Any] | None) -> list[str]:
    """Why a row carries an ``(edge)`` or ``(tie)`` mark, one sentence each (none when it carries neither)."""
    if not choice:
        return []
    out = []
    for e in choice.get("edges", []):
        if e["param"] == "lr":
            out.append(f"(edge) {label}: lr {choice['lr']:g} is the {'lowest' if e['side'] == 'low' else 'highest'} "
                       f"lr tried ({choice['tuning_runs']} tuning runs, {choice['extension_runs']} past the grid); "
                       f"not extended further: {e['reason']}.")
        else:
            value = ", ".join(f"{k} {choice['kwargs'].get(k)}" for k in e["param"].split(", "))
            out.append(f"(edge) {label}: {value} is at the {e['side']} edge of its grid; {e['reason']}.")
    ru = choice.get("runner_up")
    if choice.get("indistinguishable") and ru:
        out.append(f"(tie) {label}: validation cannot separate lr {choice['lr']:g}{_wd(choice['kwargs'])} "
                   f"({_fmt(choice.get('val'))}) from {ru['lr']:g}{_wd(ru['kwargs'])} ({_fmt(ru.get('val'))}; "
                   f"relative gap {ru['rel_gap']:.1g} <= {choice.get('tie_rtol', 1e-3):g}): the lr is not a tuned "
                   "result.")
    return out


def scenario_table(sc: dict[str, Any]) -> list[str]:
    """Markdown table of one scenario's rows."""
    has_paper = any(row.get("paper") for row in sc["rows"].values())
    extra = sorted({k[5:] for row in sc["rows"].values() for k in row["summary"] if k.startswith("mean_")})
    head = ["Optimizer", "lr", f"{sc['metric']} (mean ± std)"] + [f"{k} (mean)" for k in extra]
    head += (["paper"] if has_paper else []) + ["Wilcoxon vs Adam", "grad evals / run", "steps / run", "wall s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in sc["rows"].items():
        s = row["summary"]
        cells = [label, _fmt_lr(s) + choice_mark(row.get("choice")), mean_std(s["mean"], s["std"], s.get("n"))]
        cells += [_fmt(s.get(f"mean_{k}")) for k in extra]
        if has_paper:
            cells.append(row.get("paper") or "")
        div = f" ({s['n_diverged']} diverged)" if s["n_diverged"] else ""
        cells += [s["wilcoxon"] + div, f"{s['grad_evals']:.0f}", f"{s['steps']:.0f}", f"{s['seconds']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    flags = [f"- {t}" for label, row in sc["rows"].items() for t in flag_lines(label, row.get("choice"))]
    return lines + ([""] + flags if flags else [])


def tuning_lines(sc: dict[str, Any]) -> list[str]:
    """Every point each tuned row tried on the first seed (by options, then lr), the chosen one in bold."""
    out = []
    for label, row in sc["rows"].items():
        if len(row["tuning"]) > 1:
            options: list[dict[str, Any]] = []
            for t in row["tuning"]:
                if t["kwargs"] not in options:
                    options.append(t["kwargs"])
            chosen = row.get("choice") or {}
            pts = []
            for t in sorted(row["tuning"], key=lambda t: (options.index(t["kwargs"]), t["lr"])):
                text = f"{t['lr']:g}{_wd(t['kwargs'])}: {_fmt(t['val'])}" + (" (ext)" if t.get("extension") else "")
                is_best = t["lr"] == chosen.get("lr") and t["kwargs"] == chosen.get("kwargs")
                pts.append(f"**{text}**" if is_best else text)
            n_ext = sum(bool(t.get("extension")) for t in row["tuning"])
            out.append(f"- {label} validation RMSE by lr (first seed; {len(row['tuning'])} runs, {n_ext} past the "
                       f"grid): {', '.join(pts)}")
    return out


def _wd(kw: dict[str, Any]) -> str:
    return f"/wd {kw['weight_decay']:g}" if kw.get("weight_decay") else ""


def protocol_flags(proto: dict[str, Any]) -> list[str]:
    """The protocol's tuning summary: every choice at an edge or indistinguishable, by scenario (empty: no tuning)."""
    tuned = [(sc, label, row.get("choice") or {}) for sc in proto["scenarios"] for label, row in sc["rows"].items()]
    tuned = [t for t in tuned if t[2].get("how") == "tuned"]
    if not tuned:
        return []
    named = []
    for sc, label, ch in tuned:
        what = [w for w, on in (("at an edge", ch.get("at_edge")), ("indistinguishable", ch.get("indistinguishable")))
                if on]
        if what:
            named.append(f"{sc['key']}: {label} (lr {ch['lr']:g}{_wd(ch['kwargs'])}, {' and '.join(what)})")
    if not named:
        return [f"Tuning: all {len(tuned)} tuned choices are interior to the lrs tried and validation separates "
                "each from its runner-up.", ""]
    return [f"Tuning: {len(named)} of {len(tuned)} tuned choices are not settled by the tuning (marked `(edge)` / "
            "`(tie)` in the lr column, explained under each table): " + "; ".join(named) + ".", ""]


def markdown(result: dict[str, Any]) -> str:
    """The whole report of one experiment (all protocols run)."""
    lines = [f"# {result['experiment']}", "", f"Command: `{result['command']}`  ", f"Created: {result['created']}  ",
             f"Seeds: {result['seeds']}; device {result['device']}  "]
    if result.get("wall_seconds") is not None:
        lines.append(f"Wall time of the whole experiment: {result['wall_seconds'] / 60:.1f} min (every protocol, "
                     "tuning and learning-curve evaluations included)  ")
    if result.get("quick"):
        lines.append(f"**{QUICK_NOTE}**  ")
    lines.append("")
    if result.get("notes"):
        lines += [f"- {n}" for n in result["notes"]] + [""]
    for proto in result["protocols"]:
        p = proto["protocol"]
        lines += [f"## Protocol `{p['name']}`", "", p["summary"], ""]
        for k, v in p.items():
            if k not in ("name", "summary", "contenders"):
                lines.append(f"- {k.replace('_', ' ')}: {v}")
        lines.append("")
        lines += protocol_flags(proto)
        for sc in proto["scenarios"]:
            lines += [f"### {sc['label']}", ""] + scenario_table(sc) + [""]
            tl = tuning_lines(sc)
            if tl:
                lines += tl + [""]
            for plot in sc.get("plots", []):
                lines.append(f"![{sc['label']}]({plot})")
            lines.append("")
    if result.get("spirals"):
        sp = result["spirals"]
        lines += ["## Two-spirals classifier", "", f"{sp['task']}; {sp['steps']} steps, lr {sp['lr']:g}.", "",
                  "| Optimizer | test accuracy (mean ± std) | paper | grad evals / run | wall s / run |",
                  "|---|---|---|---|---|"]
        for label, row in sp["rows"].items():
            lines.append(f"| {label} | {mean_std(row['mean'], row['std'], len(row['runs']), 3)} | {row['paper']} | "
                         f"{row['grad_evals']:.0f} | {row['seconds']:.2f} |")
        lines.append("")
    lines += ["Std is the sample standard deviation over seeds (ddof=1). Wilcoxon: two-sided signed-rank test "
              "(scipy.stats.wilcoxon) of the row's per-seed test error against Adam's on the same seeds. "
              "Wall time counts optimizer steps only, on this machine.", ""]
    return "\n".join(lines)


PLOTS_MISSING = ("no learning-curve plots: matplotlib is not installed (pip install 'recsys-flowadam[plots]'); "
                 "the tables and the JSON are complete")


def plots_available() -> bool:
    """Whether matplotlib (the optional ``plots`` extra) can be imported."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def plot_scenario(sc: dict[str, Any], path: Path) -> bool:
    """Test error against gradient evaluations and against wall-clock time (first seed), like the paper's Fig. 3.
    False (nothing written) when there is no curve, or no matplotlib (the ``plots`` extra)."""
    if not plots_available():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {label: row["runs"][0].get("curve") for label, row in sc["rows"].items() if row["runs"]}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, curve in curves.items():
        ys = [c["test"] for c in curve]
        axes[0].plot([c["grad_evals"] for c in curve], ys, label=label)
        axes[1].plot([c["seconds"] for c in curve], ys, label=label)
    for ax, xl in zip(axes, ("gradient evaluations", "wall-clock seconds (optimizer steps)")):
        ax.set_xlabel(xl)
        ax.set_ylabel(sc["metric"])
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(sc["label"], fontsize=10)
    fig.tight_layout()
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=90))
    finally:
        plt.close(fig)
    return True


def write_report(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write the PNGs, ``<experiment>.json`` and ``<experiment>.md`` under ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = result["experiment"]
    written: dict[str, Path] = {}
    if not plots_available() and PLOTS_MISSING not in result.setdefault("notes", []):
        result["notes"].append(PLOTS_MISSING)
    for proto in result["protocols"]:
        for sc in proto["scenarios"]:
            png = out / f"{name}-{proto['protocol']['name']}-{sc['key']}.png"
            if plot_scenario(sc, png):
                sc["plots"] = [png.name]
                written[png.name] = png
    result.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    js = out / f"{name}.json"
    atomic_write(js, lambda fh: fh.write(json.dumps(json_safe(result), indent=1, allow_nan=False).encode()))
    md = out / f"{name}.md"
    atomic_write(md, lambda fh: fh.write(markdown(result).encode()))
    written["json"], written["md"] = js, md
    return written
