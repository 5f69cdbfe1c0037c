"""Fast, strict reading of delimited ratings files (tab, ``::``, double tab, CSV).

The fast path is pandas' C parser with fixed dtypes (ML-25M: a few seconds). When it fails,
a slow line-by-line pass (only ever run on bad input) finds the first bad line and raises a
``DataError`` naming file, line and field: pandas' own messages do not give line numbers for
dtype failures. Blank lines are not skipped, so row k of the table is line k + 1 + header lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from recsys_flowadam.scoped_warnings import scoped_filter

from .errors import DataError, at
from .values import first_not_float32, fits_int64, float_problem, not_float32

KIND_DTYPES = {"int": np.int64, "float": np.float64, "str": object}


@dataclass(frozen=True)
class Column:
    """One field of a delimited file: its name (for messages), position and kind (int/float/str)."""

    name: str
    position: int
    kind: str = "int"


def read_delimited(
    path: Path,
    sep: str,
    n_fields: int,
    columns: Sequence[Column],
    *,
    header_lines: int = 0,
    expected_header: Sequence[str] | None = None,
    encoding: str = "utf-8",
    require_final_newline: bool = False,
    quoted: bool = False,
) -> dict[str, np.ndarray]:
    """Read the given columns of a file with ``n_fields`` fields per line separated by ``sep``.

    ``sep`` may be a doubled character (``::``, ``\\t\\t``): it is parsed by the C engine as the
    single character with empty fields in between, which is far faster than a regex separator.
    """
    path = Path(path)
    _check_not_empty(path, header_lines, require_final_newline)
    if expected_header is not None:
        _check_header(path, sep, expected_header, encoding)
    doubled = len(sep) == 2 and sep[0] == sep[1]
    if len(sep) != 1 and not doubled:
        raise ValueError(f"unsupported separator {sep!r}")
    stride = 2 if doubled else 1
    names = [f"f{i}" for i in range((n_fields - 1) * stride + 1)]
    # No usecols: with it pandas silently drops extra fields; without it they raise.
    dtype = {name: (np.float32 if i % stride else object) for i, name in enumerate(names)}
    dtype.update({names[c.position * stride]: KIND_DTYPES[c.kind] for c in columns})
    try:
        with scoped_filter("error", pd.errors.ParserWarning):
            frame = pd.read_csv(
            path,
            sep=sep[0],
            header=None,
            names=names,
            dtype=dtype,
            skiprows=header_lines,
            skip_blank_lines=False,
            index_col=False,
            encoding=encoding,
            engine="c",
            quoting=0 if quoted else 3,  # official ratings files have no quoted fields: QUOTE_NONE
            na_filter=doubled or any(c.kind == "str" for c in columns),  # NaN detection only where needed (faster)
            keep_default_na=False,
            na_values=[""],
            low_memory=False,
            )
        if doubled and frame[names[1::2]].notna().any().any():
            raise ValueError(f"a field contains a single {sep[0]!r}")
    except (ValueError, OverflowError, pd.errors.ParserError, pd.errors.ParserWarning, UnicodeDecodeError) as exc:
        locate_bad_line(path, sep, n_fields, columns, header_lines=header_lines, encoding=encoding)
        raise DataError(f"{path}: cannot be parsed: {exc}") from exc
    if frame.shape[0] == 0:
        raise at(path, None, "holds no ratings (empty file)")
    return {c.name: _column(path, c, frame[names[c.position * stride]].to_numpy(), header_lines) for c in columns}


def _column(path: Path, c: Column, arr: np.ndarray, header_lines: int) -> np.ndarray:
    """A parsed column, checked: text fields non-empty, numbers storable as float32 (row k is line k + 1 + header)."""
    if c.kind == "str":
        bad = pd.isna(arr)
        if bad.any():
            raise at(path, int(np.argmax(bad)) + 1 + header_lines, f"field '{c.name}' is empty")
        return arr.astype(str).astype(object)
    if c.kind == "float" and (row := first_not_float32(arr)) is not None:
        raise at(path, row + 1 + header_lines, f"field '{c.name}' {float_problem(arr[row])}: {arr[row]:g}")
    return arr


def _check_not_empty(path: Path, header_lines: int, require_final_newline: bool) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    if size == 0:
        raise at(path, None, "is empty (0 bytes)")
    if require_final_newline:
        with open(path, "rb") as fh:
            fh.seek(-1, 2)
            if fh.read(1) != b"\n":
                raise at(path, None, "does not end with a newline: the file looks truncated")


def _check_header(path: Path, sep: str, expected: Sequence[str], encoding: str) -> None:
    with open(path, encoding=encoding, newline="") as fh:
        first = fh.readline().rstrip("\r\n")
    got = first.split(sep)
    if [g.strip() for g in got] != list(expected):
        raise at(path, 1, f"header is {first!r}, expected {sep.join(expected)!r}")


def locate_bad_line(
    path: Path,
    sep: str,
    n_fields: int,
    columns: Sequence[Column],
    *,
    header_lines: int = 0,
    encoding: str = "utf-8",
) -> None:
    """Scan the file line by line and raise a DataError for the first malformed line (slow; error path only)."""
    try:
        with open(path, encoding=encoding, newline="") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if lineno <= header_lines:
                    continue
                line = raw.rstrip("\r\n")
                if line.strip() == "":
                    raise at(path, lineno, "empty line")
                fields = line.split(sep)
                if len(fields) != n_fields:
                    hint = ""
                    for other in ("\t", ",", ";", "::", "|", " "):
                        if other != sep and other not in sep and len(line.split(other)) >= n_fields:
                            hint = f" (is the delimiter {other!r}? this format uses {sep!r})"
                            break
                    if not raw.endswith("\n") and len(fields) < n_fields:
                        hint = " (last line is cut short: the file looks truncated)"
                    raise at(path, lineno, f"expected {n_fields} fields separated by {sep!r}, found {len(fields)}{hint}")
                for c in columns:
                    _check_field(path, lineno, c, fields[c.position].strip())
    except UnicodeDecodeError as exc:
        raise at(path, None, f"is not valid {encoding} text ({exc.reason} at byte {exc.start})") from None


def _check_field(path: Path, lineno: int, c: Column, value: str) -> None:
    """Raise a DataError naming the line when ``value`` cannot be field ``c`` (int64, float32 or non-empty text)."""
    if c.kind == "int":
        try:
            number = int(value)
        except ValueError:
            raise at(path, lineno, f"field '{c.name}' is not an integer: {value!r}") from None
        if not fits_int64(number):
            raise at(path, lineno, f"field '{c.name}' is outside the 64-bit integer range: {value!r}")
    elif c.kind == "float":
        try:
            number = float(value)
        except ValueError:
            raise at(path, lineno, f"field '{c.name}' is not a number: {value!r}") from None
        if not_float32(np.array([number]))[0]:
            raise at(path, lineno, f"field '{c.name}' {float_problem(number)}: {value!r}")
    elif value == "":
        raise at(path, lineno, f"field '{c.name}' is empty")
