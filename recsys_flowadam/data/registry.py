"""The dataset registry: names, descriptions, licences, files, official downloads, parsers.

Layout of the data root: ``<root>/<name>/<official files>``, e.g. ``<root>/ml-25m/ratings.csv``
(the archive's top folder, such as ``ml-10M100K/``, is dropped on extraction).
SHA-256 values are those collected in the datasets README ("Official sources"); where none is
published (``sha256=None``) the first download's hash is recorded and printed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import jester, movielens
from .errors import DataError
from .paths import file_sha256
from .ratings import Ratings, RatingScale

GROUPLENS = "https://files.grouplens.org/datasets/movielens/"
EIGENTASTE = "https://eigentaste.berkeley.edu/dataset/"

MOVIELENS_LICENCE = "GroupLens research licence: cite; no commercial use"
MOVIELENS_NO_REDIST = MOVIELENS_LICENCE + "; no redistribution"
MOVIELENS_REDIST = MOVIELENS_LICENCE + "; redistribution under the same terms"
JESTER_LICENCE = "free for research use; cite Goldberg et al. 2001 (Eigentaste)"
MOVIELENS_CITATION = ("F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History and Context. "
                      "ACM TiiS 5, 4, Article 19. https://doi.org/10.1145/2827872")
JESTER_CITATION = ("Ken Goldberg, Theresa Roeder, Dhruv Gupta, and Chris Perkins. Eigentaste: A Constant Time "
                   "Collaborative Filtering Algorithm. Information Retrieval, 4(2), 133-151, July 2001.")

STARS = RatingScale(1.0, 5.0)
HALF_STARS = RatingScale(0.5, 5.0)
JESTER = RatingScale(-10.0, 10.0)


@dataclass(frozen=True)
class Download:
    """One official archive (or single file) and the dataset files it provides."""

    url: str
    sha256: str | None
    provides: tuple[str, ...]
    archive: bool = True  # a zip to extract (top folder dropped); else the file itself


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: its files, licence, citation, official downloads and parser."""

    name: str
    description: str
    size: str
    licence: str
    citation: str
    scale: RatingScale
    files: tuple[str, ...]  # required files inside <root>/<name>/
    downloads: tuple[Download, ...]
    parse: Callable[..., Ratings] = field(repr=False)
    optional_files: tuple[str, ...] = ()
    n_ratings: int | None = None  # official count, used to flag truncated or modified files
    # glob patterns (relative to the folder) of further files the parser reads when present,
    # e.g. joke texts: they are part of the parsed-cache key like every other file read
    extra_sources: tuple[str, ...] = ()

    def required_files(self, **options) -> tuple[str, ...]:
        if self.name == "jester-1" and options.get("part") is not None:
            return (JESTER1_PARTS[_jester1_part(options["part"]) - 1],)
        return self.files

    def source_names(self, folder: Path, **options) -> list[str]:
        """Every file under ``folder`` the parser may read (relative names): the required and
        optional files and what ``extra_sources`` matches. The parsed-cache key hashes them all."""
        names = list(self.required_files(**options)) + list(self.optional_files)
        for pattern in self.extra_sources:
            names += sorted(str(p.relative_to(folder)) for p in folder.glob(pattern) if p.is_file())
        return list(dict.fromkeys(names))

    def downloads_for(self, files: tuple[str, ...]) -> tuple[Download, ...]:
        return tuple(d for d in self.downloads if set(d.provides) & set(files))


JESTER1_PARTS = ("jester-data-1.xls", "jester-data-2.xls", "jester-data-3.xls")


def _jester1_part(part) -> int:
    try:
        k = int(part)
    except (TypeError, ValueError):
        k = 0
    if k not in (1, 2, 3):
        raise DataError(f"jester-1: part must be 1, 2 or 3, got {part!r}")
    return k


def _ml(parser):
    def parse(folder: Path, info: DatasetEntry, duplicates: str = "error") -> Ratings:
        return parser(folder, info.name, info.scale, duplicates=duplicates, description=info.description)
    return parse


def _jester1(folder: Path, info: DatasetEntry, part=None) -> Ratings:
    parts = [1, 2, 3] if part is None else [_jester1_part(part)]
    texts, sources = jester.read_html_jokes(folder)
    return jester.load_workbooks(
        folder, info.name, info.scale, [JESTER1_PARTS[k - 1] for k in parts], n_jokes=100,
        part_labels=[f"p{k}" for k in parts], texts=texts or None, text_sources=sources,
        description=info.description if part is None else f"{info.description} (part {parts[0]} only)",
    )


JESTER_ITEMS = "jester_items.dat"  # Dataset 2's joke texts; the workbook datasets read them when present


def _jester_workbook(fname: str, n_jokes: int | None, text_file: str | None):
    def parse(folder: Path, info: DatasetEntry) -> Ratings:
        texts, sources = None, {}
        if text_file and (folder / text_file).exists():
            texts = jester.read_joke_workbook(folder / text_file)
            sources = {text_file: file_sha256(folder / text_file)}
        elif (folder / JESTER_ITEMS).exists():
            texts = jester.read_items_dat(folder / JESTER_ITEMS)
            sources = {JESTER_ITEMS: file_sha256(folder / JESTER_ITEMS)}
        return jester.load_workbooks(folder, info.name, info.scale, [fname], n_jokes=n_jokes, texts=texts,
                                     text_sources=sources, description=info.description)
    return parse


def _jester2(folder: Path, info: DatasetEntry, duplicates: str = "error") -> Ratings:
    return jester.load_ratings_dat(folder, info.name, info.scale, duplicates=duplicates, description=info.description)


JESTER4_RATINGS = "[final] April 2015 to Nov 30 2019 - Transformed Jester Data - .xlsx"
JESTER3_RATINGS = "FINAL jester 2006-15.xls"


def _movielens(name, description, size, licence, scale, fmt, zip_sha, n_ratings) -> DatasetEntry:
    files, optional, parser = {
        "100k": (("u.data",), ("u.item",) + tuple(f"{s}.{e}" for s in ("u1", "u2", "u3", "u4", "u5", "ua", "ub")
                                                  for e in ("base", "test")), movielens.load_ml100k),
        "dat": (("ratings.dat",), ("movies.dat",), movielens.load_dat),
        "csv": (("ratings.csv",), ("movies.csv",), movielens.load_csv),
    }[fmt]
    return DatasetEntry(
        name=name, description=description, size=size, licence=licence, citation=MOVIELENS_CITATION,
        scale=scale, files=files, optional_files=optional, parse=_ml(parser), n_ratings=n_ratings,
        downloads=(Download(f"{GROUPLENS}{name}.zip", zip_sha, files + optional),),
    )


DATASETS: dict[str, DatasetEntry] = {
    info.name: info
    for info in (
        _movielens("ml-100k", "MovieLens 100K: 943 users, 1,682 movies, 1-5 stars, 1997-98", "5 MB",
                   MOVIELENS_NO_REDIST, STARS, "100k",
                   "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229", 100_000),
        _movielens("ml-1m", "MovieLens 1M: 6,040 users, 3,706 movies, 1-5 stars", "6 MB",
                   MOVIELENS_NO_REDIST, STARS, "dat",
                   "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20", 1_000_209),
        _movielens("ml-10m", "MovieLens 10M: 69,878 users, 10,677 movies, half stars", "66 MB",
                   MOVIELENS_NO_REDIST, HALF_STARS, "dat",
                   "813c411ccb6122564edfe752e7f80c4dcc5aa25fa94c93622f6877a7ba252862", 10_000_054),
        _movielens("ml-20m", "MovieLens 20M: 138,493 users, 26,744 movies, half stars", "199 MB",
                   MOVIELENS_REDIST, HALF_STARS, "csv",
                   "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3", 20_000_263),
        _movielens("ml-25m", "MovieLens 25M: 162,541 users, 59,047 movies, half stars", "262 MB",
                   MOVIELENS_REDIST, HALF_STARS, "csv",
                   "8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa", 25_000_095),
        _movielens("ml-32m", "MovieLens 32M: 200,948 users, 84,432 movies, half stars", "239 MB",
                   MOVIELENS_REDIST, HALF_STARS, "csv", None, 32_000_204),
        _movielens("ml-latest-small", "MovieLens latest, small: 610 users, 9,742 movies, half stars", "1 MB",
                   MOVIELENS_REDIST, HALF_STARS, "csv",
                   "696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436", 100_836),
        _movielens("ml-latest", "MovieLens latest, full (rolling release; contents change)", "~335 MB",
                   MOVIELENS_REDIST, HALF_STARS, "csv", None, None),
        DatasetEntry(
            name="jester-1", description="Jester Dataset 1: 73,421 users x 100 jokes, 1999-2003 (3 parts; option part=1|2|3)",
            size="10 MB", licence=JESTER_LICENCE, citation=JESTER_CITATION, scale=JESTER, files=JESTER1_PARTS,
            parse=_jester1, extra_sources=(jester.HTML_JOKES,),
            downloads=(
                Download(f"{EIGENTASTE}archive/jester_dataset_1_1.zip",
                         "cb7841756ded125b15f3d95c9f8241224065e96354c132a46ae4214deeab7615", (JESTER1_PARTS[0],)),
                Download(f"{EIGENTASTE}archive/jester_dataset_1_2.zip",
                         "4d312fd824d8c8cb2c9c952a7b1fb7c00d1f5fd3ece370f7285aa701d371748b", (JESTER1_PARTS[1],)),
                Download(f"{EIGENTASTE}archive/jester_dataset_1_3.zip",
                         "7f548d3762d3506cf7cd37d8cb9e3adb67984a7da7aa2d2096d5e0b1b884758d", (JESTER1_PARTS[2],)),
            ),
        ),
        DatasetEntry(
            name="jester-2", description="Jester Dataset 2: ~1.7M ratings, 59,132 users x 150 jokes, 2006-2009",
            size="8 MB", licence=JESTER_LICENCE, citation=JESTER_CITATION, scale=JESTER,
            files=("jester_ratings.dat",), optional_files=("jester_items.dat",), parse=_jester2,
            downloads=(Download(f"{EIGENTASTE}archive/jester_dataset_2.zip",
                                "5c2b9fb8346fc132ac1be6a9264fef9a6d153da68f3201839ac25c19f9a59a09",
                                ("jester_ratings.dat", "jester_items.dat")),),
        ),
        DatasetEntry(
            name="jester-2plus", description="Jester Dataset 2+: users x 150 jokes, 2006-2012 (jesterfinal151cols.xls)",
            size="~10 MB", licence=JESTER_LICENCE, citation=JESTER_CITATION, scale=JESTER,
            files=("jesterfinal151cols.xls",), parse=_jester_workbook("jesterfinal151cols.xls", 150, None),
            extra_sources=(JESTER_ITEMS,),
            downloads=(Download(f"{EIGENTASTE}archive/jester_dataset_3.zip",
                                "de360773d91253200a203afa99c38d3368bfcfcc02d28088f11d5ec1dacc9f6f",
                                ("jesterfinal151cols.xls",)),),
        ),
        DatasetEntry(
            name="jester-3", description="Jester Dataset 3: 54,905 users x 150 jokes, 2006-2015",
            size="6 MB", licence=JESTER_LICENCE, citation=JESTER_CITATION, scale=JESTER,
            files=(JESTER3_RATINGS,), optional_files=("Dataset3JokeSet.xlsx",),
            parse=_jester_workbook(JESTER3_RATINGS, 150, "Dataset3JokeSet.xlsx"), extra_sources=(JESTER_ITEMS,),
            downloads=(Download(f"{EIGENTASTE}JesterDataset3.zip",
                                "0987d0d892f833ce9f889addb18c1960cb086658362a77a27216327ffb91614f",
                                (JESTER3_RATINGS,)),),
        ),
        DatasetEntry(
            name="jester-4", description="Jester Dataset 4: 7,699 users x 158 jokes, 106,489 ratings, 2015-2019",
            size="3 MB", licence=JESTER_LICENCE, citation=JESTER_CITATION, scale=JESTER,
            files=(JESTER4_RATINGS,), optional_files=("Dataset4JokeSet.xlsx",),
            parse=_jester_workbook(JESTER4_RATINGS, 158, "Dataset4JokeSet.xlsx"), n_ratings=106_489,
            extra_sources=(JESTER_ITEMS,),
            downloads=(Download(f"{EIGENTASTE}JesterDataset4.zip",
                                "98382f7f652daf67d7c6963afd7e007cea180b20af290c115fcb587387ea831b",
                                (JESTER4_RATINGS, "Dataset4JokeSet.xlsx")),),
        ),
    )
}

SPECIAL_NAMES = {
    "synthetic": "low-rank matrix/tensor generator of the FlowAdam paper (options n_users, n_items, rank, "
                 "density, noise, seed, n_contexts)",
    "csv:PATH": "your own ratings file (options sep, header, user_col, item_col, rating_col, timestamp_col, "
                "scale_min, scale_max, duplicates)",
}


def get_info(name: str) -> DatasetEntry:
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(list(DATASETS) + list(SPECIAL_NAMES))
        raise DataError(f"unknown dataset {name!r}; known: {known}") from None
