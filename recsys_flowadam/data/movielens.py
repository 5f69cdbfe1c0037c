"""MovieLens parsers: ML-100K (tab), ML-1M/ML-10M (``::`` .dat), ML-20M and later (CSV with header).

Raw user/movie IDs are the dataset's integers as strings, indexed in numeric order.
Titles come from u.item (latin-1, ``|``-separated), movies.dat (``::``) or movies.csv.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from .build import build_ratings
from .delimited import Column, read_delimited
from .errors import at
from .paths import file_sha256
from .ratings import Ratings, RatingScale

RATING_COLUMNS = (Column("user", 0), Column("item", 1), Column("rating", 2, "float"), Column("timestamp", 3))


def check_scale(path: Path, values: np.ndarray, scale: RatingScale, header_lines: int = 0) -> None:
    """Refuse ratings outside the declared scale, naming the first offending line."""
    bad = (values < scale.min) | (values > scale.max) | ~np.isfinite(values)
    if bad.any():
        row = int(np.argmax(bad))
        raise at(path, row + 1 + header_lines,
                 f"rating {values[row]:g} is outside the scale {scale.min:g}..{scale.max:g} "
                 f"({int(bad.sum())} such ratings in the file)")


def _finish(name: str, folder: Path, ratings_file: Path, cols: dict, scale: RatingScale, header_lines: int,
            titles: Mapping[str, str] | None, title_file: Path | None, duplicates: str, description: str) -> Ratings:
    check_scale(ratings_file, cols["rating"], scale, header_lines)
    sources = {ratings_file.name: file_sha256(ratings_file)}
    if title_file is not None:
        sources[title_file.name] = file_sha256(title_file)
    return build_ratings(
        name, cols["user"], cols["item"], cols["rating"], scale,
        timestamps=cols["timestamp"], titles=titles, duplicates=duplicates,
        describe_row=lambda k: f"{ratings_file}:{k + 1 + header_lines}",
        source_files=sources, source_dir=folder, description=description,
    )


def load_ml100k(folder: Path, name: str, scale: RatingScale, *, duplicates: str = "error",
                description: str = "") -> Ratings:
    """``u.data`` (user TAB item TAB rating TAB timestamp) plus titles from ``u.item``."""
    data = folder / "u.data"
    cols = read_delimited(data, "\t", 4, RATING_COLUMNS, require_final_newline=True)
    item_file = folder / "u.item"
    titles = read_pipe_titles(item_file) if item_file.exists() else None
    return _finish(name, folder, data, cols, scale, 0, titles, item_file if titles is not None else None,
                   duplicates, description)


def load_dat(folder: Path, name: str, scale: RatingScale, *, duplicates: str = "error",
             description: str = "") -> Ratings:
    """ML-1M / ML-10M: ``ratings.dat`` (UserID::MovieID::Rating::Timestamp), titles from ``movies.dat``."""
    data = folder / "ratings.dat"
    cols = read_delimited(data, "::", 4, RATING_COLUMNS, encoding="latin-1", require_final_newline=True)
    movie_file = folder / "movies.dat"
    titles = read_dat_titles(movie_file) if movie_file.exists() else None
    return _finish(name, folder, data, cols, scale, 0, titles, movie_file if titles is not None else None,
                   duplicates, description)


def load_csv(folder: Path, name: str, scale: RatingScale, *, duplicates: str = "error",
             description: str = "") -> Ratings:
    """ML-20M and later: ``ratings.csv`` (header userId,movieId,rating,timestamp), titles from ``movies.csv``."""
    data = folder / "ratings.csv"
    cols = read_delimited(data, ",", 4, RATING_COLUMNS, header_lines=1,
                          expected_header=("userId", "movieId", "rating", "timestamp"), require_final_newline=True)
    movie_file = folder / "movies.csv"
    titles = read_csv_titles(movie_file) if movie_file.exists() else None
    return _finish(name, folder, data, cols, scale, 1, titles, movie_file if titles is not None else None,
                   duplicates, description)


def read_pipe_titles(path: Path) -> dict[str, str]:
    """u.item: ``id|title|release date|video date|url|19 genre flags``, latin-1."""
    titles: dict[str, str] = {}
    with open(path, encoding="latin-1", newline="") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.rstrip("\r\n")
            if not line:
                continue
            fields = line.split("|")
            if len(fields) < 2 or not fields[0].strip().isdigit():
                raise at(path, lineno, f"expected 'movie id|title|...', got {line[:60]!r}")
            titles[str(int(fields[0]))] = fields[1]
    return titles


def read_dat_titles(path: Path) -> dict[str, str]:
    """movies.dat: ``MovieID::Title::Genres``; ML-1M is latin-1, ML-10M UTF-8 (tried first)."""
    raw_bytes = path.read_bytes()
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError:
        text = raw_bytes.decode("latin-1")
    titles: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw:
            continue
        fields = raw.split("::")
        if len(fields) != 3 or not fields[0].strip().isdigit():
            raise at(path, lineno, f"expected 'MovieID::Title::Genres', got {raw[:60]!r}")
        titles[str(int(fields[0]))] = fields[1]
    return titles


def read_csv_titles(path: Path) -> dict[str, str]:
    """movies.csv: ``movieId,title,genres`` with a header; titles may be quoted."""
    try:
        frame = pd.read_csv(path, dtype={"movieId": np.int64, "title": str}, usecols=["movieId", "title"],
                            keep_default_na=False, encoding="utf-8")
    except (ValueError, pd.errors.ParserError) as exc:
        raise at(path, None, f"cannot be parsed as movieId,title,genres CSV: {exc}") from exc
    return dict(zip(frame["movieId"].astype(str).tolist(), frame["title"].tolist()))

