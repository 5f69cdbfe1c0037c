"""`recsys-flowadam reproduce`: the quick smoke run CI uses, report files, errors, side experiments."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from recsys_flowadam.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_matrix_completion_smoke_writes_parseable_reports(tmp_path, capsys):
    out = tmp_path / "reports"
    rc = main(["reproduce", "matrix-completion", "--quick", "--protocol", "both", "--steps", "30", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    captured = capsys.readouterr()
    assert str(out / "matrix-completion.md") in captured.out
    data = json.loads((out / "matrix-completion.json").read_text())
    assert data["wall_seconds"] > sum(r["seconds"] for sc in data["protocols"][0]["scenarios"]
                                      for row in sc["rows"].values() for r in row["runs"])
    assert "matrix-completion: 0 min" in captured.err  # a quick run takes seconds
    # the summary table is printed, one seed reads "n = 1" (not "± 0.000"), and the run says it is a smoke test
    assert "| Adam | " in captured.out and "(n = 1)" in captured.out and "± 0.000" not in captured.out
    assert "smoke test, not the comparison" in captured.out
    md = (out / "matrix-completion.md").read_text()
    assert "--seeds" not in md.split("Command:")[1].splitlines()[0]  # the header records what ran: --quick
    assert "(n = 1)" in md and "smoke test" in md
    assert data["experiment"] == "matrix-completion" and data["seeds"] == [0]
    assert data["versions"]["torch"] == torch.__version__
    paper, fair = data["protocols"]
    assert paper["protocol"]["name"] == "paper" and fair["protocol"]["name"] == "fair"
    prow = paper["scenarios"][0]["rows"]
    assert list(prow) == ["Adam", "AdamW", "FlowAdam"]
    assert prow["Adam"]["contender"]["kwargs"] == {"weight_decay": 1e-5}
    assert prow["Adam"]["contender"]["l2_in_objective"] == 0.0
    assert prow["FlowAdam"]["contender"]["l2_in_objective"] == 1e-5
    run = prow["FlowAdam"]["runs"][0]
    assert run["steps"] == 30 and run["grad_evals"] >= 30 and math.isfinite(run["scores"]["test"])
    assert run["curve"][-1]["grad_evals"] == run["grad_evals"]
    frows = fair["scenarios"][0]["rows"]
    assert {r["contender"]["l2_in_objective"] for r in frows.values()} == {1e-5}
    assert frows["Adam (compute-matched)"]["runs"][0]["grad_evals"] == frows["FlowAdam"]["runs"][0]["grad_evals"]
    assert len(frows["Adam"]["tuning"]) == len(frows["FlowAdam"]["tuning"]) >= 2
    md = (out / "matrix-completion.md").read_text()
    assert "Wall time of the whole experiment:" in md
    assert "## Protocol `paper`" in md and "## Protocol `fair`" in md and "| FlowAdam |" in md
    assert "0.088 ± 0.001" in md  # the paper's figure beside ours
    for proto in ("paper", "fair"):
        png = out / f"matrix-completion-{proto}-small.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporaries
    from recsys_flowadam.reproduce.summary import tables

    summary = tables(data)
    flow_line = next(line for line in summary.splitlines() if line.startswith("| FlowAdam |"))
    assert f"{prow['FlowAdam']['summary']['mean']:.3f}" in flow_line and "[paper 0.088 ± 0.001]" in flow_line


def test_bad_arguments_are_user_errors(tmp_path, capsys):
    assert main(["reproduce", "gamma", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert main(["reproduce", "gamma", "--lr-grid", "0.01,x", "--out", str(tmp_path)]) == 2
    assert "--lr-grid" in capsys.readouterr().err
    rc = main(["reproduce", "jester", "--quick", "--data-dir", str(tmp_path / "nothing"), "--dataset", "jester-4",
               "--out", str(tmp_path), "--no-progress"])
    assert rc == 2
    assert "jester-4" in capsys.readouterr().err


def test_report_json_is_strict_with_nan_as_null(tmp_path):
    from recsys_flowadam.reproduce import write_report

    result = {"experiment": "x", "command": "c", "seeds": [0], "device": "cpu", "notes": [], "protocols": [{
        "protocol": {"name": "paper", "summary": "s"},
        "scenarios": [{"key": "k", "label": "L", "metric": "test RMSE", "info": {}, "rows": {"Adam": {
            "runs": [{"seed": 0, "scores": {"test": float("nan")}, "curve": []}], "tuning": [], "paper": None,
            "summary": {"mean": float("nan"), "std": 0.0, "n_diverged": 1, "wilcoxon": "baseline", "grad_evals": 3.0,
                        "steps": 3.0, "seconds": 0.1, "lr": 0.01, "kwargs": {}}}}}]}]}
    written = write_report(result, tmp_path)
    data = json.loads(written["json"].read_text())  # strict JSON: json.loads would accept NaN, so check text too
    assert "NaN" not in written["json"].read_text()
    assert data["protocols"][0]["scenarios"][0]["rows"]["Adam"]["runs"][0]["scores"]["test"] is None
    assert "1 diverged" in written["md"].read_text()


def test_two_spirals_data_and_training():
    from recsys_flowadam.reproduce.spirals import make_two_spirals, train_spirals

    x, y = make_two_spirals(100, 0.0, seed=0)
    assert x.shape == (200, 2) and y.mean() == 0.5
    np.testing.assert_allclose(x[:100], -x[100:], atol=1e-6)  # class 1 is class 0 turned by pi
    res = train_spirals("adam", {}, seed=0, steps=400, n_per_class=100)
    assert res["grad_evals"] == 400 and res["accuracy"] > 0.7


@pytest.mark.real_data
@pytest.mark.slow
def test_movielens_residual_task_fits_biases_only(real_data_dir):
    from recsys_flowadam.reproduce.residual import residual_scenario
    from recsys_flowadam.reproduce.runner import RunSpec, run_one

    scen = residual_scenario("ml-100k", real_data_dir, torch.device("cpu"), bias_steps=300)
    task = scen.build(0, True)
    assert task.info["bias_val_rmse"] < 1.0  # biases alone beat the global mean (about 1.13 on ML-100K)
    assert abs(float(task.train.values.mean())) < 0.05  # residuals are centred
    res = run_one(task, RunSpec("adam", 0.01, 1e-5, steps=20), 0)
    assert math.isfinite(res.scores["test"]) and math.isfinite(res.scores["residual"])


def _numbers(report_json):
    """Every per-seed score and evaluation count of a report (wall times and dates left out)."""
    data = json.loads(report_json.read_text())
    return [(proto["protocol"]["name"], sc["key"], label, r["seed"], r["lr"], r["grad_evals"], r["scores"])
            for proto in data["protocols"] for sc in proto["scenarios"] for label, row in sc["rows"].items()
            for r in row["runs"]]


def test_parallel_experiments_write_the_same_numbers_as_one_process(tmp_path):
    from recsys_flowadam.reproduce import ExperimentOptions
    from recsys_flowadam.reproduce.experiments import _run_and_write
    from recsys_flowadam.reproduce.pool import run_parallel

    names = ["robust-factorization", "matrix-completion"]
    opts = ExperimentOptions(quick=True, steps=15, progress=False)
    finished = []
    paths = run_parallel(names, opts, tmp_path / "par", 2, 1, _run_and_write,
                         lambda n, result: finished.append((n, result["wall_seconds"])))
    assert sorted(paths) == sorted(names) and sorted(n for n, _ in finished) == sorted(names)
    assert all(wall > 0 for _, wall in finished)
    for n in names:
        _run_and_write(n, opts, tmp_path / "seq")
        assert _numbers(tmp_path / "par" / f"{n}.json") == _numbers(tmp_path / "seq" / f"{n}.json")


def _wait_for_marker(name, opts, out_dir):
    """A stand-in experiment for the pool (module level, so spawned workers can import it)."""
    import time
    from pathlib import Path

    marker = Path(out_dir) / "fast-reported"
    deadline = time.monotonic() + (30 if name == "slow" else 0)
    while name == "slow" and not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"wall_seconds": 0.1, "saw_marker": marker.exists()}, {}


def test_parallel_experiments_are_reported_as_each_finishes(tmp_path):
    from recsys_flowadam.reproduce import ExperimentOptions
    from recsys_flowadam.reproduce.pool import run_parallel

    seen = {}

    def done(name, result):  # "slow" only finishes once "fast" has been reported here
        seen[name] = result["saw_marker"]
        if name == "fast":
            (tmp_path / "fast-reported").touch()

    run_parallel(["slow", "fast"], ExperimentOptions(progress=False), tmp_path, 2, 1, _wait_for_marker, done)
    assert seen == {"fast": False, "slow": True}


def test_a_failing_parallel_experiment_raises_and_the_others_still_write(tmp_path):
    from recsys_flowadam.data import DataError
    from recsys_flowadam.reproduce import ExperimentOptions
    from recsys_flowadam.reproduce.experiments import _run_and_write
    from recsys_flowadam.reproduce.pool import run_parallel

    opts = ExperimentOptions(quick=True, steps=10, progress=False, data_dir=str(tmp_path / "no-data"),
                             dataset="jester-4")
    with pytest.raises(DataError, match="jester-4"):
        run_parallel(["jester", "robust-factorization"], opts, tmp_path / "out", 2, 1, _run_and_write,
                     lambda n, result: None)
    assert (tmp_path / "out" / "robust-factorization.json").is_file()  # started beside jester, so it finished


def test_all_checks_the_real_datasets_before_running_anything(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["reproduce", "all", "--quick", "--jobs", "2", "--data-dir", str(tmp_path / "no-data"),
               "--out", str(out), "--no-progress"])
    assert rc == 2 and "jester" in capsys.readouterr().err
    assert not out.exists()
    assert main(["reproduce", "all", "--jobs", "0", "--out", str(out)]) == 2


def test_without_matplotlib_the_report_keeps_its_tables_and_says_why_no_plots(tmp_path, capsys, monkeypatch):
    """matplotlib is the optional `plots` extra: its absence is said up front and costs only the PNGs."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    out = tmp_path / "reports"
    assert main(["reproduce", "matrix-completion", "--quick", "--protocol", "paper", "--steps", "10",
                 "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.index("matplotlib is not installed") < err.index("matrix-completion: 0 min")  # before the runs
    assert not list(out.glob("*.png"))
    assert "recsys-flowadam[plots]" in (out / "matrix-completion.md").read_text()
    assert json.loads((out / "matrix-completion.json").read_text())["protocols"][0]["scenarios"][0]["rows"]
