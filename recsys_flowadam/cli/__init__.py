"""The `recsys-flowadam` command line: one sub-command group per role.

Each group lives in its own module with a ``register(subparsers)`` function that adds its
parser and sets ``func`` (called with the parsed namespace, returning an exit code). Group
modules import heavy libraries (torch, fastapi) inside their handlers, so that
``recsys-flowadam data list`` starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
