"""Run a set of contenders over scenarios and seeds: tuning, compute matching, statistics.

For each scenario and seed the task is built once and every contender trains on it from the
same seeded initialisation. Tuned contenders (a grid of more than one point) try every grid
point on the *first* seed, extend the grid past an edge as the ``TuningPolicy`` allows (see
``tuning``) and keep the point with the lowest validation error; that run is the first seed's
result and the choice is fixed for the remaining seeds. Compute-matched contenders run after
the contender they match, with its gradient-evaluation count on that seed as their budget; with
``retune`` their lr is tuned on the first seed for that budget (the matched baseline's choice and
its neighbours, extended like any grid), else it is reused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from recsys_flowadam.reproduce.protocols import Contender
from recsys_flowadam.reproduce.runner import RunSpec, run_one
from recsys_flowadam.reproduce.tasks import Task
from recsys_flowadam.reproduce.tuning import NO_EXTENSION, Point, TuningPolicy, local_grid, tune, untuned_choice

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
            desc: str = "", policy: TuningPolicy = NO_EXTENSION) -> list[dict[str, Any]]:
    """Every contender on every scenario and seed; returns one dict per scenario (rows, tuning, summary).

    ``policy``: how tuning may extend a grid past its edges (default: not at all; the choice is
    flagged). ``position``: the progress bar's terminal row (several experiments running at once).
    """
    from tqdm.auto import tqdm

    labels = [c.label for c in contenders]
    for c in contenders:
        for ref in (c.match, c.lr_from):
            if ref is not None and (ref not in labels or labels.index(ref) > labels.index(c.label)):
                raise ValueError(f"contender {c.label!r} refers to {ref!r}, which must come before it")
    n_first = sum(3 if c.retune else max(1, len(c.grid)) for c in contenders)
    total = len(scenarios) * (n_first + (len(seeds) - 1) * len(contenders))
    bar = tqdm(total=total, desc=desc or "reproduce", unit="run", disable=not progress, position=position,
               leave=position is None)
    out = []
    try:
        for sc in scenarios:
            rows: dict[str, dict[str, Any]] = {c.label: {"contender": c.describe(), "runs": [], "tuning": []}
                                               for c in contenders}
            chosen: dict[str, Point] = {}
            info: dict[str, Any] = {}
            for si, seed in enumerate(seeds):
                task = sc.build(seed, with_val)
                info = task.info
                for c in contenders:
                    bar.set_postfix_str(f"{sc.key} seed {seed} {c.label}")
                    ctx = _Context(task, seed, si == 0, rows, chosen, steps, eval_every, bar, policy)
                    rows[c.label]["runs"].append(_run_contender(ctx, c))
            for label, row in rows.items():
                base = rows.get(BASELINE, {}).get("runs") if label != BASELINE else None
                row["summary"] = summarise(row["runs"], base)
                row["paper"] = sc.paper.get(label)
            out.append({"key": sc.key, "label": sc.label, "metric": sc.metric, "info": info, "rows": rows})
    finally:
        bar.close()
    return out


@dataclass
class _Context:
    """What one contender's run on one seed needs from ``compare``."""

    task: Task
    seed: int
    first: bool
    rows: dict[str, dict[str, Any]]
    chosen: dict[str, Point]  # label -> (lr, options) fixed on the first seed
    steps: int
    eval_every: int
    bar: Any
    policy: TuningPolicy

    def spec(self, c: Contender, lr: float, kw: dict[str, Any]) -> RunSpec:
        """The run of ``c`` at (lr, kw): its step budget, or the matched contender's evaluations on this seed."""
        opts = {**c.kwargs, **kw}
        if c.match is not None:
            budget = self.rows[c.match]["runs"][-1]["grad_evals"]
            return RunSpec(c.optimizer, lr, c.reg, opts, steps=None, max_grad_evals=budget)
        return RunSpec(c.optimizer, lr, c.reg, opts, steps=None if c.max_grad_evals else self.steps,
                       max_grad_evals=c.max_grad_evals)

    def tick(self, extension: bool = False) -> None:
        if extension and not self.bar.disable:  # a run the estimated total did not count
            self.bar.total += 1
        self.bar.update(1)


def _run_contender(ctx: _Context, c: Contender) -> dict[str, Any]:
    """One contender on one seed: tune on the first seed (or take its fixed/reused lr), reuse the choice after."""
    row = ctx.rows[c.label]
    if ctx.first:
        points, kw_grid, how = _first_seed_points(c, ctx)
        if len(points) > 1:
            return _tune_first_seed(ctx, c, points, kw_grid)
        ctx.chosen[c.label] = points[0]
        row["choice"] = untuned_choice(points[0][0], points[0][1], how)
    lr, kw = ctx.chosen[c.label]
    spec = ctx.spec(c, lr, kw)
    ctx.tick()
    return _record(spec, ctx.seed, run_one(ctx.task, spec, ctx.seed, eval_every=ctx.eval_every), ctx.first)


def _first_seed_points(c: Contender, ctx: _Context) -> tuple[list[Point], tuple[dict[str, Any], ...], str]:
    """The points ``c`` tries on the first seed, its options grid, and how a single point was chosen.

    A contender with ``lr_from`` starts from that contender's choice: reused as it is, or (``retune``)
    re-tuned for its own budget over the choice and its neighbours among the lrs the other tried.
    """
    if c.lr_from is None:
        if not c.grid:
            raise ValueError(f"contender {c.label!r} has no lr grid and no lr_from")
        return c.grid, c.kw_grid, "fixed"
    lr, kw = ctx.chosen[c.lr_from]
    if not c.retune:
        return [(lr, kw)], (kw,), f"reused from {c.lr_from}"
    grid = local_grid(ctx.rows[c.lr_from]["tuning"], lr, kw)
    return [(g, kw) for g in grid], (kw,), f"reused from {c.lr_from} (it was not tuned)"


def _tune_first_seed(ctx: _Context, c: Contender, points: list[Point],
                     kw_grid: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """Tune ``c`` over ``points`` (extended as ``ctx.policy`` allows); the best run is the first seed's result."""
    if ctx.task.score_val is None:
        raise ValueError(f"{ctx.task.scenario}: tuning {c.label} needs a validation split")
    runs: list[tuple[RunSpec, Any]] = []

    def evaluate(lr: float, kw: dict[str, Any]) -> dict[str, Any]:
        spec = ctx.spec(c, lr, kw)
        res = run_one(ctx.task, spec, ctx.seed, eval_every=ctx.eval_every)
        runs.append((spec, res))
        ctx.tick(extension=len(runs) > len(points))
        return {"val": res.scores.get("val"), "test": res.scores.get("test"), "grad_evals": res.grad_evals,
                "seconds": round(res.seconds, 4)}

    tuned = tune(points, evaluate, ctx.policy, kw_grid)
    ctx.rows[c.label]["tuning"] = tuned.records
    ctx.rows[c.label]["choice"] = tuned.choice
    best = tuned.records[tuned.best]
    ctx.chosen[c.label] = (best["lr"], best["kwargs"])
    spec, res = runs[tuned.best]
    return _record(spec, ctx.seed, res, True)


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
