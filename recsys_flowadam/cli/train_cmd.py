"""``recsys-flowadam train``: fit a factorization model and write its artifact.

Every setting flag is generated from the configuration models of
``recsys_flowadam.train.config`` (``--field-name``; type, choices, help and the default shown
in ``--help`` come from the field); only the run options (``--recipe``, ``--threads``,
``--out``, ``--resume``, ``--json``, ``--dist-timeout``) are written here. The flags' argparse
defaults are None, so that the precedence is: model defaults <- recipe <- explicit flags.
Importing the models imports ``recsys_flowadam.train`` (and so torch), hence the flags are
added on the ``train`` parser's first use: building the whole CLI (``data list``) stays light.
``cv`` shares the setting flags, the recipe and the thread handling through
:func:`add_setting_arguments`, :func:`add_recipe_arguments`, :func:`resolve_settings`,
:func:`torch_threads` and :func:`add_lazy_parser`.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, Callable, Collection, Iterator, Literal, NoReturn, Union, get_args, get_origin

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

    from recsys_flowadam.train.config import DataConfig, TrainConfig

# flag spellings that differ from --field-name; the first is the one error messages name
FLAGS: dict[str, tuple[str, ...]] = {
    "memory_budget_gb": ("--memory-budget", "--memory-budget-gb"),
    "data_options": ("--data-option",),
    "optimizer_kwargs": ("--optimizer-option",),
}
DESCRIPTION = (
    "Train mf / biased-mf / cp on a dataset split with FlowAdam or a baseline; print held-out RMSE/MAE and "
    "write the artifact folder (model.safetensors, model.json, metrics.jsonl). Objective: mean loss over "
    "training ratings + reg*(||U||^2+||V||^2) + bias_reg*||b||^2, the same for every optimizer.")


def setting_flags(name: str) -> tuple[str, ...]:
    """The command-line spellings of setting ``name``."""
    return FLAGS.get(name, ("--" + name.replace("_", "-"),))


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


def value_type(annotation: Any) -> tuple[type, list[str] | None]:
    """``(argparse type, choices)`` of a field's annotation: ``X | None`` as X, Literal as
    str with its choices, ``dict[...]`` as dict, anything else not int/float/bool as str."""
    members = [annotation]
    if get_origin(annotation) in (Union, UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
    first = members[0]
    if get_origin(first) is Annotated:
        first = get_args(first)[0]
    if get_origin(first) is Literal:
        return str, [str(c) for c in get_args(first)]
    if get_origin(first) is dict:
        return dict, None
    return (first if first in (int, float, bool) else str), None


def help_text(info: FieldInfo) -> str:
    """The field's description plus its default as the model holds it ("(default 20)")."""
    from pydantic_core import PydanticUndefined

    text = info.description or ""
    if info.is_required():
        text += " (required, here or in the recipe)"
    elif info.default is not None and info.default is not PydanticUndefined:
        shown = ("on" if info.default else "off") if isinstance(info.default, bool) else info.default
        text += f" (default {shown})"
    return text.replace("%", "%%")


def _argument_spec(info: FieldInfo) -> dict[str, Any]:
    kind, choices = value_type(info.annotation)
    spec: dict[str, Any] = {"help": help_text(info)}
    if kind is bool:
        spec["action"] = argparse.BooleanOptionalAction
    elif kind is dict:
        spec.update(action="append", type=_kv, metavar="KEY=VALUE", help=spec["help"] + "; repeatable")
    else:
        spec.update(type=kind, choices=choices)
    return spec


def add_setting_arguments(p: argparse.ArgumentParser, *, exclude: Collection[str] = ()) -> None:
    """One flag per setting of the models (those named in ``exclude`` left out), grouped by model:
    the settings every training command (``train``, ``cv``) shares."""
    from recsys_flowadam.train.config import DataConfig, FlowAdamOptions, TrainConfig

    for title, model in (("data", DataConfig), ("training", TrainConfig),
                         ("FlowAdam (unset: the preset's value or FlowAdam's default)", FlowAdamOptions)):
        group = p.add_argument_group(title)
        for name, info in model.__pydantic_fields__.items():
            if name not in exclude:
                group.add_argument(*setting_flags(name), dest=name, **_argument_spec(info))


def add_recipe_arguments(g: argparse._ArgumentGroup) -> None:
    """``--recipe`` and ``--threads``, which :func:`resolve_settings` and :func:`torch_threads` read."""
    g.add_argument("--recipe", help="TOML recipe (models/*.toml); explicit flags override it (a different "
                                    "--optimizer also drops the recipe's [optimizer_options])")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 is often "
                                              "faster on a small, shared machine)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``train`` flags: one per setting of the models, then the run options."""
    add_setting_arguments(p)
    g = p.add_argument_group("run")
    add_recipe_arguments(g)
    g.add_argument("--out", help="artifact folder (default models/<dataset>-<model>-<optimizer>/)")
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.safetensors")
    g.add_argument("--json", action="store_true", help="print one JSON object; no progress bar")
    g = p.add_argument_group("distributed (under torchrun --nproc_per_node=N -m recsys_flowadam train ...)")
    g.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                   help="bound on the rendezvous and on every collective: a dead or stuck rank becomes an "
                        "error after this long instead of a hang (default 300)")


class LazyParser(argparse.ArgumentParser):
    """A sub-command parser whose arguments ``populate(parser)`` adds on its first use (see the
    module doc: the setting flags need the configuration models, hence torch)."""

    populate: Callable[[argparse.ArgumentParser], None] | None = None

    def _populate(self) -> None:
        populate, self.populate = self.populate, None
        if populate is not None:
            populate(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._populate()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._populate()
        return super().format_usage()

    def format_help(self) -> str:
        self._populate()
        return super().format_help()


def add_lazy_parser(subparsers: argparse._SubParsersAction, name: str,
                    populate: Callable[[argparse.ArgumentParser], None], **kwargs: Any) -> argparse.ArgumentParser:
    """``subparsers.add_parser(name, **kwargs)`` whose arguments ``populate`` adds when it is first used."""
    p = subparsers.add_parser(name, argument_default=None, **kwargs)
    if type(p) is argparse.ArgumentParser:
        p.__class__ = LazyParser  # same layout; adds its arguments when first used
        p.populate = populate  # type: ignore[attr-defined]
    else:
        populate(p)
    return p


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_lazy_parser(subparsers, "train", add_arguments, help="train a model and write its artifact",
                        description=DESCRIPTION)
    p.set_defaults(func=handle)


def _command_line_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, checked (bounds), named as fields; ConfigError naming the flag."""
    from recsys_flowadam.train.config import SETTINGS, check_setting

    values: dict[str, Any] = {}
    # dict settings last: --optimizer-option overrides the FlowAdam knob flags
    for name in sorted(SETTINGS, key=lambda n: value_type(SETTINGS[n][1].annotation)[0] is dict):
        value = getattr(args, name, None)
        if value is not None:
            value = dict(value) if isinstance(value, list) else value
            values[name] = check_setting(name, value, where=setting_flags(name)[0])
    return values


def resolve_settings(args: argparse.Namespace) -> tuple[TrainConfig, DataConfig]:
    """Model defaults <- recipe <- explicit flags, validated into ``(TrainConfig, DataConfig)``
    before any heavy work. A different ``--optimizer`` drops the recipe's optimizer options."""
    from recsys_flowadam.cli import CLIError
    from recsys_flowadam.train.config import (SETTINGS, ConfigError, build_configs, flowadam_keyword,
                                              merge_settings)
    from recsys_flowadam.train.recipes import load_recipe

    try:
        recipe = load_recipe(args.recipe) if args.recipe else {}
        given = _command_line_settings(args)
        recipe_optimizer = recipe.get("optimizer", SETTINGS["optimizer"][1].default)
        if given.get("optimizer", recipe_optimizer) != recipe_optimizer:
            # the recipe's options belong to the recipe's optimizer
            recipe = {k: v for k, v in recipe.items() if k != "optimizer_kwargs" and flowadam_keyword(k) is None}
        settings: dict[str, Any] = {}
        merge_settings(settings, recipe)
        merge_settings(settings, given)
        if not settings.get("dataset"):
            raise CLIError("--dataset is required (or a --recipe that names one)")
        return build_configs(settings)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (None: torch's choice); the previous count
    is restored afterwards, so in-process callers (tests) keep their setting. ``--threads`` below 1
    is a CLIError raised before torch is imported."""
    from recsys_flowadam.cli import CLIError

    if threads is not None and threads < 1:
        raise CLIError("--threads must be >= 1")
    import torch

    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads_before)


def handle(args: argparse.Namespace) -> int:
    config, data = resolve_settings(args)
    with torch_threads(args.threads):
        return _handle(args, config, data)


def _handle(args: argparse.Namespace, config: TrainConfig, data: DataConfig) -> int:
    """Train in this process, or as one rank of a torchrun group."""
    from recsys_flowadam.cli import CLIError
    from recsys_flowadam.train import distributed

    if not distributed.launched_distributed():
        return _run(args, config, data)
    # one process per rank (torchrun): join the group, train, leave it
    try:
        timeout = distributed.DEFAULT_TIMEOUT_S if args.dist_timeout is None else args.dist_timeout
        dctx = distributed.init_from_env(config.device, timeout)
    except (ValueError, distributed.PeerLostError) as exc:
        raise CLIError(str(exc)) from None
    try:
        # training's last collective is behind every rank here; rank 0 alone scores and saves, so
        # the others leave without waiting for it (no timeout can cut its saving short)
        status = _run(args, config, data, quiet=not dctx.is_main)
    except (CLIError, distributed.PeerLostError) as exc:
        # After a failed collective the process group cannot be torn down reliably: destroying
        # it, or the interpreter's own exit, can hang or abort (gloo's threads raised SIGABRT
        # at exit after a peer hung). Report and leave at once; torchrun sees the exit status.
        _leave(2, f"recsys-flowadam: error: {exc}")
    except BaseException:
        distributed.shutdown()
        raise
    # Even after a clean run, tearing gloo down (the group's destruction, or interpreter finalization
    # with its threads around) can abort: rank 1 of a successful 2-rank run died with SIGABRT,
    # "terminate called without an active exception", once on CI while rank 0 was still saving.
    # Everything this rank had to do is done and flushed: end the process, and let the system close
    # its connections, without destroying the group first.
    _leave(status)


def _leave(status: int, message: str | None = None) -> NoReturn:
    """Flush, print ``message`` to stderr, and end the process with ``status`` at once."""
    if message:
        print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _run(args: argparse.Namespace, config: TrainConfig, data: DataConfig, quiet: bool = False) -> int:
    """Train and print the summary (``quiet``: print nothing, for ranks other than 0)."""
    from recsys_flowadam.cli import CLIError
    from recsys_flowadam.train.distributed import PeerLostError
    from recsys_flowadam.train.pipeline import train_and_save
    from recsys_flowadam.train.trainer import NonFiniteLossError

    try:
        summary = train_and_save(data, config, args.out, resume=args.resume, progress=not args.json and not quiet)
    # ValueError: unknown optimizer/kwargs, model/data mismatch, and the checkpoint and data
    # errors (all ValueError subclasses)
    except (NonFiniteLossError, PeerLostError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    if quiet:
        return 0
    if args.json:
        from recsys_flowadam.cli.output import print_json

        print_json(summary)
    else:
        _print_summary(summary)
    return 0


def _print_summary(s: dict[str, Any]) -> None:
    def f(x: Any) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    ranks = f" x {s['world_size']} ranks" if s.get("world_size", 1) > 1 else ""
    print(f"{s['dataset']} ({s['split']}, seed {s['seed']}): {s['model']} + {s['optimizer']} on "
          f"{s['device']}{ranks} [{s['representation']}]", file=sys.stdout)
    print(f"  ratings: train {s['n_train']:,}  val {s['n_val']:,}  test {s['n_test']:,}")
    if s.get("path_choice"):
        choice = s["path_choice"]
        batch = f", batches of {choice['batch_size']:,}" if choice.get("batch_size") else ""
        print(f"  path: {choice['representation']}{batch} ({choice['reason']})")
    if s.get("validation_folded"):
        print(f"  validation: {s['validation_folded']['why']}")
    print(f"  steps {s['steps']} (best {s['best_step']}, {s['stopped']}), grad evals {s['grad_evals']}, "
          f"ODE triggers {s['ode_triggers']}, train {s['train_seconds']:.2f} s, total {s['total_seconds']:.2f} s")
    if s.get("reg_search"):
        from recsys_flowadam.train.reg_search import describe

        print(f"  {describe(s['reg_search'])}")
    print(f"  val RMSE {f(s['val_rmse'])}   test RMSE {f(s['test_rmse'])}   test MAE {f(s['test_mae'])}")
    print(f"  artifact: {s['out']}")
