"""The `recsys-flowadam` command line: one sub-command group per role.

Each group lives in its own module with a ``register(subparsers)`` function that adds its
parser and sets ``func`` (called with the parsed namespace, returning an exit code). Group
modules import heavy libraries (torch, fastapi) inside their handlers, so that
``recsys-flowadam data list`` starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys
from typing import NoReturn, Sequence

# importing the package sets OMP_WAIT_POLICY=PASSIVE (see recsys_flowadam/__init__.py) before
# any group module imports torch
from recsys_flowadam import __version__

# Order is the order shown in --help; a group whose module is absent is not offered.
GROUPS = ("data", "train", "cv", "evaluate", "serve", "reproduce")


class CLIError(Exception):
    """An error the user can fix; printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys-flowadam",
        description="Train collaborative-filtering models with FlowAdam, evaluate them, serve them.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        try:
            module = importlib.import_module(f"recsys_flowadam.cli.{group}_cmd")
        except ModuleNotFoundError as exc:
            if exc.name == f"recsys_flowadam.cli.{group}_cmd":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"recsys-flowadam: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recsys-flowadam: interrupted", file=sys.stderr)
        return 130


def run(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``recsys-flowadam`` command: :func:`main`, then end the process without the interpreter's
    teardown.

    Why: once a command is done, Python's teardown of its modules and of the native libraries'
    globals (torch's, and LLVM's once numba's kernels are loaded) took 0.5-0.9 s on the 2-core
    machine, a tenth of a ``cv`` of ML-100K's five folds, with nothing left to do. The exit handlers
    (``atexit``: logging's flush, tempfile's clean-up, ...) still run, and the standard streams
    are flushed first; only the teardown is skipped, as the distributed ranks already do
    (``train_cmd._leave``). Where this Python has no way to run the exit handlers, it exits as usual.
    A reader that goes away (``recsys-flowadam data list | head -3``) ends it quietly, status 1."""
    try:
        status = main(argv)
    except BrokenPipeError:  # what was left to print has nowhere to go (as Python's docs advise)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        status = 1
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is None:
        sys.exit(status)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:  # the reader went away before the last of the output
            status = 1
        except (OSError, ValueError):  # a stream closed or gone: nothing more to deliver
            pass
    run_exit_handlers()
    os._exit(status)


if __name__ == "__main__":  # pragma: no cover
    run()
