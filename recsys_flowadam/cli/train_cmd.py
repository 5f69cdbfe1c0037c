"""``recsys-flowadam train``: fit a factorization model and write its artifact."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

# documented defaults (argparse defaults are None so a recipe can fill what the command line leaves out)
DEFAULTS: dict[str, Any] = {
    "dataset": None, "model": "biased-mf", "optimizer": "flowadam", "rank": 20, "lr": 0.01, "reg": 0.0,
    "bias_reg": None, "reg_weighting": "uniform", "init_std": 0.1, "loss": "mse", "huber_delta": 1.0,
    "center": None, "cp_biases": False,
    "context": None, "steps": None, "epochs": None, "batch_size": None, "eval_every": 10, "patience": 10,
    "min_delta": 0.0, "split": "random", "seed": 0, "device": "auto", "representation": "auto",
    "memory_budget": None, "dtype": "float32", "data_dir": None, "offline": False, "clip_ratings": False,
    "clip_predictions": True, "out": None, "checkpoint_every": 0, "data_options": {}, "optimizer_options": {},
    "refit": False,
}
# FlowAdam's knobs: CLI flag -> FlowAdam keyword
FLOWADAM_FLAGS = {"preset": "mode", "ode_method": "ode_method", "ode_steps": "ode_steps", "ode_tol": "ode_tol",
                  "ode_clip": "ode_clip", "switch_sensitivity": "switch_sensitivity",
                  "curvature_sensitivity": "curvature_sensitivity", "ode_t_scale": "ode_t_scale",
                  "momentum_blend_gamma": "momentum_blend_gamma", "injection": "injection",
                  "warmup_steps": "warmup_steps", "stat_beta": "stat_beta"}


def _kv(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for cast in (int, float):
        try:
            return key.replace("-", "_"), cast(value)
        except ValueError:
            pass
    return key.replace("-", "_"), {"true": True, "false": False}.get(value.lower(), value)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a model and write its artifact",
        description="Train mf / biased-mf / cp on a dataset split with FlowAdam or a baseline; print held-out "
                    "RMSE/MAE and write the artifact folder (model.safetensors, model.json, metrics.jsonl). "
                    "Objective: mean loss over training ratings + reg*(||U||^2+||V||^2) + bias_reg*||b||^2, "
                    "the same for every optimizer.",
        argument_default=None)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="dataset name (ml-100k, jester-4, synthetic, csv:PATH, ...)")
    g.add_argument("--split", help="split spec: random[:TR,VA,TE], u1..u5, ua, ub, kfold:K:F, temporal, ... "
                                   "(default random)")
    g.add_argument("--data-dir", help="data root (default $RECSYS_FLOWADAM_DATA or the user cache)")
    g.add_argument("--data-option", dest="data_option", action="append", type=_kv, metavar="KEY=VALUE",
                   help="loader option, repeatable (e.g. n_users=300 for synthetic)")
    g.add_argument("--offline", action="store_const", const=True, help="never download")
    g.add_argument("--clip-ratings", action="store_const", const=True,
                   help="clip training data to the rating scale (Jester-4 has values outside it)")
    g.add_argument("--context", help="cp third mode for MovieLens: time:N (N equal-count time bins)")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=["mf", "biased-mf", "cp"], help="default biased-mf")
    g.add_argument("--rank", type=int, help="default 20")
    g.add_argument("--init-std", type=float, help="factor init N(0, s^2) (default 0.1, the paper's)")
    g.add_argument("--reg", type=float, help="L2 weight on the factors (default 0)")
    g.add_argument("--bias-reg", type=float, help="L2 weight on the biases (default: --reg)")
    g.add_argument("--reg-weighting", choices=["uniform", "frequency"],
                   help="uniform L2 (default) or rows weighted by their share of ratings (weighted-lambda)")
    g.add_argument("--loss", choices=["mse", "huber"], help="default mse")
    g.add_argument("--huber-delta", type=float, help="Huber threshold (default 1.0)")
    g.add_argument("--center", action=argparse.BooleanOptionalAction,
                   help="subtract the training mean (default: on for models with biases)")
    g.add_argument("--cp-biases", action="store_const", const=True, help="cp with user/item biases")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", help="flowadam, adam, adamw, sgd, lion, adabelief, lbfgs (default flowadam)")
    g.add_argument("--lr", type=float, help="learning rate (default 0.01)")
    g.add_argument("--steps", type=int, help="max optimizer steps (default 2000 when no --epochs)")
    g.add_argument("--epochs", type=int, help="max passes over the data")
    g.add_argument("--batch-size", type=int, help="mini-batch training (default: full batch)")
    g.add_argument("--eval-every", type=int, help="validation every N steps (default 10)")
    g.add_argument("--patience", type=int, help="early stop after N evaluations without improvement; "
                                                "0 = never (default 10); the best parameters are kept")
    g.add_argument("--min-delta", type=float, help="improvement needed to reset patience (default 0)")
    g.add_argument("--representation", choices=["auto", "dense", "sparse", "minibatch"],
                   help="how to hold the training data (default auto: by --memory-budget)")
    g.add_argument("--refit", action=argparse.BooleanOptionalAction,
                   help="after early stopping, retrain on train+val for the best step count (default off)")
    g.add_argument("--memory-budget", type=float, help="GiB for the full-batch representation")
    g.add_argument("--dtype", choices=["float32", "float64"])
    g.add_argument("--optimizer-option", dest="optimizer_option", action="append", type=_kv, metavar="KEY=VALUE",
                   help="extra optimizer keyword, repeatable (e.g. weight_decay=0.01)")
    g = p.add_argument_group("FlowAdam")
    g.add_argument("--preset", help="FlowAdam preset (mode): A, B, ...")
    g.add_argument("--ode-method", help="dopri5, euler, heun, rk4")
    g.add_argument("--ode-steps", type=int)
    g.add_argument("--ode-tol", type=float)
    g.add_argument("--ode-clip", type=float)
    g.add_argument("--ode-t-scale", type=float)
    g.add_argument("--switch-sensitivity", type=float)
    g.add_argument("--curvature-sensitivity", type=float)
    g.add_argument("--momentum-blend-gamma", type=float)
    g.add_argument("--injection")
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--stat-beta", type=float)
    g = p.add_argument_group("run")
    g.add_argument("--recipe", help="TOML recipe (models/*.toml); explicit flags override it (a different "
                                    "--optimizer also drops the recipe's [optimizer_options])")
    g.add_argument("--seed", type=int, help="fixes init, split and shuffling (default 0)")
    g.add_argument("--device", help="auto (CUDA when available), cpu, cuda, cuda:N (default auto)")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 is often "
                                              "faster on a small, shared machine)")
    g.add_argument("--out", help="artifact folder (default models/<dataset>-<model>-<optimizer>/)")
    g.add_argument("--checkpoint-every", type=int, help="write <out>/checkpoint.safetensors every N steps")
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.safetensors")
    g.add_argument("--no-clip-predictions", dest="clip_predictions", action="store_const", const=False,
                   help="evaluate raw predictions (default: clipped to the rating scale)")
    g.add_argument("--json", action="store_true", help="print one JSON object; no progress bar")
    g = p.add_argument_group("distributed (under torchrun --nproc_per_node=N -m recsys_flowadam train ...)")
    g.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                   help="bound on the rendezvous and on every collective: a dead or stuck rank becomes an "
                        "error after this long instead of a hang (default 300)")
    p.set_defaults(func=handle)


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults <- recipe <- explicit flags."""
    from recsys_flowadam.cli import CLIError
    from recsys_flowadam.train.recipes import RecipeError, load_recipe

    settings = dict(DEFAULTS)
    settings["optimizer_options"] = {}
    settings["data_options"] = {}
    if args.recipe:
        allowed = set(DEFAULTS) | set(FLOWADAM_FLAGS)
        try:
            recipe = load_recipe(args.recipe, allowed)
        except RecipeError as exc:
            raise CLIError(str(exc)) from None
        for key, value in recipe.items():
            if key in FLOWADAM_FLAGS:
                settings["optimizer_options"][FLOWADAM_FLAGS[key]] = value
            elif key in ("optimizer_options", "data_options"):
                settings[key].update(value)
            else:
                settings[key] = value
    if args.optimizer is not None and args.optimizer != settings["optimizer"]:
        settings["optimizer_options"] = {}  # the recipe's options belong to the recipe's optimizer
    for key, value in vars(args).items():
        if value is None or key in ("func", "recipe", "json", "resume", "command", "data_option", "threads",
                                    "optimizer_option", "dist_timeout"):
            continue
        if key in FLOWADAM_FLAGS:
            settings["optimizer_options"][FLOWADAM_FLAGS[key]] = value
        else:
            settings[key] = value
    settings["data_options"].update(dict(args.data_option or []))
    settings["optimizer_options"].update(dict(args.optimizer_option or []))
    if not settings["dataset"]:
        raise CLIError("--dataset is required (or a --recipe that names one)")
    return settings


def handle(args: argparse.Namespace) -> int:
    from recsys_flowadam.cli import CLIError

    settings = resolve_settings(args)
    import torch

    threads_before = torch.get_num_threads()
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    from recsys_flowadam.train import distributed

    try:
        if not distributed.launched_distributed():
            return _run(args, settings)
        # one process per rank (torchrun): join the group, train, leave it
        try:
            timeout = distributed.DEFAULT_TIMEOUT_S if args.dist_timeout is None else args.dist_timeout
            dctx = distributed.init_from_env(str(settings["device"]), timeout)
        except (ValueError, distributed.PeerLostError) as exc:
            raise CLIError(str(exc)) from None
        try:
            return _run(args, settings, quiet=not dctx.is_main)
        except CLIError as exc:
            # After a failed collective the process group cannot be torn down reliably: destroying
            # it, or the interpreter's own exit, can hang or abort (gloo's threads raised SIGABRT
            # at exit after a peer hung). Report and leave at once; torchrun sees the exit status.
            print(f"recsys-flowadam: error: {exc}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(2)
        finally:
            distributed.shutdown()
    finally:
        torch.set_num_threads(threads_before)  # in-process callers (tests) keep their setting


def _run(args: argparse.Namespace, settings: dict[str, Any], quiet: bool = False) -> int:
    """Train and print the summary (``quiet``: print nothing, for ranks other than 0)."""
    from recsys_flowadam.cli import CLIError

    from recsys_flowadam.train.distributed import PeerLostError
    from recsys_flowadam.train.config import TrainConfig
    from recsys_flowadam.train.pipeline import DataSettings, train_and_save
    from recsys_flowadam.train.trainer import NonFiniteLossError

    try:
        _check_types(settings)
        config = TrainConfig(
            model=settings["model"], rank=settings["rank"], init_std=settings["init_std"], reg=settings["reg"],
            bias_reg=settings["bias_reg"], reg_weighting=settings["reg_weighting"], loss=settings["loss"],
            huber_delta=settings["huber_delta"],
            center=settings["center"], cp_biases=settings["cp_biases"], optimizer=settings["optimizer"],
            lr=settings["lr"], optimizer_kwargs=settings["optimizer_options"], steps=settings["steps"],
            epochs=settings["epochs"], batch_size=settings["batch_size"], eval_every=settings["eval_every"],
            patience=settings["patience"], min_delta=settings["min_delta"], seed=settings["seed"],
            device=settings["device"], representation=settings["representation"],
            memory_budget_gb=settings["memory_budget"], dtype=settings["dtype"],
            checkpoint_every=settings["checkpoint_every"], clip_predictions=settings["clip_predictions"],
            refit=settings["refit"])
        data = DataSettings(dataset=settings["dataset"], split=settings["split"], data_dir=settings["data_dir"],
                            offline=settings["offline"], clip_ratings=settings["clip_ratings"],
                            data_options=settings["data_options"], context=settings["context"])
        summary = train_and_save(data, config, settings["out"], resume=args.resume,
                                 progress=not args.json and not quiet)
    # ValueError: bad option values, unknown optimizer/kwargs, model/data mismatch, and the
    # checkpoint, recipe and data errors (all ValueError subclasses)
    except (NonFiniteLossError, PeerLostError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    if quiet:
        return 0
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    return 0


_TYPES = {"rank": int, "steps": int, "epochs": int, "batch_size": int, "eval_every": int, "patience": int,
          "seed": int, "checkpoint_every": int, "lr": float, "reg": float, "bias_reg": float, "init_std": float,
          "huber_delta": float, "min_delta": float, "memory_budget": float, "model": str, "optimizer": str,
          "split": str, "dataset": str, "loss": str, "representation": str, "dtype": str}


def _check_types(settings: dict[str, Any]) -> None:
    """Recipe values have the option's type (command-line values are converted by argparse)."""
    for key, kind in _TYPES.items():
        value = settings.get(key)
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else (
            isinstance(value, kind) and not isinstance(value, bool))
        if not ok:
            raise ValueError(f"setting '{key}' must be {kind.__name__}, got {value!r}")


def _print_summary(s: dict[str, Any]) -> None:
    def f(x: Any) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    ranks = f" x {s['world_size']} ranks" if s.get("world_size", 1) > 1 else ""
    print(f"{s['dataset']} ({s['split']}, seed {s['seed']}): {s['model']} + {s['optimizer']} on "
          f"{s['device']}{ranks} [{s['representation']}]", file=sys.stdout)
    print(f"  ratings: train {s['n_train']:,}  val {s['n_val']:,}  test {s['n_test']:,}")
    print(f"  steps {s['steps']} (best {s['best_step']}, {s['stopped']}), grad evals {s['grad_evals']}, "
          f"ODE triggers {s['ode_triggers']}, train {s['train_seconds']:.2f} s, total {s['total_seconds']:.2f} s")
    print(f"  val RMSE {f(s['val_rmse'])}   test RMSE {f(s['test_rmse'])}   test MAE {f(s['test_mae'])}")
    print(f"  artifact: {s['out']}")
