"""The one exception type the data layer raises for bad input."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad or missing input data; the message names the file and 1-based line, or the field."""


def at(path: str | Path, line: int | None, message: str) -> DataError:
    """A DataError whose message starts with ``FILE:LINE:`` (or ``FILE:`` without a line)."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    return DataError(f"{where}: {message}")
