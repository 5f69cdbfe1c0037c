"""Tuning past a grid's edge (issue 15): the extension finds optima outside the grid, stops at bounds and
caps, flags what it did not settle (edges, ties), and compute-matched rows are tuned for their own budget."""

from __future__ import annotations

import json
import math

import pytest
import torch

from recsys_flowadam.reproduce import Contender, Scenario, compare, synthetic_task, write_report
from recsys_flowadam.reproduce.tuning import NO_EXTENSION, TuningPolicy, local_grid, next_lr, tune

pytestmark = pytest.mark.usefixtures("one_thread")

FAIR = (1e-3, 3e-3, 1e-2, 3e-2)


def bowl(best_lr: float, floor: float = 1.0, wd_cost: dict[float, float] | None = None):
    """A toy validation score: a parabola in log10(lr) with its minimum at ``best_lr`` (plus a cost per wd)."""
    calls: list[tuple[float, dict]] = []

    def evaluate(lr: float, kw: dict) -> dict:
        calls.append((lr, kw))
        extra = (wd_cost or {}).get(kw.get("weight_decay"), 0.0)
        val = floor + (math.log10(lr) - math.log10(best_lr)) ** 2 + extra
        return {"val": val, "test": 2 * val}

    return evaluate, calls


def test_next_lr_continues_the_grid_in_its_own_ratio():
    assert next_lr(list(FAIR), "low") == 3e-4 and next_lr(list(FAIR), "high") == 0.1
    assert next_lr([3e-4, 1e-3, 3e-3], "low") == 1e-4 and next_lr([1e-2, 3e-2, 0.1], "high") == 0.3
    assert next_lr([1e-3, 2e-3, 4e-3], "low") == 5e-4 and next_lr([1e-3, 2e-3, 4e-3], "high") == 8e-3
    assert next_lr([3e-3, 1e-2], "low") == pytest.approx(9e-4)
    assert next_lr([3e-3, 1e-2], "high") == pytest.approx(1 / 30)
    with pytest.raises(ValueError):
        next_lr([1e-3], "low")


@pytest.mark.parametrize("optimum, chosen, added", [(2e-4, 3e-4, [3e-4, 1e-4]), (0.2, 0.3, [0.1, 0.3, 1.0])])
def test_an_optimum_outside_the_grid_is_found_on_either_side(optimum, chosen, added):
    evaluate, calls = bowl(optimum)
    res = tune([(lr, {}) for lr in FAIR], evaluate, TuningPolicy())
    assert [lr for lr, _ in calls] == list(FAIR) + added  # the grid first, then one side only
    best = res.records[res.best]
    assert best["lr"] == chosen and res.choice["lr"] == chosen
    assert [r["lr"] for r in res.records if r["extension"]] == added
    assert res.choice["tuning_runs"] == 4 + len(added) and res.choice["extension_runs"] == len(added)
    assert not res.choice["at_edge"] and res.choice["edges"] == [] and not res.choice["indistinguishable"]
    assert best["test"] == 2 * best["val"]  # the record keeps what evaluate returned


def test_an_interior_choice_costs_no_extra_runs():
    evaluate, calls = bowl(4e-3)
    res = tune([(lr, {}) for lr in FAIR], evaluate, TuningPolicy())
    assert len(calls) == 4 and res.choice["lr"] == 3e-3 and not res.choice["at_edge"]
    assert res.choice["runner_up"]["lr"] == 1e-2  # log-distance 0.40 from the optimum, 1e-3 is 0.60 away


def test_a_bound_stops_the_extension_and_marks_the_choice_at_edge():
    evaluate, calls = bowl(1e-8)
    res = tune([(lr, {}) for lr in FAIR], evaluate, TuningPolicy(lower=1e-4, max_extra=10))
    assert [lr for lr, _ in calls][4:] == [3e-4, 1e-4]  # 3e-5 would leave [1e-4, 1]
    assert res.choice["lr"] == 1e-4 and res.choice["at_edge"]
    (edge,) = res.choice["edges"]
    assert edge["param"] == "lr" and edge["side"] == "low" and "3e-05" in edge["reason"] and "bounds" in edge["reason"]


def test_the_cap_stops_the_extension_and_says_so():
    evaluate, calls = bowl(1e3)
    res = tune([(lr, {}) for lr in FAIR], evaluate, TuningPolicy(upper=1e6, max_extra=2))
    assert len(calls) == 6 and res.choice["lr"] == 0.3 and res.choice["at_edge"]
    assert res.choice["edges"][0]["side"] == "high" and "cap of 2" in res.choice["edges"][0]["reason"]
    res = tune([(lr, {}) for lr in FAIR], bowl(1e3)[0], NO_EXTENSION)
    assert res.choice["lr"] == 3e-2 and res.choice["at_edge"] and "not extended" in res.choice["edges"][0]["reason"]


def test_a_2d_grid_extends_lr_on_the_best_options_line_and_flags_an_option_at_its_edge():
    wds = ({"weight_decay": 1e-3}, {"weight_decay": 1e-2}, {"weight_decay": 1e-1})
    points = [(lr, kw) for kw in wds for lr in (1e-3, 3e-3, 1e-2)]
    evaluate, calls = bowl(2e-4, wd_cost={1e-3: 0.5, 1e-2: 0.2, 1e-1: 0.0})
    res = tune(points, evaluate, TuningPolicy(), kw_grid=wds)
    assert all(kw == wds[2] for _lr, kw in calls[9:]) and [lr for lr, _ in calls[9:]] == [3e-4, 1e-4]
    assert res.choice["lr"] == 3e-4 and res.choice["kwargs"] == wds[2]
    assert res.choice["at_edge"]  # lr is interior now, but the weight decay is the largest of its grid
    (edge,) = res.choice["edges"]
    assert edge == {"param": "weight_decay", "side": "high", "reason": "the options grid is not extended (only lr is)"}


def test_indistinguishable_validation_scores_are_flagged():
    flat = tune([(lr, {}) for lr in FAIR], lambda lr, kw: {"val": 1.1 + 1e-4 * abs(math.log10(lr) + 2.5)},
                TuningPolicy())
    assert flat.choice["indistinguishable"]
    assert flat.choice["runner_up"]["rel_gap"] <= 1e-3 and flat.choice["runner_up"]["lr"] != flat.choice["lr"]
    clear = tune([(lr, {}) for lr in FAIR], bowl(4e-3)[0], TuningPolicy())
    assert not clear.choice["indistinguishable"] and clear.choice["runner_up"]["rel_gap"] > 1e-3
    diverged = tune([(1e-3, {}), (1e-2, {})], lambda lr, kw: {"val": math.inf if lr > 5e-3 else 1.0}, NO_EXTENSION)
    assert diverged.choice["runner_up"] is None and not diverged.choice["indistinguishable"]


def test_local_grid_is_the_choice_and_its_neighbours():
    records = [{"lr": lr, "kwargs": {}} for lr in (1e-3, 3e-3, 1e-2, 3e-4)]
    assert local_grid(records, 3e-3, {}) == (1e-3, 3e-3, 1e-2)
    assert local_grid(records, 3e-4, {}) == (3e-4, 1e-3)
    assert local_grid([], 1e-2, {}) == (1e-2,)


def tiny(seed: int, with_val: bool):
    return synthetic_task("tiny", (20, 30), 3, 0.4, 0.1, 2, seed, with_val=with_val, device=torch.device("cpu"),
                          dtype=torch.float64)


def test_compare_extends_a_grid_that_stops_too_low_and_retunes_compute_matched_rows(tmp_path):
    scen = Scenario("tiny", "tiny", tiny)
    cont = [Contender("Adam", "adam", 1e-4, (1e-4, 3e-4)),
            Contender("FlowAdam", "flowadam", 1e-4, (1e-2,), {"mode": "B"}),
            Contender("Adam (compute-matched)", "adam", 1e-4, (), match="FlowAdam", lr_from="Adam", retune=True)]
    out = compare([scen], cont, [0, 1], steps=40, with_val=True, progress=False,
                  policy=TuningPolicy(max_extra=8))
    rows = out[0]["rows"]
    adam = rows["Adam"]
    grid_best = min(t["val"] for t in adam["tuning"] if not t["extension"])
    ch = adam["choice"]
    assert ch["how"] == "tuned" and ch["extension_runs"] >= 1 and not ch["at_edge"]
    assert ch["lr"] > 3e-4 and ch["val"] < grid_best  # 40 Adam steps want a far larger lr than 3e-4
    assert all(t["lr"] > 3e-4 for t in adam["tuning"] if t["extension"])
    assert [r["lr"] for r in adam["runs"]] == [ch["lr"]] * 2
    assert rows["FlowAdam"]["choice"]["how"] == "fixed" and rows["FlowAdam"]["choice"]["tuning_runs"] == 0
    # the compute-matched row is tuned for FlowAdam's budget around Adam's choice, then keeps its own choice
    matched = rows["Adam (compute-matched)"]
    flow_evals = [r["grad_evals"] for r in rows["FlowAdam"]["runs"]]
    tried = [t["lr"] for t in matched["tuning"]]
    assert ch["lr"] in tried and len(tried) >= 2
    assert set(tried[:3]) <= {t["lr"] for t in adam["tuning"]}  # its start: Adam's choice and neighbours
    assert all(t["grad_evals"] == flow_evals[0] for t in matched["tuning"])
    best = min(matched["tuning"], key=lambda t: t["val"])
    assert matched["choice"]["lr"] == best["lr"] and [r["lr"] for r in matched["runs"]] == [best["lr"]] * 2
    assert [r["grad_evals"] for r in matched["runs"]] == flow_evals
    assert matched["runs"][0]["scores"]["test"] == best["test"]


def _result(scenarios: list[dict]) -> dict:
    return {"experiment": "toy", "command": "c", "seeds": [0], "device": "cpu", "notes": [],
            "protocols": [{"protocol": {"name": "fair", "summary": "s"}, "scenarios": scenarios}]}


def test_reports_mark_edges_and_ties_in_the_table_the_json_and_the_summary(tmp_path):
    from recsys_flowadam.reproduce.summary import tables

    scen = Scenario("tiny", "tiny", tiny)
    cont = [Contender("Adam", "adam", 1e-4, (1e-3, 3e-3)), Contender("Lion", "lion", 1e-4, (1e-4, 1e-3))]
    out = compare([scen], cont, [0], steps=20, with_val=True, progress=False,
                  policy=TuningPolicy(upper=3e-3, lower=1e-4))  # no room to extend: whatever edge wins stays
    rows = out[0]["rows"]
    assert all(row["choice"]["at_edge"] and "bounds" in row["choice"]["edges"][0]["reason"] for row in rows.values())
    # a tie, as robust factorization's validation RMSE makes them: two lrs a relative 1e-4 apart
    tie = tune([(1e-3, {}), (3e-3, {}), (1e-2, {})], lambda lr, kw: {"val": 1.2 + 1e-4 * (lr == 1e-2)}, NO_EXTENSION)
    rows["Adam"]["choice"] = tie.choice  # (a hand-made choice: the tie is rare on a tiny problem)
    written = write_report(_result(out), tmp_path)
    data = json.loads(written["json"].read_text())
    saved = data["protocols"][0]["scenarios"][0]["rows"]
    assert saved["Lion"]["choice"]["at_edge"] is True and saved["Lion"]["choice"]["edges"][0]["param"] == "lr"
    assert saved["Adam"]["choice"]["indistinguishable"] is True
    assert all(t["extension"] is False for t in saved["Lion"]["tuning"])
    md = written["md"].read_text()
    lion_lr = rows["Lion"]["choice"]["lr"]
    assert f"| Lion | {lion_lr:g} (edge) |" in md and "| Adam | " in md and " (edge, tie) |" in md
    assert "(edge) Lion: lr" in md and "not extended further" in md and "(tie) Adam: validation cannot separate" in md
    assert "Tuning: 2 of 2 tuned choices are not settled" in md and "tiny: Lion (lr" in md
    summary = tables(data)
    assert "(edge)" in summary and "(tie)" in summary and "- tiny: (tie) Adam" in summary


def test_full_runs_extend_quick_runs_say_they_do_not():
    from recsys_flowadam.reproduce import ExperimentOptions, fair_tuned
    from recsys_flowadam.reproduce.experiments import jester_paper_contenders
    from recsys_flowadam.reproduce.protocols import describe_protocol
    from recsys_flowadam.reproduce.report import QUICK_NOTE

    assert ExperimentOptions().tuning_policy() == TuningPolicy(extend=True, lower=1e-6, upper=1.0, max_extra=4)
    assert not ExperimentOptions(quick=True).tuning_policy().extend
    assert "not extended" in ExperimentOptions(quick=True).tuning_text(2) and "not extended" in QUICK_NOTE
    assert "[1e-06, 1]" in ExperimentOptions().tuning_text(4)
    matched = [c for c in fair_tuned(1e-5) + jester_paper_contenders(100, quick=False) if c.match]
    assert len(matched) == 4 and all(c.retune and c.describe()["retune"] for c in matched)
    quick = [c for c in fair_tuned(1e-5, quick=True) + jester_paper_contenders(100, quick=True) if c.match]
    assert quick and not any(c.retune for c in quick) and "reuse the baseline's lr" in QUICK_NOTE
    assert "re-tuned for that budget" in describe_protocol("fair", fair_tuned(1e-5))["summary"]
    assert "not re-tuned in this run" in describe_protocol("fair", fair_tuned(1e-5, quick=True))["summary"]
