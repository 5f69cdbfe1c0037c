"""Jester parsers: the users x jokes workbooks (.xls via xlrd, .xlsx via openpyxl) and
Dataset 2's ``jester_ratings.dat`` (user, joke, rating separated by two tabs).

Workbooks have no header; row r (1-based) is one user, column 0 the number of jokes that user
rated, columns 1..J jokes 1..J; 99 means "not rated" (an empty cell is treated the same).
User ID = the 1-based row number as a string ("17"); with several Dataset 1 parts loaded
together the ID carries the part ("p2-17") so IDs stay unique; users are indexed in file
order (part 1 rows, then part 2, ...). Item ID = the joke number; every joke column is an
item even when nobody rated it (Jester-4 has 158 jokes, 22 never rated). Ratings outside
the documented -10..10 are kept (Jester-4 has 541); ``Ratings.out_of_scale`` counts them.
"""

from __future__ import annotations

import html
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .build import build_ratings
from .delimited import Column, read_delimited
from .errors import DataError, at
from .paths import file_sha256
from .ratings import Ratings, RatingScale
from .values import float_problem, not_float32
from .xlsx import read_numeric_sheet

NOT_RATED = 99.0


def read_matrix_workbook(path: Path) -> np.ndarray:
    """The numeric cells of a Jester workbook's first sheet as float64 (NaN for empty cells)."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise at(path, None, "is empty (0 bytes)")
    if path.suffix.lower() == ".xlsx":
        fast = read_numeric_sheet(path)  # None unless the sheet is plain numbers: then openpyxl decides
        if fast is not None:
            return fast
    try:
        rows = _xls_rows(path) if path.suffix.lower() == ".xls" else _xlsx_rows(path)
    except DataError:
        raise
    except Exception as exc:  # xlrd/openpyxl raise many types for damaged workbooks
        raise at(path, None, f"cannot be read as a {path.suffix} workbook: {type(exc).__name__}: {exc}") from exc
    if not rows:
        raise at(path, None, "holds no rows (empty workbook)")
    frame = pd.DataFrame.from_records(rows).replace({"": None})
    numeric = frame.apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna().to_numpy() & frame.notna().to_numpy()
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise at(path, row + 1, f"cell {_column_letter(col)}{row + 1} is not a number: {frame.iat[row, col]!r}")
    return numeric.to_numpy(dtype=np.float64, na_value=np.nan)


def _xls_rows(path: Path) -> list[list]:
    """First sheet of a BIFF .xls via xlrd (used directly: pandas' xlrd engine is deprecated)."""
    import xlrd

    book = xlrd.open_workbook(str(path), on_demand=True)
    try:
        sheet = book.sheet_by_index(0)
        return [sheet.row_values(r) for r in range(sheet.nrows)]
    finally:
        book.release_resources()


def _xlsx_rows(path: Path) -> list[tuple]:
    """First sheet of an .xlsx via openpyxl's streaming read-only mode."""
    import openpyxl

    book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        return [row for row in book.worksheets[0].iter_rows(values_only=True)]
    finally:
        book.close()


def _column_letter(col: int) -> str:
    letters = ""
    col += 1
    while col:
        col, rem = divmod(col - 1, 26)
        letters = chr(65 + rem) + letters
    return letters


def matrix_to_coordinates(path: Path, matrix: np.ndarray, n_jokes: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, joke index 0-based, rating) of the rated cells; checks the shape and column 0's counts."""
    if matrix.ndim != 2 or matrix.shape[1] < 2:
        raise at(path, None, f"expected a users x (1 + jokes) sheet, got shape {matrix.shape}")
    if n_jokes is not None and matrix.shape[1] != n_jokes + 1:
        raise at(path, None, f"expected {n_jokes + 1} columns (count + {n_jokes} jokes), found {matrix.shape[1]}")
    cells = matrix[:, 1:]
    bad = ~np.isnan(cells) & not_float32(cells)  # NaN is an empty cell; inf or 1e39 is a bad one
    if bad.any():
        r, c = map(int, np.argwhere(bad)[0])
        raise at(path, r + 1, f"cell {_column_letter(c + 1)}{r + 1} {float_problem(cells[r, c])}: {cells[r, c]:g}")
    rated = ~np.isnan(cells) & (cells != NOT_RATED)
    counts = matrix[:, 0]
    mismatch = np.flatnonzero(rated.sum(axis=1) != counts)
    if mismatch.size:
        r = int(mismatch[0])
        warnings.warn(f"{path}:{r + 1}: column A says {counts[r]:g} jokes rated, the row has "
                      f"{int(rated[r].sum())} ratings ({mismatch.size} rows disagree); the ratings are used",
                      RuntimeWarning, stacklevel=3)
    rows, jokes = np.nonzero(rated)  # row-major: users in file order
    return rows.astype(np.int64), jokes.astype(np.int64), cells[rows, jokes]


def load_workbooks(
    folder: Path,
    name: str,
    scale: RatingScale,
    files: Sequence[str],
    *,
    n_jokes: int | None,
    part_labels: Sequence[str] | None = None,
    texts: dict[str, str] | None = None,
    text_sources: dict[str, str] | None = None,
    description: str = "",
) -> Ratings:
    """One or more users x jokes workbooks stacked (users of file 1, then file 2, ...)."""
    users, items, values, user_ids = [], [], [], []
    sources: dict[str, str] = {}
    offset = 0
    width = None
    for k, fname in enumerate(files):
        path = folder / fname
        matrix = read_matrix_workbook(path)
        if width is not None and matrix.shape[1] != width:
            raise at(path, None, f"has {matrix.shape[1]} columns, the other parts {width}")
        width = matrix.shape[1]
        rows, jokes, vals = matrix_to_coordinates(path, matrix, n_jokes)
        users.append(rows + offset)
        items.append(jokes)
        values.append(vals)
        labels = np.arange(1, matrix.shape[0] + 1).astype(str)
        if part_labels is not None:
            labels = np.char.add(f"{part_labels[k]}-", labels)
        user_ids.append(labels.astype(object))
        offset += matrix.shape[0]
        sources[fname] = file_sha256(path)
    sources.update(text_sources or {})
    n_items = (width or 1) - 1
    item_ids = np.arange(1, n_items + 1).astype(str).astype(object)
    titles = None
    if texts is not None:
        titles = np.array([texts.get(i, "") for i in item_ids.tolist()], dtype=object)
    return Ratings(
        name=name,
        users=np.concatenate(users),
        items=np.concatenate(items),
        values=np.concatenate(values).astype(np.float32),
        user_ids=np.concatenate(user_ids),
        item_ids=item_ids,
        scale=scale,
        item_titles=titles,
        source_files=sources,
        source_dir=folder,
        description=description,
    )


def load_ratings_dat(folder: Path, name: str, scale: RatingScale, *, n_jokes: int = 150,
                     duplicates: str = "error", description: str = "") -> Ratings:
    """Dataset 2: ``jester_ratings.dat`` lines ``user<TAB><TAB>joke<TAB><TAB>rating``; texts from jester_items.dat."""
    path = folder / "jester_ratings.dat"
    cols = read_delimited(path, "\t\t", 3, (Column("user", 0), Column("item", 1), Column("rating", 2, "float")))
    bad = (cols["item"] < 1) | (cols["item"] > n_jokes)
    if bad.any():
        row = int(np.argmax(bad))
        raise at(path, row + 1, f"joke {cols['item'][row]} is outside 1..{n_jokes}")
    bad = cols["rating"] == NOT_RATED  # read_delimited refused non-finite ones
    if bad.any():
        row = int(np.argmax(bad))
        raise at(path, row + 1, f"rating {cols['rating'][row]!r} is not a rating")
    sources = {path.name: file_sha256(path)}
    items_file = folder / "jester_items.dat"
    titles = None
    if items_file.exists():
        titles = read_items_dat(items_file)
        sources[items_file.name] = file_sha256(items_file)
    return build_ratings(
        name, cols["user"], cols["item"], cols["rating"], scale, titles=titles, duplicates=duplicates,
        describe_row=lambda k: f"{path}:{k + 1}", source_files=sources, source_dir=folder,
        description=description, all_item_ids=np.arange(1, n_jokes + 1),
    )


_TAG = re.compile(r"<[^>]+>")


def clean_html(text: str) -> str:
    """Joke text without HTML tags and entities, whitespace collapsed."""
    return " ".join(html.unescape(_TAG.sub(" ", text)).split())


def read_items_dat(path: Path) -> dict[str, str]:
    """jester_items.dat: a ``N:`` line, then the joke's (HTML) text up to the next ``N:`` line."""
    text = path.read_text(encoding="utf-8", errors="replace")
    parts = re.split(r"(?m)^\s*(\d+):\s*$", text)
    if len(parts) < 3:
        raise at(path, 1, "expected 'N:' lines each followed by a joke text")
    return {str(int(parts[i])): clean_html(parts[i + 1]) for i in range(1, len(parts) - 1, 2)}


def read_joke_workbook(path: Path) -> dict[str, str]:
    """DatasetNJokeSet.xlsx: no header, row i holds joke i's text."""
    try:
        frame = pd.read_excel(path, header=None, engine="openpyxl")
    except Exception as exc:
        raise at(path, None, f"cannot be read as a workbook: {type(exc).__name__}: {exc}") from exc
    return {str(i + 1): clean_html(str(t)) if pd.notna(t) else "" for i, t in enumerate(frame.iloc[:, 0].tolist())}


HTML_JOKES = "**/init*.html"  # Dataset 1's joke texts, anywhere below the dataset folder


def read_html_jokes(folder: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Dataset 1 joke texts: ``init1.html`` ... ``init100.html`` (anywhere below ``folder``)."""
    texts, sources = {}, {}
    for path in sorted(folder.glob(HTML_JOKES)):
        m = re.fullmatch(r"init(\d+)\.html", path.name)
        if m:
            body = path.read_text(encoding="latin-1")
            texts[str(int(m.group(1)))] = clean_html(body)
            sources[str(path.relative_to(folder))] = file_sha256(path)
    return texts, sources
