"""Run a set of contenders over scenarios and seeds: tuning, compute matching, statistics.

For each scenario and seed the task is built once and every contender trains on it from the
same seeded initialisation. Tuned contenders (a grid of more than one point) try every grid
point on the *first* seed and keep the one with the lowest validation error; that run is the
first seed's result and the choice is fixed for the remaining seeds. Compute-matched
contenders run after the contender they match, with its gradient-evaluation count on that
seed as their budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from recsys_flowadam.reproduce.protocols import Contender
from recsys_flowadam.reproduce.runner import RunSpec, run_one
from recsys_flowadam.reproduce.tasks import Task

BASELINE = "Adam"  # the row every other row is tested against


@dataclass
class Scenario:
    """One problem setting.

    ``build(seed, with_val)`` makes its task; ``paper`` maps row labels to the paper's figures.
    """

    key: str
    label: str
    build: Callable[[int, bool], Task]
    paper: dict[str, str] = field(default_factory=dict)
    metric: str = "test RMSE"


def _record(run: RunSpec, seed: int, res, keep_curve: bool) -> dict[str, Any]:
    out = {"seed": seed, "lr": run.lr, "kwargs": run.kwargs, **res.to_dict()}
    if keep_curve:
        out["curve"] = res.curve
    return out


def compare(scenarios: list[Scenario], contenders: list[Contender], seeds: list[int], *, steps: int,
            with_val: bool, eval_every: int = 25, progress: bool = True, position: int | None = None,
            desc: str = "") -> list[dict[str, Any]]:
    """Every contender on every scenario and seed; returns one dict per scenario (rows, tuning, summary).

    ``position``: the progress bar's terminal row (several experiments running at once).
    """
    from tqdm.auto import tqdm

    labels = [c.label for c in contenders]
    for c in contenders:
        for ref in (c.match, c.lr_from):
            if ref is not None and (ref not in labels or labels.index(ref) > labels.index(c.label)):
                raise ValueError(f"contender {c.label!r} refers to {ref!r}, which must come before it")
    n_first = sum(max(1, len(c.grid)) for c in contenders)
    total = len(scenarios) * (n_first + (len(seeds) - 1) * len(contenders))
    bar = tqdm(total=total, desc=desc or "reproduce", unit="run", disable=not progress, position=position,
               leave=position is None)
    out = []
    try:
        for sc in scenarios:
            rows: dict[str, dict[str, Any]] = {c.label: {"contender": c.describe(), "runs": [], "tuning": []}
                                               for c in contenders}
            chosen: dict[str, tuple[float, dict[str, Any]]] = {}
            info: dict[str, Any] = {}
            for si, seed in enumerate(seeds):
                task = sc.build(seed, with_val)
                info = task.info
                for c in contenders:
                    bar.set_postfix_str(f"{sc.key} seed {seed} {c.label}")
                    run = _run_contender(task, c, seed, si == 0, rows, chosen, steps, eval_every, bar.update)
                    rows[c.label]["runs"].append(run)
            for label, row in rows.items():
                base = rows.get(BASELINE, {}).get("runs") if label != BASELINE else None
                row["summary"] = summarise(row["runs"], base)
                row["paper"] = sc.paper.get(label)
            out.append({"key": sc.key, "label": sc.label, "metric": sc.metric, "info": info, "rows": rows})
    finally:
        bar.close()
    return out


def _run_contender(task: Task, c: Contender, seed: int, first: bool, rows: dict[str, dict[str, Any]],
                   chosen: dict[str, tuple[float, dict[str, Any]]], steps: int, eval_every: int,
                   tick: Callable[[int], Any]) -> dict[str, Any]:
    """One contender on one seed: tune on the first seed, reuse the choice after; compute-match when asked."""
    if c.match is not None or c.lr_from is not None:
        lr, kw = chosen[c.lr_from or c.label]
        budget = rows[c.match]["runs"][-1]["grad_evals"] if c.match else c.max_grad_evals
        spec = RunSpec(c.optimizer, lr, c.reg, {**c.kwargs, **kw}, steps=None if c.match else steps,
                       max_grad_evals=budget)
        tick(1)
        return _record(spec, seed, run_one(task, spec, seed, eval_every=eval_every), first)
    if len(c.grid) > 1 and first:
        if task.score_val is None:
            raise ValueError(f"{task.scenario}: tuning {c.label} needs a validation split")
        best = None
        for lr, kw in c.grid:
            spec = _spec(c, lr, kw, steps)
            res = run_one(task, spec, seed, eval_every=eval_every)
            rows[c.label]["tuning"].append({"lr": lr, "kwargs": kw, "val": res.scores.get("val"),
                                            "test": res.scores.get("test"), "grad_evals": res.grad_evals,
                                            "seconds": round(res.seconds, 4)})
            tick(1)
            if best is None or res.scores["val"] < best[1].scores["val"]:
                best = (spec, res, kw)
        assert best is not None
        chosen[c.label] = (best[0].lr, best[2])
        return _record(best[0], seed, best[1], first)
    lr, kw = chosen.get(c.label, c.grid[0])
    chosen[c.label] = (lr, kw)
    spec = _spec(c, lr, kw, steps)
    tick(1)
    return _record(spec, seed, run_one(task, spec, seed, eval_every=eval_every), first)


def _spec(c: Contender, lr: float, kw: dict[str, Any], steps: int) -> RunSpec:
    return RunSpec(c.optimizer, lr, c.reg, {**c.kwargs, **kw}, steps=None if c.max_grad_evals else steps,
                   max_grad_evals=c.max_grad_evals)


def wilcoxon_vs(values: list[float], baseline: list[float]) -> tuple[float | None, str]:
    """Two-sided Wilcoxon signed-rank p-value of paired ``values`` vs ``baseline`` (scipy), or None and why not."""
    from scipy.stats import wilcoxon

    x, y = np.asarray(values, float), np.asarray(baseline, float)
    if len(x) != len(y):
        return None, "n/a: unpaired"
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 2:
        return None, f"n/a (n={n} seed; needs >= 2)"
    d = x[ok] - y[ok]
    if np.all(d == 0):
        return None, "n/a (identical results on every seed)"
    p = float(wilcoxon(x[ok], y[ok]).pvalue)
    note = f"p={p:.3g}"
    if n < 6:
        note += f" (n={n}: p >= {2 / 2 ** n:.3g} always)"
    return p, note


def summarise(runs: list[dict[str, Any]], baseline_runs: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Mean, sample std (ddof=1; 0 for one seed), cost, and the Wilcoxon test against the baseline row."""
    tests = [r["scores"]["test"] for r in runs]
    arr = np.asarray(tests, float)
    finite = arr[np.isfinite(arr)]
    out: dict[str, Any] = {
        "n": len(tests), "n_diverged": int(sum(r["diverged"] for r in runs)),
        "mean": float(finite.mean()) if finite.size else math.nan,
        "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
        "grad_evals": float(np.mean([r["grad_evals"] for r in runs])),
        "steps": float(np.mean([r["steps"] for r in runs])),
        "seconds": float(np.mean([r["seconds"] for r in runs])),
        "lr": runs[0]["lr"] if runs else None, "kwargs": runs[0]["kwargs"] if runs else {},
    }
    extra_keys = sorted({k for r in runs for k in r["scores"] if k not in ("test", "val")})
    for k in extra_keys:
        vals = np.asarray([r["scores"].get(k, math.nan) for r in runs], float)
        out[f"mean_{k}"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan
    if baseline_runs is None:
        out["wilcoxon_p"], out["wilcoxon"] = None, "baseline"
    else:
        by_seed = {r["seed"]: r["scores"]["test"] for r in baseline_runs}
        pairs = [(r["scores"]["test"], by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed]
        out["wilcoxon_p"], out["wilcoxon"] = wilcoxon_vs([a for a, _ in pairs], [b for _, b in pairs])
    return out
