"""`train` and `evaluate` end to end through the command line, on generated data; a run
killed with SIGKILL and resumed ends with exactly the metrics of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recsys_flowadam.cli import main

SYN = ["--dataset", "synthetic", "--data-option", "n_users=150", "--data-option", "n_items=90",
       "--data-option", "rank=3", "--data-option", "density=0.3", "--data-option", "noise=0.1",
       "--split", "random", "--rank", "3", "--model", "biased-mf", "--reg", "0.0001", "--lr", "0.03",
       "--device", "cpu", "--threads", "1"]
TRAIN_KEYS = {"dataset", "model", "optimizer", "split", "seed", "n_train", "n_val", "n_test", "val_rmse",
              "test_rmse", "test_mae", "steps", "grad_evals", "ode_triggers", "train_seconds", "device", "out"}


def _run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_train_writes_artifact_and_evaluate_agrees(tmp_path, capsys):
    from recsys_flowadam.artifact import load_artifact

    out = tmp_path / "art"
    summary = _run_json(capsys, ["train", *SYN, "--optimizer", "flowadam", "--steps", "60",
                                 "--out", str(out), "--json"])
    assert TRAIN_KEYS <= set(summary)
    assert summary["out"] == str(out) and summary["steps"] <= 120
    assert summary["n_train"] + summary["n_val"] + summary["n_test"] > 0
    assert summary["test_rmse"] < 0.5  # noise 0.1, signal variance ~1: a fit model is far below 1
    art = load_artifact(out)
    assert art.meta.model_type == "biased-mf" and art.meta.rank == 3
    assert art.meta.metrics["test_rmse"] == pytest.approx(summary["test_rmse"])
    assert art.meta.optimizer.name == "flowadam" and "ode_triggers" in art.meta.optimizer.diagnostics
    assert art.meta.optimizer.diagnostics["preset"] == "E"  # the default preset is recorded, though not given
    assert art.meta.prediction_offset == pytest.approx(art.meta.global_mean)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert history and {"step", "train_loss", "val_rmse", "grad_evals"} <= set(history[0])
    ev = _run_json(capsys, ["evaluate", str(out), "--json"])
    assert ev["n"] == summary["n_test"]
    assert ev["rmse"] == pytest.approx(summary["test_rmse"], rel=1e-6)
    assert ev["mae"] == pytest.approx(summary["test_mae"], rel=1e-6)
    assert {"cold_users", "cold_items"} <= set(ev)


def test_recipe_is_read_and_flags_override_it(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "mf"\nrank = 2\noptimizer = "flowadam"\nlr = 0.05\nsteps = 15\neval-every = 5\n'
                      'refit = false\n'
                      'dataset = "synthetic"\n[data_options]\nn_users = 60\nn_items = 40\nrank = 2\n'
                      'density = 0.4\n[optimizer_options]\nmode = "A"\n')
    out = tmp_path / "a"
    s = _run_json(capsys, ["train", "--recipe", str(recipe), "--rank", "4", "--out", str(out), "--json"])
    assert (s["model"], s["optimizer"], s["steps"]) == ("mf", "flowadam", 15)
    meta = json.loads((out / "model.json").read_text())
    assert meta["rank"] == 4 and meta["train_config"]["lr"] == 0.05
    assert meta["optimizer"]["params"] == {"lr": 0.05, "mode": "A"}
    # another optimizer on the command line drops the recipe's FlowAdam options
    s = _run_json(capsys, ["train", "--recipe", str(recipe), "--optimizer", "adam", "--out", str(out), "--json"])
    assert s["optimizer"] == "adam"
    assert json.loads((out / "model.json").read_text())["optimizer"]["params"] == {"lr": 0.05}
    bad = tmp_path / "bad.toml"
    bad.write_text("rnak = 3\n")
    assert main(["train", "--recipe", str(bad), "--dataset", "synthetic"]) == 2
    assert "rnak" in capsys.readouterr().err


def test_user_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["train", *SYN, "--optimizer", "nosuch", "--steps", "2", "--out", str(tmp_path / "x")]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert main(["train", *SYN, "--optimizer", "sgd", "--lr", "100000", "--steps", "300",
                 "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "not finite" in err and "step" in err
    assert not (tmp_path / "y" / "model.json").exists()
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_default_out_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = _run_json(capsys, ["train", *SYN, "--optimizer", "adam", "--steps", "5", "--json"])
    assert Path(s["out"]) == Path("models/synthetic-biased-mf-adam")
    assert (tmp_path / "models/synthetic-biased-mf-adam/model.safetensors").is_file()


_CHILD = """
import os, signal, sys
from recsys_flowadam.cli import train_cmd
import recsys_flowadam.train.pipeline as pipeline
real = pipeline.train_model
def killing_train_model(*a, **kw):
    def on_step(step):
        if step == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
    kw["on_step"] = on_step
    return real(*a, **kw)
pipeline.train_model = killing_train_model
from recsys_flowadam.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("extra", [["--optimizer", "flowadam"], ["--optimizer", "adam", "--batch-size", "500"]])
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, capsys, extra):
    args = [*SYN, *extra, "--steps", "50", "--eval-every", "10", "--patience", "0", "--checkpoint-every", "20"]
    killed = tmp_path / "killed"
    env = {**os.environ, "KILL_AT": "33", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, "train", *args, "--out", str(killed), "--json"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (killed / "checkpoint.safetensors").is_file() and not (killed / "model.json").exists()
    resumed = _run_json(capsys, ["train", *args, "--out", str(killed), "--resume", "--json"])
    straight = _run_json(capsys, ["train", *args, "--out", str(tmp_path / "straight"), "--json"])
    assert resumed["resumed_from"] == 20
    for key in ("val_rmse", "test_rmse", "test_mae", "steps", "grad_evals", "ode_triggers", "best_step"):
        assert resumed[key] == straight[key], key
    assert (killed / "model.json").is_file()


@pytest.mark.real_data
def test_ml100k_u1_trains_and_evaluates(real_data_dir, tmp_path, capsys):
    out = tmp_path / "ml"
    s = _run_json(capsys, ["train", "--dataset", "ml-100k", "--data-dir", str(real_data_dir), "--offline",
                           "--split", "u1", "--model", "biased-mf", "--optimizer", "adam", "--rank", "10",
                           "--reg", "0.0003", "--bias-reg", "0", "--reg-weighting", "uniform", "--no-refit",
                           "--lr", "0.03", "--steps", "100", "--threads", "1", "--out", str(out), "--json"])
    assert s["n_train"] + s["n_val"] == 80_000 and s["n_test"] == 20_000
    assert s["test_rmse"] < 1.0  # the global-mean baseline is ~1.15 on u1
    from recsys_flowadam.artifact import load_artifact

    meta = load_artifact(out).meta
    assert meta.dataset.source_files and meta.item_titles and meta.item_titles[0].startswith("Toy Story")
    assert len(meta.user_ids) == 943 and len(meta.item_ids) == 1682
    ev = _run_json(capsys, ["evaluate", str(out), "--data-dir", str(real_data_dir), "--offline", "--json"])
    assert ev["rmse"] == pytest.approx(s["test_rmse"], rel=1e-6) and ev["warnings"] == []


@pytest.mark.real_data
def test_jester4_paper_recipe_runs(real_data_dir, tmp_path, capsys):
    recipe = Path(__file__).resolve().parents[1] / "models" / "jester-4-mf-paper.toml"
    s = _run_json(capsys, ["train", "--recipe", str(recipe), "--data-dir", str(real_data_dir), "--offline",
                           "--steps", "150", "--lr", "0.05", "--threads", "1", "--out", str(tmp_path / "j"), "--json"])
    assert (s["dataset"], s["model"], s["split"]) == ("jester-4", "mf", "random:0.7,0.1,0.2")
    assert s["n_train"] + s["n_val"] + s["n_test"] == 106_489
    assert s["representation"] == "sparse" and s["grad_evals"] >= 150  # 8.7% observed: CSR is faster
    from recsys_flowadam.data import load_dataset, split_ratings

    test = split_ratings(load_dataset("jester-4", real_data_dir, offline=True), "random:0.7,0.1,0.2", 0).test
    assert len(test) == s["n_test"]
    zero_rmse = float(np.sqrt(np.mean(np.clip(test.values, -10, 10) ** 2)))  # what the N(0, 0.01) start predicts
    print("jester-4 150 steps:", s["test_rmse"], "predicting 0:", zero_rmse)
    assert s["test_rmse"] < 0.97 * zero_rmse


def test_refit_trains_on_train_plus_val(tmp_path, capsys):
    from recsys_flowadam.artifact import load_artifact

    args = ["train", *SYN, "--optimizer", "adam", "--steps", "60", "--eval-every", "5", "--patience", "3", "--json"]
    plain = _run_json(capsys, [*args, "--no-refit", "--out", str(tmp_path / "plain")])
    refit = _run_json(capsys, [*args, "--refit", "--out", str(tmp_path / "refit")])
    assert refit["refit"] and not plain["refit"]
    assert refit["val_rmse"] == plain["val_rmse"]  # the first (early-stopping) run is the same
    # the refit: best_step steps, and one objective evaluation of its final parameters
    assert refit["grad_evals"] == plain["grad_evals"] + plain["best_step"] + 1
    art = load_artifact(tmp_path / "refit")
    assert int(art.tensors["train_indptr"][-1]) == refit["n_train"] + refit["n_val"]
    assert art.meta.metrics["n_train_refit"] == refit["n_train"] + refit["n_val"]
    assert refit["test_rmse"] != plain["test_rmse"]


def test_cp_on_a_synthetic_tensor_end_to_end(tmp_path, capsys):
    from recsys_flowadam.artifact import load_artifact

    out = tmp_path / "cp"
    s = _run_json(capsys, ["train", "--dataset", "synthetic", "--data-option", "n_users=60", "--data-option",
                           "n_items=40", "--data-option", "n_contexts=5", "--data-option", "rank=2",
                           "--data-option", "density=0.3", "--model", "cp", "--rank", "2", "--center",
                           "--optimizer", "adam", "--lr", "0.03", "--steps", "100", "--threads", "1",
                           "--out", str(out), "--json"])
    art = load_artifact(out)
    assert art.meta.model_type == "cp" and art.meta.n_contexts == 5
    assert art.tensors["context_factors"].shape == (5, 2)
    assert s["test_rmse"] < 0.5  # noise 0.1 on a unit-scale rank-2 tensor
    ev = _run_json(capsys, ["evaluate", str(out), "--json"])
    assert ev["rmse"] == pytest.approx(s["test_rmse"], rel=1e-6)


def test_out_holding_other_files_is_refused_before_training(tmp_path, capsys, monkeypatch):
    import recsys_flowadam.train.pipeline as pipeline

    target = tmp_path / "thesis"
    (target / "notes").mkdir(parents=True)
    (target / "paper.tex").write_text("draft")
    (target / "notes" / "a.txt").write_text("keep")
    monkeypatch.setattr(pipeline, "load_split", lambda *a, **k: pytest.fail("data loaded before the check"))
    assert main(["train", *SYN, "--steps", "5", "--out", str(target)]) == 2
    assert "not an artifact's (notes/, paper.tex)" in capsys.readouterr().err
    assert (target / "paper.tex").read_text() == "draft" and (target / "notes" / "a.txt").read_text() == "keep"
    monkeypatch.chdir(target)
    assert main(["train", *SYN, "--steps", "5", "--out", "."]) == 2
    assert "current folder" in capsys.readouterr().err


def test_a_failed_save_keeps_the_trained_model(tmp_path, capsys, monkeypatch):
    import recsys_flowadam.artifact.files as files
    from recsys_flowadam.artifact import load_artifact

    real_move = files._move_into_place

    def full_disk_for_out(tmp, directory):
        if directory.name == "out":
            raise OSError(28, "No space left on device")
        return real_move(tmp, directory)

    monkeypatch.setattr(files, "_move_into_place", full_disk_for_out)
    assert main(["train", *SYN, "--optimizer", "adam", "--steps", "5", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "saved to" in err
    rescued = [p for p in tmp_path.iterdir() if p.name.startswith("out.unsaved-")]
    assert len(rescued) == 1 and load_artifact(rescued[0]).meta.model_type == "biased-mf"
    assert (rescued[0] / "metrics.jsonl").is_file()


@pytest.mark.parametrize("extra,message", [
    (["--rank", "1000000000"], "needs about .* for the parameters alone"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda, cuda:N or mps"),
    (["--optimizer-option", "betas=2"], "betas must be a pair of numbers"),
    (["--min-delta", "nan"], "--min-delta must be a finite number"),
    (["--init-std", "-1"], "--init-std must be greater than or equal to 0"),
    (["--model", "cp"], "--model cp needs a third mode.*--context time:N"),
])
def test_bad_settings_give_one_line_errors(tmp_path, capsys, extra, message):
    import re

    assert main(["train", *SYN, "--steps", "2", "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_settings_are_checked_before_torch_is_imported(tmp_path):
    """A bad flag or a missing recipe is reported at once, not after torch's start-up."""
    code = ("import sys; from recsys_flowadam.cli import main; "
            f"rc = main(['train', '--dataset', 'ml-100k', {{}}]); assert 'torch' not in sys.modules, 'torch'; "
            "sys.exit(rc)")
    for flag in ("'--rank', '-1'", f"'--recipe', {str(tmp_path / 'missing.toml')!r}"):
        done = subprocess.run([sys.executable, "-c", code.format(flag)], capture_output=True, text=True)
        assert done.returncode == 2, done.stderr
        assert "recsys-flowadam: error:" in done.stderr
