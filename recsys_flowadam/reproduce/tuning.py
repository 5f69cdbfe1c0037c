"""Learning-rate tuning on the first seed: a grid, extended past an edge, and flags for what it did not settle.

Issue 15: an lr chosen at the lowest or highest point of its grid says only that the optimum may
lie beyond the grid, so a baseline tuned that way is not tuned. ``tune`` therefore grows the grid
on the side where the best validation score sits, in the grid's own ratio, until the best lr is
interior, the next lr would leave ``[lower, upper]``, or ``max_extra`` extra runs are spent. What
is still not settled is recorded in the choice (``at_edge`` with the edge and why, and
``indistinguishable`` when validation cannot tell the best point from the runner-up), so that a
report never presents such a choice as a tuned result.

A 2-D grid (lr x options, e.g. AdamW's lr x weight decay) is extended along lr only, on the best
option's line; an option at the edge of its own grid is flagged, not extended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

Point = tuple[float, dict[str, Any]]
Evaluate = Callable[[float, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class TuningPolicy:
    """How far tuning may go past its grid, and when two validation scores count as a tie.

    ``extend``: grow the lr grid past an edge at all; ``lower``/``upper``: the lr bounds (inclusive);
    ``max_extra``: extra runs per tuning (one contender, one scenario); ``tie_rtol``: a runner-up
    whose validation score is within this relative distance of the best's makes the choice
    indistinguishable.
    """

    extend: bool = True
    lower: float = 1e-6
    upper: float = 1.0
    max_extra: int = 4
    tie_rtol: float = 1e-3

    def describe(self) -> str:
        """One sentence for the report's protocol section."""
        ties = (f"a choice whose validation score is within a relative {self.tie_rtol:g} of the runner-up's is "
                "flagged indistinguishable")
        if not self.extend:
            return f"the lr grid is not extended past its edges (a choice at an edge is flagged); {ties}"
        return (f"an lr chosen at the lowest or highest point tried is extended on that side in the grid's own "
                f"ratio until it is interior, lr within [{self.lower:g}, {self.upper:g}], at most {self.max_extra} "
                f"extra runs (a choice still at an edge is flagged); {ties}")


NO_EXTENSION = TuningPolicy(extend=False)


@dataclass
class Tuned:
    """Every point tried (``records``, in the order run), the index of the best one, and the choice's flags."""

    records: list[dict[str, Any]]
    best: int
    choice: dict[str, Any]


def next_lr(lrs: list[float], side: str) -> float:
    """The lr one step past the ``side`` ("low"/"high") end of the sorted ``lrs``, in the grid's own ratio.

    The step repeats the one two positions in, so an alternating 1-3-10 grid continues as
    0.3, 0.1, ... below and 30, 100, ... above, and a uniform geometric grid keeps its ratio; a
    two-point grid repeats its one step. Rounded to 10 significant digits (3e-4, not 3.0000000000000003e-4).
    """
    if len(lrs) < 2:
        raise ValueError("extending a grid needs at least two lrs")
    if side == "low":
        ratio = lrs[2] / lrs[1] if len(lrs) > 2 else lrs[1] / lrs[0]
        new = lrs[0] / ratio
    elif side == "high":
        ratio = lrs[-2] / lrs[-3] if len(lrs) > 2 else lrs[-1] / lrs[-2]
        new = lrs[-1] * ratio
    else:
        raise ValueError(f"side must be 'low' or 'high', got {side!r}")
    return float(f"{new:.10g}")


def _val(record: dict[str, Any]) -> float:
    v = record.get("val")
    return math.inf if v is None or math.isnan(v) else float(v)


def best_index(records: list[dict[str, Any]]) -> int:
    """The first record with the lowest validation score (NaN and missing count as +inf)."""
    best = 0
    for i, r in enumerate(records):
        if _val(r) < _val(records[best]):
            best = i
    return best


def line_lrs(records: list[dict[str, Any]], kwargs: dict[str, Any]) -> list[float]:
    """The sorted distinct lrs tried with options ``kwargs``."""
    return sorted({r["lr"] for r in records if r["kwargs"] == kwargs})


def _edge_side(lr: float, lrs: list[float]) -> str | None:
    if len(lrs) < 2:
        return None  # lr was not tuned on this line: no edge to speak of
    return "low" if lr == lrs[0] else "high" if lr == lrs[-1] else None


def tune(points: list[Point], evaluate: Evaluate, policy: TuningPolicy = TuningPolicy(),
         kw_grid: tuple[dict[str, Any], ...] | None = None) -> Tuned:
    """Evaluate every point, then extend the lr grid past the best's edge as ``policy`` allows.

    ``evaluate(lr, kwargs)`` runs one point and returns at least ``{"val": score}`` (lower is
    better; a diverged run returns +inf); every record gets ``lr``, ``kwargs`` and ``extension``
    (True for points past the grid). ``kw_grid``: the options grid in increasing order, to flag a
    best option at its edge (None: the options of ``points`` in order of appearance).
    """
    if not points:
        raise ValueError("tuning needs at least one point")
    records = [{"lr": lr, "kwargs": kw, **evaluate(lr, kw), "extension": False} for lr, kw in points]
    extra, stop = 0, None
    while True:
        best = records[best_index(records)]
        lrs = line_lrs(records, best["kwargs"])
        side = _edge_side(best["lr"], lrs)
        if side is None:
            break
        if not policy.extend:
            stop = (side, "the grid is not extended in this run")
            break
        if extra >= policy.max_extra:
            stop = (side, f"the cap of {policy.max_extra} extra runs was reached")
            break
        new = next_lr(lrs, side)
        if not policy.lower * (1 - 1e-9) <= new <= policy.upper * (1 + 1e-9):
            stop = (side, f"the next lr {new:g} lies outside the bounds [{policy.lower:g}, {policy.upper:g}]")
            break
        records.append({"lr": new, "kwargs": best["kwargs"], **evaluate(new, best["kwargs"]), "extension": True})
        extra += 1
    b = best_index(records)
    options = list(kw_grid) if kw_grid is not None else _unique(kw for _lr, kw in points)
    return Tuned(records, b, choice_flags(records, b, policy, options, stop, len(points)))


def _unique(items) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for it in items:
        if it not in out:
            out.append(it)
    return out


def choice_flags(records: list[dict[str, Any]], best: int, policy: TuningPolicy, options: list[dict[str, Any]],
                 stop: tuple[str, str] | None, grid_runs: int) -> dict[str, Any]:
    """The JSON record of a tuned choice: runs spent, edges still touched (and why), tie with the runner-up."""
    chosen = records[best]
    edges = []
    if stop is not None:
        edges.append({"param": "lr", "side": stop[0], "reason": stop[1]})
    if len(options) > 1 and chosen["kwargs"] in options:
        i = options.index(chosen["kwargs"])
        if i in (0, len(options) - 1):
            varying = sorted({k for kw in options for k in kw if any(o.get(k) != kw.get(k) for o in options)})
            edges.append({"param": ", ".join(varying) or "options", "side": "low" if i == 0 else "high",
                          "reason": "the options grid is not extended (only lr is)"})
    runner_up, tie = _runner_up(records, best, policy.tie_rtol)
    return {"how": "tuned", "lr": chosen["lr"], "kwargs": chosen["kwargs"], "val": chosen.get("val"),
            "tuning_runs": len(records), "grid_runs": grid_runs, "extension_runs": len(records) - grid_runs,
            "at_edge": bool(edges), "edges": edges, "indistinguishable": tie, "runner_up": runner_up,
            "tie_rtol": policy.tie_rtol}


def _runner_up(records: list[dict[str, Any]], best: int, rtol: float) -> tuple[dict[str, Any] | None, bool]:
    v1 = _val(records[best])
    others = [r for i, r in enumerate(records) if i != best and math.isfinite(_val(r))]
    if not others or not math.isfinite(v1):
        return None, False
    second = min(others, key=_val)
    gap = (_val(second) - v1) / abs(v1) if v1 != 0 else math.inf
    return {"lr": second["lr"], "kwargs": second["kwargs"], "val": second.get("val"), "rel_gap": gap}, gap <= rtol


def untuned_choice(lr: float, kwargs: dict[str, Any], how: str) -> dict[str, Any]:
    """The JSON record of a choice that was not tuned here (``how``: "fixed", or "reused from <label>")."""
    return {"how": how, "lr": lr, "kwargs": kwargs, "tuning_runs": 0, "grid_runs": 0, "extension_runs": 0,
            "at_edge": False, "edges": [], "indistinguishable": False, "runner_up": None}


def local_grid(records: list[dict[str, Any]], lr: float, kwargs: dict[str, Any]) -> tuple[float, ...]:
    """``lr`` and its neighbours among the lrs ``records`` tried with ``kwargs`` (a compute-matched row's grid)."""
    lrs = line_lrs(records, kwargs)
    if lr not in lrs:
        return (lr,)
    i = lrs.index(lr)
    return tuple(lrs[max(0, i - 1): i + 2])
