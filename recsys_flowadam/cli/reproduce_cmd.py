"""`recsys-flowadam reproduce EXPERIMENT`: the paper's experiments under the paper and fair protocols."""

from __future__ import annotations

import argparse
import shlex
import sys

EXPERIMENT_NAMES = ("matrix-completion", "tensor-completion", "robust-factorization", "jester", "movielens",
                    "ablation", "gamma", "all")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "reproduce", help="reproduce the paper's experiments (paper and fair protocols)",
        description="Run one of the FlowAdam paper's experiments and write <out>/<experiment>.md, .json and PNG "
                    "plots. 'paper' reproduces the paper's set-up; 'fair' gives every optimizer the same "
                    "objective, a tuned lr and compute-matched baselines.")
    p.add_argument("experiment", choices=EXPERIMENT_NAMES, metavar="EXPERIMENT",
                   help="one of: " + ", ".join(EXPERIMENT_NAMES))
    p.add_argument("--protocol", choices=("paper", "fair", "both"), default="both",
                   help="comparison protocol (default: both, one report section each)")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds, 0..N-1 (default 5; movielens uses at most 3)")
    p.add_argument("--quick", action="store_true",
                   help="1 seed, short runs, small grids not extended past their edges (a smoke run)")
    p.add_argument("--steps", type=int, default=None, help="override every run's step count")
    p.add_argument("--lr-grid", default=None, metavar="LR,LR,...",
                   help="fair protocol: the lr grid of every tuned optimizer (Lion's is divided by 10); default "
                        "1e-3,3e-3,1e-2,3e-2 (jester, movielens: 1e-4,3e-4,1e-3,3e-3). Without --quick a grid is "
                        "extended past an edge where the best lr sits (lr in [1e-6, 1], at most 4 extra runs)")
    p.add_argument("--out", default="reports", help="output folder (default reports/)")
    p.add_argument("--dataset", default=None, help="jester: dataset name (default jester-1 when present, else "
                   "jester-4); movielens: default ml-100k")
    p.add_argument("--data-dir", default=None, help="data root holding the dataset folders")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these problems are small, and one thread per run avoids "
                        "oversubscribing a shared machine)")
    p.add_argument("--jobs", type=int, default=1,
                   help="all: run this many experiments at once, one worker process each (default 1; 2 on a "
                        "2-core machine about halves the run, and every number in the reports stays the same)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=handle)


def _command(args: argparse.Namespace) -> str:
    """The canonical command line that reproduces this run (recorded in the report)."""
    parts = ["recsys-flowadam", "reproduce", args.experiment, "--protocol", args.protocol]
    # --quick runs one seed whatever --seeds says: record what ran
    parts += ["--quick"] if args.quick else ["--seeds", str(args.seeds)]
    for flag in ("steps", "lr_grid", "dataset", "data_dir"):
        if getattr(args, flag) is not None:
            parts += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    if args.threads != 1:
        parts += ["--threads", str(args.threads)]
    if args.jobs != 1:
        parts += ["--jobs", str(args.jobs)]
    if args.device != "cpu":
        parts += ["--device", args.device]
    parts += ["--out", args.out]
    return " ".join(shlex.quote(p) for p in parts)


def handle(args: argparse.Namespace) -> int:
    from recsys_flowadam.cli import CLIError

    if args.seeds < 1:
        raise CLIError("--seeds must be >= 1")
    if args.steps is not None and args.steps < 1:
        raise CLIError("--steps must be >= 1")
    import torch

    if args.threads < 1:
        raise CLIError("--threads must be >= 1")
    if args.jobs < 1:
        raise CLIError("--jobs must be >= 1")
    torch.set_num_threads(args.threads)
    from recsys_flowadam.reproduce import ExperimentOptions, run_experiment

    lr_grid = None
    if args.lr_grid is not None:
        try:
            lr_grid = tuple(float(x) for x in args.lr_grid.split(","))
        except ValueError:
            raise CLIError(f"--lr-grid: expected numbers separated by commas, got {args.lr_grid!r}") from None
        if not lr_grid or min(lr_grid) <= 0:
            raise CLIError("--lr-grid: learning rates must be > 0")
    from recsys_flowadam.reproduce.report import PLOTS_MISSING, plots_available

    if not plots_available():  # said up front, not discovered after an hour of runs
        print(f"recsys-flowadam: note: {PLOTS_MISSING}", file=sys.stderr)
    protocols = ("paper", "fair") if args.protocol == "both" else (args.protocol,)
    opts = ExperimentOptions(protocols=protocols, seeds=args.seeds, quick=args.quick, steps=args.steps,
                             lr_grid=lr_grid,
                             device=args.device, dataset=args.dataset, data_dir=args.data_dir,
                             progress=not args.no_progress,
                             command=_command(args))
    try:
        written = run_experiment(args.experiment, opts, args.out, jobs=args.jobs, threads=args.threads)
    except ValueError as exc:  # DataError included
        raise CLIError(str(exc)) from None
    _print_results(written, args.quick)
    return 0


def _print_results(written: dict[str, str], quick: bool) -> None:
    """Each experiment's summary table (from its JSON report), then the report paths."""
    import json
    from pathlib import Path

    from recsys_flowadam.reproduce.report import QUICK_NOTE
    from recsys_flowadam.reproduce.summary import tables

    for key, path in written.items():
        if key.endswith(":json"):
            print(tables(json.loads(Path(path).read_text())) + "\n")
    if quick:
        print(QUICK_NOTE + "\n")
    for key, path in written.items():
        if key.endswith((":md", ":json")):
            print(path)
