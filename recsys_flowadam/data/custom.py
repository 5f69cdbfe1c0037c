"""A user's own ratings file: ``load_dataset("csv:PATH", ...)``.

Options: ``sep`` (default ","; doubled characters like "::" work), ``header`` (True/False, or None
to detect: a first line whose rating field is not a number is a header), ``user_col``,
``item_col``, ``rating_col``, ``timestamp_col`` (a 0-based position, or a column name when there
is a header; defaults 0, 1, 2, none), ``scale_min``/``scale_max`` (ratings outside are an error;
default: the observed range), ``encoding``, ``duplicates`` (see ``build.resolve_duplicates``).
Fields may be double-quoted (single-character separators). Raw IDs are the file's strings, indexed numerically when all are integers, else lexicographically.
"""

from __future__ import annotations

from pathlib import Path

from .build import build_ratings
from .delimited import Column, read_delimited
from .errors import DataError, at
from .movielens import check_scale
from .paths import file_sha256
from .ratings import RatingScale, Ratings


def load_custom_csv(
    path: str | Path,
    *,
    sep: str = ",",
    header: bool | None = None,
    user_col: int | str = 0,
    item_col: int | str = 1,
    rating_col: int | str = 2,
    timestamp_col: int | str | None = None,
    scale_min: float | None = None,
    scale_max: float | None = None,
    encoding: str = "utf-8",
    duplicates: str = "error",
) -> Ratings:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: file not found (csv:PATH needs an existing ratings file)")
    with open(path, encoding=encoding, newline="", errors="replace") as fh:
        first = fh.readline().rstrip("\r\n")
    if not first.strip():
        raise at(path, 1, "is empty" if path.stat().st_size == 0 else "first line is empty")
    fields = first.split(sep)
    names = [f.strip().strip('"') for f in fields]

    def position(col: int | str, label: str) -> int:
        if isinstance(col, str) and not col.isdigit():
            if not has_header:
                raise DataError(f"{label}={col!r} names a column, but {path} has no header line")
            if col not in names:
                raise at(path, 1, f"{label}={col!r} is not a column of the header {names}")
            return names.index(col)
        pos = int(col)
        if not 0 <= pos < len(fields):
            raise at(path, 1, f"{label}={pos} is outside the {len(fields)} fields of the first line (sep={sep!r})")
        return pos

    if header is not None:
        has_header = bool(header)
    elif isinstance(rating_col, str) and not rating_col.isdigit():
        has_header = True
    else:
        try:
            float(fields[int(rating_col)])
            has_header = False
        except (ValueError, IndexError):
            has_header = True
    columns = [Column("user", position(user_col, "user_col"), "str"),
               Column("item", position(item_col, "item_col"), "str"),
               Column("rating", position(rating_col, "rating_col"), "float")]
    if timestamp_col is not None:
        columns.append(Column("timestamp", position(timestamp_col, "timestamp_col"), "int"))
    header_lines = 1 if has_header else 0
    cols = read_delimited(path, sep, len(fields), columns, header_lines=header_lines, encoding=encoding,
                          quoted=len(sep) == 1)
    values = cols["rating"]  # finite and within float32: read_delimited checked
    if (scale_min is None) != (scale_max is None):
        raise DataError("csv: give both scale_min and scale_max, or neither")
    if scale_min is not None:
        scale = RatingScale(float(scale_min), float(scale_max))
        check_scale(path, values, scale, header_lines)
    else:
        lo, hi = float(values.min()), float(values.max())
        scale = RatingScale(lo, hi) if lo < hi else RatingScale(lo - 0.5, hi + 0.5)
    return build_ratings(
        f"csv:{path}", cols["user"], cols["item"], values, scale,
        timestamps=cols.get("timestamp"), duplicates=duplicates,
        describe_row=lambda k: f"{path}:{k + 1 + header_lines}",
        source_files={path.name: file_sha256(path)}, source_dir=path.parent,
        description=f"ratings from {path}",
    )
