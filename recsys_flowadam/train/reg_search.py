"""Choosing the factors' L2 weight ``reg`` on the validation part when it is not given.

The rule (``TrainConfig.tune``, on by default), applied by the training jobs
(``pipeline.fit_and_score``: ``train``, ``cv``, ``Recommender.fit``):

* it runs only when ``reg`` is unset, there are validation ratings, the job is a single process
  and the training part has at most ``tune_max_ratings`` ratings (1,000,000 by default: the
  search multiplies the training time); otherwise the reason is recorded and an unset ``reg``
  is the centre below, except above ``tune_max_ratings``, where it is the grid's low end,
  centre / 4: with many ratings per row less shrinkage is needed, early stopping guards against
  overfitting, and a weight too strong collapses the factors to zero (measured on
  ``bench/bench_scale.py``'s 10M-rating problem: the centre, 0.12, ends on the bias-only plateau at
  0.878 test RMSE; 0.03-0.05 reach 0.787-0.796);
* the centre is the default: ``REG_PER_STD`` (0.12) times the standard deviation of the training
  ratings, because scaling the ratings by c scales the best factor weight by c (the loss grows
  by c^2, the factors by sqrt(c); the biases' weight is scale-free) - one rule for MovieLens'
  1..5 and Jester's -10..10;
* grid: centre x sqrt(2)^k for k = -1, 0, 1, one early-stopped run each (same seed and other
  settings); while the best validation RMSE sits on an edge, one more step past that edge, up to
  ``MAX_EXTRA`` steps (so reg stays within centre / 4 .. centre x 4): 3 to 6 runs;
* the value with the lowest validation RMSE wins (a tie: the earlier run); its run is the job's
  first run (the same settings and seed as a rerun, so identical to one), and the refit follows.

Only validation ratings are looked at; the test part never is.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping

from recsys_flowadam.train.config import TrainConfig

if TYPE_CHECKING:
    from recsys_flowadam.data.ratings import Ratings
    from recsys_flowadam.train.trainer import TrainResult

GRID_RATIO = math.sqrt(2.0)
FIRST_GRID = (-1, 0, 1)  # exponents of GRID_RATIO around the centre
MAX_EXTRA = 3  # steps past the first grid's edge, at most: reg within centre / 4 .. centre x 4


@dataclass
class RegSearch:
    """What the search did: the chosen ``reg``, why (``reason``), and its table (one row per run:
    reg, val_rmse, best_step, steps, seconds), empty when it did not search."""

    reg: float
    searched: bool
    reason: str
    centre: float
    ratio: float = GRID_RATIO
    table: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return describe(self.to_dict())


def describe(record: Mapping[str, Any]) -> str:
    """A search record (``RegSearch.to_dict()``) in one line for people: the grid, each value's
    validation RMSE and the choice, or why there was no search."""
    if not record["searched"]:
        return f"reg {record['reg']:g} (not searched: {record['reason']})"
    runs = ", ".join(f"{row['reg']:g}: {row['val_rmse']:.4f}" for row in record["table"])
    return (f"reg {record['reg']:g} chosen on validation (grid x{record['ratio']:.3g} around {record['centre']:g}, "
            f"val RMSE {runs}; {len(record['table'])} runs, {record['seconds']:.1f} s)")


def grid_value(centre: float, k: int, ratio: float = GRID_RATIO) -> float:
    """The grid's k-th value, centre x ratio^k, to 3 significant digits (recorded values stay readable)."""
    return float(f"{centre * ratio ** k:.3g}")


def search_grid(centre: float, score: Callable[[float], float]) -> tuple[float, list[tuple[int, float, float]]]:
    """``(best reg, [(k, reg, score)...] in run order)``: ``score`` (lower is better) on the first
    grid, then one step past the best edge at a time while the best is on an edge, up to MAX_EXTRA."""
    scores: dict[int, tuple[float, float]] = {}
    order: list[int] = []

    def run(k: int) -> None:
        value = grid_value(centre, k)
        scores[k] = (value, score(value))
        order.append(k)

    for k in FIRST_GRID:
        run(k)
    while True:
        best = min(order, key=lambda k: scores[k][1])  # min keeps the earlier run on a tie
        lo, hi = min(scores), max(scores)
        if best == lo and lo > FIRST_GRID[0] - MAX_EXTRA:
            run(lo - 1)
        elif best == hi and hi < FIRST_GRID[-1] + MAX_EXTRA:
            run(hi + 1)
        else:
            return scores[best][0], [(k, *scores[k]) for k in order]


def skip_reason(config: TrainConfig, n_train: int, n_val: int, distributed: bool) -> str | None:
    """Why the search does not run for this job, or None when it does (the module's rule)."""
    if config.reg is not None:
        return "reg given"
    if not config.tune:
        return "tune off"
    if n_val == 0:
        return "no validation ratings"
    if distributed:
        return "distributed run"
    if n_train > config.tune_max_ratings:
        return f"{n_train:,} training ratings > tune_max_ratings {config.tune_max_ratings:,}"
    return None


def choose_reg(train: Ratings, val: Ratings | None, config: TrainConfig, *, distributed: bool = False,
               run: Callable[[TrainConfig], TrainResult] | None = None
               ) -> tuple[TrainConfig, RegSearch, TrainResult | None]:
    """``(config with reg and bias_reg set, the search's record, the chosen value's run or None)``.

    ``run(config)`` trains on ``train`` early-stopping on ``val`` (default: ``train_model``); it is
    called once per grid value, and only the best run is kept. Without a search (see
    :func:`skip_reason`) the run is None and ``reg`` is the given or default value.
    """
    centre = config.reg_for(float(train.values.std()))
    # a given reg leaves the config as it is (bias_reg unset still means "the same as reg")
    resolved = config if config.reg is not None else replace(config, reg=centre, bias_reg=config.effective_bias_reg)
    reason = skip_reason(config, len(train), 0 if val is None else len(val), distributed)
    if reason is not None:
        if config.reg is None and len(train) > config.tune_max_ratings:
            low = grid_value(centre, FIRST_GRID[0] - MAX_EXTRA)
            return (replace(resolved, reg=low),
                    RegSearch(low, False, f"{reason}: the grid's low end, centre / 4", centre), None)
        return resolved, RegSearch(centre, False, reason, centre), None
    if run is None:
        from recsys_flowadam.train.trainer import train_model

        def run(c: TrainConfig) -> TrainResult:
            return train_model(train, val, c)

    kept: dict[str, Any] = {"rmse": math.inf, "result": None}  # the best run so far (the others are dropped)
    rows: dict[float, dict[str, Any]] = {}
    t0 = time.perf_counter()

    def score(value: float) -> float:
        t = time.perf_counter()
        result = run(replace(resolved, reg=value))
        rmse = math.inf if result.best_val_rmse is None else float(result.best_val_rmse)
        rows[value] = {"reg": value, "val_rmse": rmse, "best_step": result.best_step, "steps": result.steps,
                       "seconds": round(time.perf_counter() - t, 3)}
        if kept["result"] is None or rmse < kept["rmse"]:  # strict: a tie keeps the earlier run, as search_grid
            kept.update(rmse=rmse, result=result)
        return rmse

    best, order = search_grid(centre, score)
    search = RegSearch(best, True, "reg unset, tune on", centre, table=[rows[reg] for _, reg, _ in order],
                       seconds=round(time.perf_counter() - t0, 3))
    return replace(resolved, reg=best), search, kept["result"]
