"""`recsys-flowadam cv`: --folds parsing, each fold equal to `train --split FOLD`, the JSON
report (content, strictness, never replacing a file unasked) and one-line errors."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from recsys_flowadam.cli import main
from recsys_flowadam.train.folds import CANONICAL_FOLDS, FoldsError, default_folds, parse_folds

SYN = ["--dataset", "synthetic", "--data-option", "n_users=120", "--data-option", "n_items=80",
       "--data-option", "rank=3", "--data-option", "density=0.3", "--data-option", "noise=0.1",
       "--rank", "3", "--model", "biased-mf", "--reg", "0.001", "--lr", "0.03", "--steps", "40",
       "--eval-every", "5", "--patience", "2", "--device", "cpu", "--threads", "1"]
SAME = ("n_train", "n_val", "n_test", "val_rmse", "val_mae", "test_rmse", "test_mae", "steps", "best_step",
        "stopped", "grad_evals", "ode_triggers", "representation", "path_choice", "refit")


def _strict(text: str) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _run_json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0, capsys.readouterr().err
    return _strict(capsys.readouterr().out)


@pytest.mark.parametrize("spec, folds", [
    ("u1..u5", ["u1", "u2", "u3", "u4", "u5"]),
    ("u2..u3", ["u2", "u3"]),
    ("u4..u4", ["u4"]),
    ("u1,u3", ["u1", "u3"]),
    (" u5 , ua,ub ", ["u5", "ua", "ub"]),
    ("kfold:3", ["kfold:3:1", "kfold:3:2", "kfold:3:3"]),
    ("kfold:5:2,kfold:5:4", ["kfold:5:2", "kfold:5:4"]),
    ("u1..u2,kfold:2", ["u1", "u2", "kfold:2:1", "kfold:2:2"]),
])
def test_parse_folds(spec, folds):
    assert parse_folds(spec) == folds


@pytest.mark.parametrize("spec, words", [
    ("", "empty"), ("u1,,u2", "empty"), ("u0", "unknown"), ("u6", "unknown"), ("random", "unknown"),
    ("u3..u1", "range"), ("u1..u6", "range"), ("kfold", "kfold:K"), ("kfold:", "kfold:K"),
    ("kfold:x", "integers"), ("kfold:1", "K >= 2"), ("kfold:3:0", "1 <= F <= K"), ("kfold:3:4", "1 <= F <= K"),
    ("kfold:3:1:2", "kfold:K"), ("u1,u1", "twice"), ("u1..u3,u2", "twice"), ("kfold:2,kfold:2:1", "twice"),
])
def test_parse_folds_errors_name_the_problem(spec, words):
    with pytest.raises(FoldsError) as info:
        parse_folds(spec)
    assert words in str(info.value) and repr(spec) in str(info.value)


def test_default_folds_and_canonical_names():
    from recsys_flowadam.data.splits import CANONICAL

    assert parse_folds(default_folds("ml-100k")) == ["u1", "u2", "u3", "u4", "u5"]
    assert default_folds("synthetic") == "kfold:5"
    assert CANONICAL_FOLDS == CANONICAL  # folds.py stays import-light, so it keeps its own copy


def test_each_fold_equals_train_with_that_split(tmp_path, capsys):
    report = _run_json(capsys, ["cv", *SYN, "--refit", "--folds", "kfold:3", "--out", str(tmp_path / "r.json"),
                                "--json"])
    assert [row["fold"] for row in report["per_fold"]] == ["kfold:3:1", "kfold:3:2", "kfold:3:3"]
    for row in report["per_fold"]:
        train = _run_json(capsys, ["train", *SYN, "--refit", "--split", row["fold"], "--json",
                                   "--out", str(tmp_path / "art")])
        assert {key: row[key] for key in SAME} == {key: train[key] for key in SAME}
    assert report["per_fold"][0]["refit"] is True


def test_json_report_content_and_file(tmp_path, capsys):
    out = tmp_path / "sub" / "report.json"
    printed = _run_json(capsys, ["cv", *SYN, "--optimizer", "adam", "--folds", "kfold:4:1,kfold:4:3",
                                 "--out", str(out), "--json", "--jobs", "1"])
    assert _strict(out.read_text()) == printed  # the file holds what --json prints
    assert printed["out"] == str(out)
    assert (printed["dataset"], printed["model"], printed["optimizer"], printed["seed"]) == (
        "synthetic", "biased-mf", "adam", 0)
    assert printed["folds"] == ["kfold:4:1", "kfold:4:3"] and printed["n_folds"] == 2 and printed["jobs"] == 1
    rows = printed["per_fold"]
    for key in ("test_rmse", "test_mae", "seconds"):
        values = [row[key] for row in rows]
        assert printed[key]["mean"] == pytest.approx(statistics.fmean(values))
        assert printed[key]["std"] == pytest.approx(statistics.stdev(values))  # sample std, ddof=1
        assert printed[key]["std"] == pytest.approx(float(np.std(values, ddof=1)))
    assert all(0 < row["test_rmse"] < 1 and row["test_mae"] < row["test_rmse"] for row in rows)
    assert rows[0]["test_rmse"] != rows[1]["test_rmse"]  # two different test parts
    assert all(row["n_test"] > 0 and row["steps"] >= 1 and row["seconds"] > 0 for row in rows)
    settings = printed["settings"]
    assert settings["optimizer"] == "adam" and settings["rank"] == 3 and settings["lr"] == 0.03
    assert settings["data_options"]["n_users"] == 120 and "split" not in settings
    assert printed["load_seconds"] >= 0 and printed["warm_up_seconds"] >= 0 and printed["total_seconds"] >= sum(row["seconds"] for row in rows) - 1e-3


def test_table_one_fold_and_default_report_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["cv", *SYN, "--optimizer", "adam", "--folds", "kfold:3:2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("synthetic: biased-mf + adam, seed 0, 1 folds")
    assert out[1].split() == ["fold", "test", "RMSE", "test", "MAE", "steps", "seconds", "reg"]
    report = _strict((tmp_path / "reports" / "cv-synthetic-biased-mf-adam.json").read_text())
    row = report["per_fold"][0]
    assert out[2].split()[:4] == ["kfold:3:2", f"{row['test_rmse']:.4f}", f"{row['test_mae']:.4f}", str(row["steps"])]
    assert out[3].startswith("mean ± std") and "± n/a" in out[3]  # no std from one fold
    assert report["test_rmse"] == {"mean": row["test_rmse"], "std": None}
    assert "reports/cv-synthetic-biased-mf-adam.json" in out[4]
    # the default file now exists: refused like an explicit one
    assert main(["cv", *SYN, "--optimizer", "adam", "--folds", "kfold:3:2"]) == 2
    assert "default report file" in capsys.readouterr().err


def test_existing_out_is_refused_unless_force(tmp_path, capsys):
    out = tmp_path / "mine.json"
    out.write_text("precious\n")
    assert main(["cv", *SYN, "--folds", "kfold:3:1", "--out", str(out), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and str(out) in captured.err and "--force" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert out.read_text() == "precious\n"
    report = _run_json(capsys, ["cv", *SYN, "--optimizer", "adam", "--folds", "kfold:3:1", "--out", str(out),
                                "--force", "--json"])
    assert _strict(out.read_text()) == report
    assert main(["cv", *SYN, "--folds", "kfold:3:1", "--out", str(tmp_path), "--force"]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_a_file_that_appears_during_the_run_is_kept(tmp_path, capsys, monkeypatch):
    import recsys_flowadam.train.crossval as crossval

    out, real = tmp_path / "r.json", crossval.cross_validate

    def racing(*args, **kwargs):
        result = real(*args, **kwargs)
        out.write_text("someone else's\n")
        return result

    monkeypatch.setattr(crossval, "cross_validate", racing)
    assert main(["cv", *SYN, "--optimizer", "adam", "--folds", "kfold:3:1", "--out", str(out), "--json"]) == 2
    captured = capsys.readouterr()
    assert _strict(captured.out)["n_folds"] == 1  # the figures are still printed
    assert "appeared while the folds ran" in captured.err and out.read_text() == "someone else's\n"


@pytest.mark.parametrize("argv, words", [
    (["--folds", "kfold:1"], "K >= 2"),
    (["--folds", "u1"], "fold u1"),  # generated data has no canonical split files
    (["--threads", "0"], "--threads"),
    (["--jobs", "0"], "--jobs"),
    (["--rank", "-1"], "--rank"),
    (["--optimizer", "nosuch", "--folds", "kfold:3"], "fold kfold:3:1"),  # fails in training
    (["--context", "time:2"], "timestamps"),  # generated data has none
])
def test_errors_are_one_line(tmp_path, capsys, argv, words):
    out = tmp_path / "r.json"
    assert main(["cv", *SYN, "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recsys-flowadam: error:") and words in err[0]
    assert not out.exists()


def test_split_is_not_a_cv_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["cv", *SYN, "--split", "random"])
    assert info.value.code == 2 and "--split" in capsys.readouterr().err


def test_recipe_is_read_and_its_split_ignored(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('dataset = "synthetic"\nsplit = "u1"\nmodel = "mf"\nrank = 2\noptimizer = "adam"\n'
                      'lr = 0.05\nsteps = 10\n[data_options]\nn_users = 60\nn_items = 40\nrank = 2\ndensity = 0.4\n')
    report = _run_json(capsys, ["cv", "--recipe", str(recipe), "--rank", "3", "--device", "cpu", "--json",
                                "--out", str(tmp_path / "r.json")])
    assert report["folds"] == ["kfold:5:1", "kfold:5:2", "kfold:5:3", "kfold:5:4", "kfold:5:5"]
    assert (report["model"], report["settings"]["rank"], report["settings"]["lr"]) == ("mf", 3, 0.05)


def test_save_models_writes_the_artifact_train_writes(tmp_path, capsys):
    from recsys_flowadam.artifact import load_artifact

    report = _run_json(capsys, ["cv", *SYN, "--folds", "kfold:3:3", "--save-models", str(tmp_path / "m"),
                                "--out", str(tmp_path / "r.json"), "--json"])
    row = report["per_fold"][0]
    assert row["artifact"] == str(tmp_path / "m" / "kfold-3-3")
    train = _run_json(capsys, ["train", *SYN, "--split", "kfold:3:3", "--out", str(tmp_path / "t"), "--json"])
    ours, theirs = load_artifact(tmp_path / "m" / "kfold-3-3"), load_artifact(tmp_path / "t")
    assert ours.meta.metrics["test_rmse"] == row["test_rmse"] == train["test_rmse"]
    assert ours.meta.dataset.split == "kfold:3:3" and ours.meta.train_config == theirs.meta.train_config
    assert set(ours.tensors) == set(theirs.tensors)
    for name in ours.tensors:
        np.testing.assert_array_equal(np.asarray(ours.tensors[name]), np.asarray(theirs.tensors[name]))
    # a folder holding something else is refused before any training
    (tmp_path / "m2" / "kfold-3-3").mkdir(parents=True)
    (tmp_path / "m2" / "kfold-3-3" / "notes.txt").write_text("mine")
    assert main(["cv", *SYN, "--folds", "kfold:3:3", "--save-models", str(tmp_path / "m2"),
                 "--out", str(tmp_path / "r2.json")]) == 2
    assert "notes.txt" in capsys.readouterr().err and not (tmp_path / "r2.json").exists()


@pytest.mark.real_data
@pytest.mark.parametrize("extra", [[], ["--model", "cp", "--context", "time:3", "--rank", "8", "--optimizer", "adam"]])
def test_ml100k_canonical_fold_equals_train(real_data_dir, tmp_path, capsys, extra):
    recipe = Path(__file__).resolve().parents[1] / "models" / "ml-100k-biased-mf.toml"
    common = ["--recipe", str(recipe), "--data-dir", str(real_data_dir), "--steps", "20", "--device", "cpu",
              "--threads", "1", "--json", *extra]
    report = _run_json(capsys, ["cv", *common, "--folds", "u2", "--out", str(tmp_path / "r.json")])
    train = _run_json(capsys, ["train", *common, "--split", "u2", "--out", str(tmp_path / "a")])
    row = report["per_fold"][0]
    assert {key: row[key] for key in SAME} == {key: train[key] for key in SAME}
    assert row["n_test"] == 20_000


@pytest.mark.parametrize("optimizer", ["flowadam", "adam", "lazy-adam"])
def test_folds_at_once_give_the_numbers_of_one_at_a_time(tmp_path, capsys, optimizer):
    import torch

    from recsys_flowadam import kernel_pool

    threads, kernels = torch.get_num_threads(), kernel_pool.KERNEL_THREADS
    argv = ["cv", *SYN, "--optimizer", optimizer, "--refit", "--folds", "kfold:3", "--json"]
    alone = _run_json(capsys, [*argv, "--jobs", "1", "--out", str(tmp_path / "one.json")])
    at_once = _run_json(capsys, [*argv, "--jobs", "2", "--out", str(tmp_path / "two.json")])
    assert (alone["jobs"], at_once["jobs"]) == (1, 2)
    assert [row["fold"] for row in at_once["per_fold"]] == ["kfold:3:1", "kfold:3:2", "kfold:3:3"]
    for one, two in zip(alone["per_fold"], at_once["per_fold"]):
        assert {key: one[key] for key in SAME} == {key: two[key] for key in SAME}
    assert at_once["test_rmse"] == alone["test_rmse"]
    # the process's settings are back as they were
    assert (torch.get_num_threads(), kernel_pool.KERNEL_THREADS) == (threads, kernels)
    # the table says so, and its rows come in the folds' order
    assert main(["cv", *SYN, "--optimizer", optimizer, "--folds", "kfold:3", "--jobs", "3",
                 "--out", str(tmp_path / "three.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("3 folds (3 at a time)")
    assert [line.split()[0] for line in out[2:5]] == ["kfold:3:1", "kfold:3:2", "kfold:3:3"]


def test_folds_at_once_save_each_fold_s_artifact(tmp_path, capsys):
    from recsys_flowadam.artifact import load_artifact

    report = _run_json(capsys, ["cv", *SYN, "--optimizer", "adam", "--folds", "kfold:3", "--jobs", "3",
                                "--save-models", str(tmp_path / "m"), "--out", str(tmp_path / "r.json"), "--json"])
    assert report["jobs"] == 3
    for row in report["per_fold"]:
        artifact = load_artifact(Path(row["artifact"]))
        assert artifact.meta.dataset.split == row["fold"] and artifact.meta.metrics["test_rmse"] == row["test_rmse"]


def test_run_folds_runs_them_at_once_and_reports_in_order():
    import threading
    import time

    from recsys_flowadam.train.crossval import run_folds

    meet = threading.Barrier(2, timeout=10)  # passes only when two folds run at the same time

    def run(fold: str) -> dict:
        if fold in ("a", "b"):
            meet.wait()
        if fold == "a":
            time.sleep(0.2)  # finishes after b
        return {"fold": fold, "thread": threading.current_thread().name}

    seen: list[str] = []
    rows = run_folds(run, ["a", "b", "c"], 2, lambda row: seen.append(row["fold"]))
    assert seen == [row["fold"] for row in rows] == ["a", "b", "c"]
    assert all(row["thread"].startswith("recsys-cv-fold") for row in rows)
    # one at a time: on the caller's thread, in order
    here = [row["thread"] for row in run_folds(lambda f: {"thread": threading.current_thread()}, ["x", "y"], 1)]
    assert here == [threading.main_thread()] * 2


def test_a_failing_fold_stops_the_rest_and_is_raised_once_the_running_ones_end():
    import threading
    import time

    import torch

    from recsys_flowadam import kernel_pool
    from recsys_flowadam.train.crossval import run_folds

    threads, kernels = torch.get_num_threads(), kernel_pool.KERNEL_THREADS
    started: list[str] = []
    b_runs = threading.Event()

    def run(fold: str) -> dict:
        started.append(fold)
        if fold == "a":
            b_runs.wait(10)
            raise ValueError("fold a broke")
        b_runs.set()
        time.sleep(1.0)  # b runs on while a fails; the worker a freed must not start c
        return {"fold": fold}

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="fold a broke"):
        run_folds(run, ["a", "b", "c", "d"], 2, lambda row: pytest.fail("no row comes before a's"))
    assert sorted(started) == ["a", "b"]  # c and d never started
    assert time.perf_counter() - t0 >= 0.9  # raised once b had ended
    assert not any(t.name.startswith("recsys-cv-fold") for t in threading.enumerate())
    assert (torch.get_num_threads(), kernel_pool.KERNEL_THREADS) == (threads, kernels)


def test_an_interrupt_does_not_wait_for_the_running_folds():
    import threading
    import time

    from recsys_flowadam import kernel_pool
    from recsys_flowadam.train.crossval import run_folds

    kernels, release = kernel_pool.KERNEL_THREADS, threading.Event()

    def run(fold: str) -> dict:
        if fold == "b":
            release.wait(30)
        return {"fold": fold}

    def interrupt(row: dict) -> None:
        raise KeyboardInterrupt

    t0 = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_folds(run, ["a", "b", "c"], 2, interrupt)
        assert time.perf_counter() - t0 < 10  # b still runs: not waited for
        assert kernel_pool.KERNEL_THREADS == kernels
    finally:
        release.set()


def test_fold_jobs_chooses_by_device_size_and_cores(monkeypatch):
    import torch

    from recsys_flowadam import kernel_pool
    from recsys_flowadam.train.config import TrainConfig
    from recsys_flowadam.train.crossval import CONCURRENT_FOLDS_MAX_RATINGS, fold_jobs

    cpu = TrainConfig(device="cpu")
    monkeypatch.setattr(kernel_pool, "KERNEL_THREADS", 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # (torch's default here: one a core)
    assert fold_jobs(100_000, cpu, 5) == 2
    assert fold_jobs(100_000, cpu, 1) == 1
    assert fold_jobs(CONCURRENT_FOLDS_MAX_RATINGS, cpu, 5) == 2
    assert fold_jobs(CONCURRENT_FOLDS_MAX_RATINGS + 1, cpu, 5) == 1  # a fold's kernels use both cores
    assert fold_jobs(10**8, cpu, 5, jobs=3) == 3 and fold_jobs(100, cpu, 2, jobs=4) == 2  # as asked, <= folds
    assert fold_jobs(100_000, TrainConfig(device="cpu", memory_budget_gb=2.0), 5) == 1  # a budget is per fold
    for n, jobs in ((1, 2), (3, 1), (16, 1)):  # torch on more than two threads: one fold at a time
        monkeypatch.setattr(torch, "get_num_threads", lambda n=n: n)
        assert fold_jobs(100_000, cpu, 5) == jobs
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    with pytest.raises(ValueError, match="at least 1"):
        fold_jobs(100, cpu, 5, jobs=0)
    monkeypatch.setattr(kernel_pool, "KERNEL_THREADS", 1)  # one core to use (or asked for one)
    assert fold_jobs(100_000, cpu, 5) == 1
    monkeypatch.setattr(kernel_pool, "KERNEL_THREADS", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fold_jobs(100_000, TrainConfig(device="auto"), 5) == 1  # on the GPU: one at a time
    assert fold_jobs(100_000, TrainConfig(device="auto", optimizer="lazy-adam"), 5) == 2  # lazy-adam: the CPU
