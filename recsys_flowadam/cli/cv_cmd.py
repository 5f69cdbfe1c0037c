"""``recsys-flowadam cv``: cross-validation in one process.

The dataset is loaded and torch started once; every fold is trained and scored by the code
``train`` uses, so a fold's row equals ``train --split FOLD`` with the same settings. The setting
flags and ``--recipe``/``--threads`` are ``train``'s (``train_cmd`` builds them from the
configuration models); ``--split`` is replaced by ``--folds``; ``--jobs`` runs folds at once
(``train.crossval.fold_jobs``). Prints a table (a row per fold, then mean and sample std) or, with
``--json``, the report, which is always written to a file.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys_flowadam.cli.train_cmd import (add_lazy_parser, add_recipe_arguments, add_setting_arguments,
                                           resolve_settings, torch_threads)

if TYPE_CHECKING:
    from recsys_flowadam.train.config import DataConfig, TrainConfig

DESCRIPTION = (
    "Cross-validate in one process: load the dataset once, then for each fold split it, train (early "
    "stopping on the fold's validation part, refit as the settings say) and score the fold's test part "
    "exactly as `train --split FOLD` does. Prints RMSE, MAE, steps and seconds per fold and their mean +- std "
    "(sample std), and writes the report as JSON. The recipe's split is ignored: --folds names the folds.")
TABLE = "{:<12} {:>15} {:>15} {:>7} {:>15} {:>8}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``train``'s setting flags less ``--split``, then the cross-validation options."""
    from recsys_flowadam.train.folds import FOLDS_HELP

    add_setting_arguments(p, exclude=("split",))
    g = p.add_argument_group("cross-validation")
    g.add_argument("--folds", help=f"the folds: {FOLDS_HELP} (default: u1..u5 for ml-100k, kfold:5 otherwise)")
    add_recipe_arguments(g)
    g.add_argument("--out", metavar="FILE", help="JSON report (default reports/cv-<dataset>-<model>-<optimizer>"
                                                 ".json); an existing file is refused unless --force")
    g.add_argument("--force", action="store_true", help="replace the --out file if it exists")
    g.add_argument("--save-models", metavar="DIR", help="also write each fold's artifact to DIR/<fold>/")
    g.add_argument("--jobs", type=int, metavar="N",
                   help="folds at a time, on threads of this process; the numbers do not change, the fold times "
                        "overlap; each fold keeps to --threads and --memory-budget (default: 2 on the CPU for data "
                        "of at most 2M ratings where the process may use two cores, torch runs on at most two "
                        "threads and no --memory-budget is given, else 1)")
    g.add_argument("--json", action="store_true", help="print the report (one JSON object) instead of the table; "
                                                       "no progress bar")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_lazy_parser(subparsers, "cv", add_arguments, description=DESCRIPTION,
                        help="cross-validate: train and score each fold in one process")
    p.set_defaults(func=handle)


def default_report(dataset: str, model: str, optimizer: str) -> Path:
    """``reports/cv-<dataset>-<model>-<optimizer>.json`` with unsafe characters of the name replaced."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset).strip("_") or "dataset"
    return Path("reports") / f"cv-{safe}-{model}-{optimizer}.json"


def report_target(out: str | None, default: Path, force: bool) -> Path:
    """The report's path, refused before any work if it would replace a file not to be replaced."""
    from recsys_flowadam.cli import CLIError

    path = Path(out) if out else default
    what = "--out" if out else "the default report file"
    if path.is_dir():
        raise CLIError(f"{path}: is a folder; --out names the JSON report file")
    if (path.exists() or path.is_symlink()) and not force:
        raise CLIError(f"{path} ({what}) exists; pass --force to replace it, or choose another --out FILE")
    if path.parent.exists() and not path.parent.is_dir():
        raise CLIError(f"{path}: {path.parent} is not a folder")
    return path


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` as strict JSON, whole or not at all (the folder is created)."""
    from recsys_flowadam.safe_write import atomic_write, json_safe

    text = json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fh.write(text.encode()))


def handle(args: argparse.Namespace) -> int:
    from recsys_flowadam.cli import CLIError
    from recsys_flowadam.train.folds import FoldsError, default_folds, parse_folds

    config, data = resolve_settings(args)
    if args.jobs is not None and args.jobs < 1:
        raise CLIError("--jobs must be >= 1")
    try:
        folds = parse_folds(args.folds if args.folds is not None else default_folds(data.dataset))
    except FoldsError as exc:
        raise CLIError(str(exc)) from None
    out = report_target(args.out, default_report(data.dataset, config.model, config.optimizer), args.force)
    with torch_threads(args.threads):
        report = _run(args, config, data, folds)
    report["out"] = str(out)
    problem: Exception | None = None
    try:
        if not args.force and (out.exists() or out.is_symlink()):
            raise FileExistsError("it appeared while the folds ran; pass --force to replace it")
        write_report(out, report)
    except OSError as exc:
        problem = exc  # the figures are still printed below
    if args.json:
        from recsys_flowadam.cli.output import print_json

        print_json(report)
    else:
        _print_totals(report)
    if problem is not None:
        raise CLIError(f"{out}: could not write the report ({problem})")
    return 0


def _run(args: argparse.Namespace, config: TrainConfig, data: DataConfig, folds: list[str]) -> dict[str, Any]:
    """Check the artifact folders, print the table's head, run the folds (printing a row per fold)."""
    from recsys_flowadam.cli import CLIError
    from recsys_flowadam.train import distributed
    from recsys_flowadam.train.crossval import CrossValidationError, check_save_targets, cross_validate

    if distributed.launched_distributed():
        raise CLIError("cv runs in one process; start it without torchrun (WORLD_SIZE > 1 is set)")
    save_models = Path(args.save_models) if args.save_models else None

    def print_head(jobs: int) -> None:
        at_once = f" ({jobs} at a time)" if jobs > 1 else ""
        print(f"{data.dataset}: {config.model} + {config.optimizer}, seed {config.seed}, {len(folds)} folds{at_once}",
              flush=True)
        print(TABLE.format("fold", "test RMSE", "test MAE", "steps", "seconds", "reg"), flush=True)

    try:
        check_save_targets(save_models, folds)
        return cross_validate(data, config, folds, save_models=save_models, progress=not args.json,
                              on_fold=None if args.json else _print_row, jobs=args.jobs,
                              on_start=None if args.json else print_head)
    except CrossValidationError as exc:
        raise CLIError(str(exc)) from None


def _print_row(row: dict[str, Any]) -> None:
    # reg: as given, or as chosen on the fold's validation part (the report's reg_search has the table)
    print(TABLE.format(row["fold"], f"{row['test_rmse']:.4f}", f"{row['test_mae']:.4f}", row["steps"],
                       f"{row['seconds']:.2f}", f"{row['reg']:g}"), flush=True)


def _pm(stat: dict[str, float | None], digits: int) -> str:
    """``mean ± std`` (std ``n/a`` for a single fold)."""
    std = "n/a" if stat["std"] is None else f"{stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {std}"


def _print_totals(report: dict[str, Any]) -> None:
    print(TABLE.format("mean ± std", _pm(report["test_rmse"], 4), _pm(report["test_mae"], 4), "",
                       _pm(report["seconds"], 2), ""))
    print(f"data loaded in {report['load_seconds']:.2f} s, torch warm-up {report['warm_up_seconds']:.2f} s, "
          f"total {report['total_seconds']:.2f} s; report: {report['out']}")
