"""`python -m recsys_flowadam` is the `recsys-flowadam` command."""

from recsys_flowadam.cli import run

run()
