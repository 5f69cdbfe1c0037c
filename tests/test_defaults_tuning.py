"""The no-flag defaults and the automatic search of ``reg`` on the validation part
(``recsys_flowadam.train.reg_search``): the search's rule on toy scores whose answer is known,
when it runs and when not, and what ``train``, ``cv`` and ``Recommender`` record of it."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest

from recsys_flowadam.cli import main
from recsys_flowadam.train.config import TrainConfig, default_reg
from recsys_flowadam.train.reg_search import (FIRST_GRID, GRID_RATIO, MAX_EXTRA, choose_reg, grid_value,
                                              search_grid, skip_reason)

SYN = ["--dataset", "synthetic", "--data-option", "n_users=80", "--data-option", "n_items=50",
       "--data-option", "rank=3", "--data-option", "density=0.3", "--data-option", "noise=0.3",
       "--split", "random", "--rank", "4", "--steps", "60", "--device", "cpu", "--threads", "1"]


def _log_distance(target: float):
    """A validation score whose best reg is known: the log-distance to ``target``."""
    calls: list[float] = []

    def score(reg: float) -> float:
        calls.append(reg)
        return abs(math.log(reg / target))

    return score, calls


def _run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------------------- the search's rule


def test_defaults_are_the_generalising_ones():
    c = TrainConfig()
    assert (c.model, c.rank, c.lr, c.patience) == ("biased-mf", 50, 0.02, 10)
    assert c.reg is None and c.tune and c.refit and c.reg_weighting == "frequency"
    assert c.effective_bias_reg == TrainConfig.DEFAULT_BIAS_REG  # reg unset: the scale-free bias default
    assert TrainConfig(reg=0.2).effective_bias_reg == 0.2  # reg given: bias_reg follows it, as before
    # the unset reg grows with the rating scale: MovieLens (std ~1.1) and Jester (std ~5) alike
    assert default_reg(1.117) == 0.134 and default_reg(5.056) == 0.607
    assert TrainConfig().reg_for(2.0) == default_reg(2.0) and TrainConfig(reg=0.5).reg_for(2.0) == 0.5


def test_an_interior_best_needs_the_first_grid_only():
    score, calls = _log_distance(0.1)
    best, rows = search_grid(0.1, score)
    assert best == 0.1 and [k for k, _, _ in rows] == list(FIRST_GRID) and len(calls) == 3


@pytest.mark.parametrize("steps_away", [2, 3, -2])
def test_the_search_extends_past_the_edge_to_the_best_value(steps_away):
    target = 0.1 * GRID_RATIO ** steps_away
    score, _ = _log_distance(target)
    best, rows = search_grid(0.1, score)
    assert best == grid_value(0.1, steps_away)
    ks = [k for k, _, _ in rows]
    assert ks[:3] == list(FIRST_GRID)
    step = 1 if steps_away > 0 else -1
    # one step at a time past the edge, and one beyond the best to see it is interior
    assert ks[3:] == list(range(FIRST_GRID[-1 if step > 0 else 0] + step, steps_away + 2 * step, step))
    assert min(rows, key=lambda r: r[2])[1] == best


def test_the_search_stops_at_its_bound():
    score, calls = _log_distance(1e3)  # far beyond the grid: the bound decides
    best, rows = search_grid(0.1, score)
    assert len(calls) == len(FIRST_GRID) + MAX_EXTRA
    assert best == grid_value(0.1, FIRST_GRID[-1] + MAX_EXTRA) == max(calls)
    assert best <= 0.1 * 4 * 1.001  # "reg within centre / 4 .. centre x 4"


def test_a_tie_keeps_the_earlier_run():
    best, rows = search_grid(0.1, lambda reg: 1.0)  # a flat profile (e.g. factors that never move)
    # the first run wins the tie; one step past its edge ties too, so the first is interior: done
    assert best == grid_value(0.1, FIRST_GRID[0]) and [k for k, _, _ in rows] == [*FIRST_GRID, FIRST_GRID[0] - 1]


def test_when_the_search_runs():
    c = TrainConfig()
    assert skip_reason(c, 1000, 100, distributed=False) is None
    assert skip_reason(TrainConfig(reg=0.1), 1000, 100, False) == "reg given"
    assert skip_reason(TrainConfig(tune=False), 1000, 100, False) == "tune off"
    assert skip_reason(c, 1000, 0, False) == "no validation ratings"
    assert skip_reason(c, 1000, 100, True) == "distributed run"
    # the large-data rule: above tune_max_ratings training ratings the default reg is taken at once
    assert skip_reason(c, c.tune_max_ratings, 100, False) is None
    assert "tune_max_ratings" in skip_reason(c, c.tune_max_ratings + 1, 100, False)


class _FakeResult:
    def __init__(self, reg: float, target: float):
        self.best_val_rmse = 1.0 + abs(math.log(reg / target))
        self.best_step, self.steps, self.reg = 10, 20, reg


def test_choose_reg_keeps_the_best_run_and_records_the_table():
    from recsys_flowadam.data import load_dataset, split_ratings

    split = split_ratings(load_dataset("synthetic", n_users=40, n_items=30, rank=2, density=0.3), "random", 0)
    centre = default_reg(float(split.train.values.std()))
    target = centre * GRID_RATIO ** 2
    config, search, run = choose_reg(split.train, split.val, TrainConfig(),
                                     run=lambda c: _FakeResult(c.reg, target))
    assert search.searched and search.reg == config.reg == run.reg == grid_value(centre, 2)
    assert config.bias_reg == TrainConfig.DEFAULT_BIAS_REG
    assert [row["reg"] for row in search.table] == [grid_value(centre, k) for k in (-1, 0, 1, 2, 3)]
    assert min(search.table, key=lambda r: r["val_rmse"])["reg"] == search.reg
    assert "chosen on validation" in search.describe()
    # no search: the given reg is kept as it is, the config untouched
    given = TrainConfig(reg=0.3)
    config, search, run = choose_reg(split.train, split.val, given)
    assert config is given and run is None and search.reg == 0.3 and "reg given" in search.describe()


# --------------------------------------------------------------------------- the training jobs


def test_train_with_no_reg_searches_and_records_the_choice(tmp_path, capsys):
    from recsys_flowadam.artifact import load_artifact

    out = tmp_path / "tuned"
    s = _run_json(capsys, ["train", *SYN, "--out", str(out), "--json"])
    search = s["reg_search"]
    assert search["searched"] and 3 <= len(search["table"]) <= 3 + MAX_EXTRA
    assert s["reg"] == search["reg"] == min(search["table"], key=lambda r: r["val_rmse"])["reg"]
    assert s["val_rmse"] == pytest.approx(min(r["val_rmse"] for r in search["table"]), abs=1e-4)
    assert s["refit"]  # the default refits on train + val
    recorded = load_artifact(out).meta.train_config
    assert recorded["reg"] == s["reg"] and recorded["bias_reg"] == TrainConfig.DEFAULT_BIAS_REG
    assert recorded["reg_search"] == search
    # the search's best run is the run: training the chosen value again gives the same model
    again = _run_json(capsys, ["train", *SYN, "--reg", str(s["reg"]), "--bias-reg", "0.01",
                               "--out", str(tmp_path / "again"), "--json"])
    assert (again["test_rmse"], again["best_step"]) == (s["test_rmse"], s["best_step"])
    assert again["reg_search"]["reason"] == "reg given"
    assert main(["train", *SYN, "--out", str(tmp_path / "text")]) == 0
    assert "chosen on validation" in capsys.readouterr().out


def test_no_tune_gives_the_plain_run_with_the_default_reg(tmp_path, capsys):
    from recsys_flowadam.data import load_dataset, split_ratings

    s = _run_json(capsys, ["train", *SYN, "--no-tune", "--out", str(tmp_path / "plain"), "--json"])
    assert not s["reg_search"]["searched"] and s["reg_search"]["reason"] == "tune off"
    train = split_ratings(load_dataset("synthetic", n_users=80, n_items=50, rank=3, density=0.3, noise=0.3),
                          "random", 0).train
    assert s["reg"] == default_reg(float(train.values.std()))
    same = _run_json(capsys, ["train", *SYN, "--reg", str(s["reg"]), "--bias-reg", "0.01",
                              "--out", str(tmp_path / "explicit"), "--json"])
    assert same["test_rmse"] == s["test_rmse"]
    big = _run_json(capsys, ["train", *SYN, "--tune-max-ratings", "100", "--out", str(tmp_path / "big"), "--json"])
    assert not big["reg_search"]["searched"] and "tune_max_ratings 100" in big["reg_search"]["reason"]
    # above the search's size bound an unset reg is the grid's low end, centre / 4
    assert big["reg"] == grid_value(s["reg"], -4) and "low end" in big["reg_search"]["reason"]
    low = _run_json(capsys, ["train", *SYN, "--reg", str(big["reg"]), "--bias-reg", "0.01",
                             "--out", str(tmp_path / "low"), "--json"])
    assert big["test_rmse"] == low["test_rmse"]


def test_cv_rows_carry_the_search(tmp_path, capsys):
    report = _run_json(capsys, ["cv", *[a for a in SYN if a not in ("--split", "random")], "--folds", "kfold:3:1",
                                "--out", str(tmp_path / "cv.json"), "--json"])
    row = report["per_fold"][0]
    assert row["reg_search"]["searched"] and row["reg"] == row["reg_search"]["reg"]


def _frame(n_users=60, n_items=40, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    u, v = rng.normal(size=(n_users, 2)), rng.normal(size=(n_items, 2))
    users, items = np.nonzero(rng.random((n_users, n_items)) < 0.35)
    ratings = np.clip(np.round(3 + (u[users] * v[items]).sum(1) + rng.normal(0, 0.3, len(users))), 1, 5)
    return pd.DataFrame({"user": users, "item": items, "rating": ratings})


def test_recommender_without_val_carves_one_for_the_search(one_thread):
    from recsys_flowadam import Recommender

    df = _frame()
    rec = Recommender(steps=60, device="cpu").fit(df)
    assert rec.reg_search_["searched"] and rec.reg_search_["validation"] == "carved from ratings"
    assert rec.config_.reg == rec.reg_search_["reg"]
    metrics = rec.artifact_.meta.metrics
    assert metrics["n_train_refit"] == len(df) and metrics["n_train"] < len(df)  # refit saw every rating
    assert rec.artifact_.meta.train_config["reg"] == rec.config_.reg
    # refit off: nothing is carved (the final model would miss those ratings); a warning says so
    with pytest.warns(UserWarning, match="no validation part is carved"):
        plain = Recommender(steps=60, device="cpu", refit=False).fit(df)
    assert not plain.reg_search_["searched"] and plain.reg_search_["validation"] == "none"
    # a given reg: no carving, no warning, as before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        given = Recommender(steps=60, device="cpu", reg=0.1).fit(df)
    assert given.reg_search_["reason"] == "reg given" and given.artifact_.meta.metrics["n_train"] == len(df)
