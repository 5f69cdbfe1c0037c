"""The configuration models are the one source of the training settings: the `train` flags,
their --help defaults, the recipes' keys and types and the Python API all follow them, and
bad values are rejected before any data is loaded, naming the flag, or the key and the file."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from recsys_flowadam.cli import build_parser, main, train_cmd
from recsys_flowadam.train.config import (
    SETTINGS,
    ConfigError,
    DataConfig,
    FlowAdamOptions,
    TrainConfig,
    split_settings,
)
from recsys_flowadam.train.recipes import RecipeError, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "models").glob("*.toml"))


def _resolve(argv: list[str]) -> tuple[TrainConfig, DataConfig]:
    return train_cmd.resolve_settings(build_parser().parse_args(["train", *argv]))


def _train_help(capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if the command gets as far as loading data and training."""
    import recsys_flowadam.train.pipeline as pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("bad settings must be rejected before any data is loaded")

    monkeypatch.setattr(pipeline, "train_and_save", refuse)
    monkeypatch.setattr(pipeline, "load_split", refuse)


@pytest.mark.parametrize("line,key", [('refit = "false"', "refit"), ('rank = "20"', "rank"), ("rank = 2.5", "rank"),
                                      ('lr = "0.1"', "lr"), ("patience = true", "patience"),
                                      ('eval-every = "5"', "eval-every"), ("optimizer_options = 3", "optimizer_options"),
                                      ('preset = "Z"', "preset"), ("rank = 0", "rank")])
def test_recipe_value_of_the_wrong_type_or_out_of_bounds_names_key_and_file(tmp_path, capsys, no_training, line, key):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(f'dataset = "synthetic"\n{line}\n')
    with pytest.raises(RecipeError) as exc:
        load_recipe(recipe)
    assert str(recipe) in str(exc.value) and f"'{key}'" in str(exc.value)
    assert isinstance(exc.value, ValueError)
    assert main(["train", "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert str(recipe) in err and key in err


@pytest.mark.parametrize("line,key", [("rnak = 3", "rnak"), ("memory-budget-mb = 3", "memory-budget-mb"),
                                      ("out = 'x'", "out")])
def test_recipe_unknown_key_names_key_and_file(tmp_path, line, key):
    recipe = tmp_path / "unknown.toml"
    recipe.write_text(f'dataset = "synthetic"\n{line}\n')
    with pytest.raises(RecipeError, match=f"unknown setting '{key}'") as exc:
        load_recipe(recipe)
    assert str(recipe) in str(exc.value)


def test_recipe_accepts_dashes_aliases_tables_and_ints_for_floats(tmp_path):
    recipe = tmp_path / "ok.toml"
    recipe.write_text('description = "x"\ndataset = "synthetic"\neval-every = 5\nlr = 1\nmemory_budget = 2\n'
                      'preset = "a"\n[optimizer_options]\nweight-decay = 0.5\n[data_options]\nn-users = 7\n')
    got = load_recipe(recipe)
    assert got == {"dataset": "synthetic", "eval_every": 5, "lr": 1.0, "memory_budget_gb": 2.0, "preset": "a",
                   "optimizer_kwargs": {"weight_decay": 0.5}, "data_options": {"n-users": 7}}
    assert isinstance(got["lr"], float)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_load_into_the_models(path):
    config, data = _resolve(["--recipe", str(path)])
    assert data.dataset and config.optimizer in ("flowadam", "lazy-adam")
    if config.optimizer == "flowadam":  # a FlowAdam recipe pins its preset
        assert config.optimizer_kwargs["mode"] in ("A", "B")
    else:  # lazy-adam steps on mini-batches: the recipe says how large
        assert config.batch_size is not None and not config.optimizer_kwargs


@pytest.mark.parametrize("argv,flag", [(["--rank", "0"], "--rank"), (["--lr", "0"], "--lr"),
                                       (["--patience", "-1"], "--patience"), (["--init-std", "-0.1"], "--init-std"),
                                       (["--min-delta", "nan"], "--min-delta"), (["--min-delta", "inf"], "--min-delta"),
                                       (["--memory-budget", "0"], "--memory-budget"), (["--steps", "0"], "--steps"),
                                       (["--stat-beta", "1"], "--stat-beta"), (["--ode-steps", "0"], "--ode-steps"),
                                       (["--context", "time:0"], "--context"), (["--seed", "-1"], "--seed")])
def test_out_of_bounds_flag_exits_2_naming_the_flag_before_loading_data(capsys, no_training, argv, flag):
    assert main(["train", "--dataset", "synthetic", *argv]) == 2
    err = capsys.readouterr().err
    assert f"error: {flag} must " in err
    assert f"(got {argv[-1]}" in err or f"(got {argv[-1]!r}" in err


def test_conflicting_flags_and_missing_dataset_are_errors_before_loading_data(capsys, no_training):
    assert main(["train", "--dataset", "synthetic", "--representation", "minibatch"]) == 2
    assert "minibatch needs batch_size" in capsys.readouterr().err
    assert main(["train", "--rank", "3"]) == 2
    assert "--dataset is required" in capsys.readouterr().err


def test_help_shows_the_models_defaults(capsys):
    text = _train_help(capsys)
    assert "--rank RANK number of latent factors (default 50)" in text
    assert "--tune, --no-tune" in text and "(default on)" in text
    shown = 0
    for model in (TrainConfig, DataConfig, FlowAdamOptions):
        for name, info in model.__pydantic_fields__.items():
            if isinstance(info.default, (bool, int, float, str)):
                default = ("on" if info.default else "off") if isinstance(info.default, bool) else info.default
                assert f"{info.description} (default {default})" in text, name
                shown += 1
    assert shown >= 20


def test_every_setting_has_a_flag_and_a_description():
    parser = build_parser()
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    train.format_help()  # the train parser adds its flags on first use
    dests = {a.dest: a for a in train._actions}
    for model in (TrainConfig, DataConfig, FlowAdamOptions):
        for name, info in model.__pydantic_fields__.items():
            assert name in dests, name
            assert info.description and info.description in dests[name].help, name
    assert set(SETTINGS) == {f.name for m in (TrainConfig, DataConfig, FlowAdamOptions) for f in dataclasses.fields(m)}


def test_existing_flag_spellings_still_work():
    config, data = _resolve(["--dataset", "synthetic", "--memory-budget", "2", "--no-clip-predictions", "--cp-biases",
                             "--center", "--refit", "--clip-ratings", "--offline", "--optimizer-option", "mode=B",
                             "--data-option", "n-users=3", "--preset", "A", "--ode-tol", "0.01"])
    assert (config.memory_budget_gb, config.clip_predictions, config.cp_biases, config.center, config.refit) == (
        2.0, False, True, True, True)
    assert (data.clip_ratings, data.offline, data.data_options) == (True, True, {"n_users": 3})
    # --optimizer-option is applied after the knob flags, as before
    assert config.optimizer_kwargs == {"mode": "B", "ode_tol": 0.01}
    assert _resolve(["--dataset", "x", "--center", "--no-center", "--no-refit"])[0].center is False


def test_defaults_recipe_flags_precedence(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('dataset = "synthetic"\nrank = 2\nlr = 0.05\npreset = "A"\n[optimizer_options]\nstat_beta = 0.5\n'
                      '[data_options]\nn_users = 60\n')
    config, data = _resolve(["--recipe", str(recipe), "--rank", "4", "--data-option", "n_items=9"])
    assert (config.rank, config.lr, config.eval_every) == (4, 0.05, TrainConfig().eval_every)
    assert config.optimizer_kwargs == {"mode": "A", "stat_beta": 0.5}
    assert data.data_options == {"n_users": 60, "n_items": 9}
    # another optimizer drops the recipe's FlowAdam options; the same one keeps them
    assert _resolve(["--recipe", str(recipe), "--optimizer", "adam"])[0].optimizer_kwargs == {}
    kept = _resolve(["--recipe", str(recipe), "--optimizer", "flowadam", "--ode-clip", "2"])[0]
    assert kept.optimizer_kwargs == {"mode": "A", "stat_beta": 0.5, "ode_clip": 2.0}


def test_split_settings_is_the_python_entry():
    config, data = split_settings({"dataset": "ml-100k", "split": "u1", "rank": 5, "lr": 1, "preset": "B",
                                   "memory-budget": 1, "optimizer_options": {"weight_decay": 0.1}})
    assert (config.rank, config.lr, config.memory_budget_gb) == (5, 1.0, 1.0)
    assert config.optimizer_kwargs == {"mode": "B", "weight_decay": 0.1}
    assert (data.dataset, data.split) == ("ml-100k", "u1")
    for bad, key in [({"dataset": "x", "rank": "5"}, "rank"), ({"dataset": "x", "rnak": 5}, "rnak"),
                     ({"dataset": "x", "refit": "false"}, "refit"), ({"rank": 5}, "dataset"),
                     ({"dataset": "x", "ode-method": "rk5"}, "ode-method")]:
        with pytest.raises(ConfigError, match=key):
            split_settings(bad)
    with pytest.raises(ValueError, match="batch_size"):
        split_settings({"dataset": "x", "representation": "minibatch"})


def test_train_config_python_api_is_unchanged():
    config = TrainConfig(rank=3, lr=0.1, optimizer_kwargs={"mode": "A"})
    assert list(config.to_dict()) == [
        "model", "rank", "init_std", "reg", "bias_reg", "reg_weighting", "loss", "huber_delta", "center", "cp_biases",
        "optimizer", "lr", "optimizer_kwargs", "steps", "epochs", "batch_size", "eval_every", "patience", "min_delta",
        "seed", "device", "representation", "memory_budget_gb", "dtype", "checkpoint_every", "clip_predictions",
        "refit", "tune", "tune_max_ratings"]
    assert dataclasses.replace(config, steps=7, epochs=None).steps == 7
    assert TrainConfig(**config.to_dict()) == config
    assert TrainConfig.DEFAULT_STEPS == 2000 and "DEFAULT_STEPS" not in config.to_dict()
    assert TrainConfig(reg=0.2).effective_bias_reg == 0.2 and TrainConfig(bias_reg=0.0).effective_bias_reg == 0.0
    for bad, field in [({"rank": 0}, "rank"), ({"lr": -1}, "lr"), ({"model": "svd"}, "model"),
                       ({"refit": "false"}, "refit"), ({"representation": "minibatch"}, "batch_size")]:
        with pytest.raises(ValueError, match=field):
            TrainConfig(**bad)


def test_data_settings_is_the_data_model():
    from recsys_flowadam.train.pipeline import DataSettings

    assert DataSettings is DataConfig
    data = DataSettings("ml-100k", "u1", Path("/data"), offline=True)
    assert (data.split, data.data_dir, data.offline, data.data_options, data.context) == (
        "u1", Path("/data"), True, {}, None)


def test_flowadam_choices_match_the_optimizer():
    from recsys_flowadam.optim.flowadam import INJECTIONS, PRESETS
    from recsys_flowadam.optim.ode import METHODS

    assert train_cmd.value_type(SETTINGS["ode_method"][1].annotation)[1] == list(METHODS)
    assert train_cmd.value_type(SETTINGS["injection"][1].annotation)[1] == list(INJECTIONS)
    for mode in PRESETS:
        assert FlowAdamOptions(preset=mode).preset == mode


def test_building_the_cli_stays_light():
    code = ("import sys; from recsys_flowadam.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
