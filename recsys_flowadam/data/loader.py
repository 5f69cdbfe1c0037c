"""``load_dataset``: find a dataset's files, parse them (or reuse the parsed cache).

Loading never downloads: a missing dataset is an error naming the data root that was searched
and the ways to point at data (``--data-dir``, ``$RECSYS_FLOWADAM_DATA``) or fetch it
(``recsys-flowadam data fetch NAME``, which is ``download.fetch``). A download is a deliberate
act (hundreds of MB, licence terms, a location the user chose), never a side effect of a typo
in a path or a forgotten ``export``.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

from .cache import cache_key, hash_sources, load_cached, store
from .custom import load_custom_csv
from .errors import DataError
from .guidance import incomplete_message, missing_message
from .paths import INCOMPLETE_MARKER, dataset_folder, resolve_cache_dir
from .ratings import Ratings
from .registry import get_info
from .synthetic import load_synthetic


def load_dataset(name: str, data_dir: str | Path | None = None, *, offline: bool = False, clip: bool = False,
                 **options) -> Ratings:
    """Load a dataset by name (see ``DATASETS``), ``"synthetic"`` or ``"csv:PATH"``.

    Registered datasets are read from ``<data root>/<name>/``; missing files are a ``DataError``
    that says where they were looked for and how to get them (loading never downloads, so
    ``offline`` changes nothing; it stays for callers that pass it).
    ``clip=True`` clips ratings to the documented scale (Jester-4 has values outside it).
    ``cache=False`` skips the parsed-dataset cache. Other options go to the parser:
    ``duplicates`` ("error" | "first" | "last" | "mean"), jester-1 ``part``, synthetic and csv options.
    """
    del offline  # kept in the signature: loading never downloads
    use_cache = bool(options.pop("cache", True))
    if name == "synthetic":
        ratings = _call(load_synthetic, "synthetic", options)
    elif name.startswith("csv:"):
        path = Path(name[4:]).expanduser()
        ratings = _cached_or_parsed(name, path.parent, [path.name], options, use_cache,
                                    lambda: _call(load_custom_csv, name, options, path))
    else:
        info = get_info(name)
        folder = dataset_folder(name, data_dir)
        files = info.required_files(**options)
        if (folder / INCOMPLETE_MARKER).exists():
            raise DataError(incomplete_message(info, data_dir, folder))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise DataError(missing_message(info, data_dir, folder, missing))
        ratings = _cached_or_parsed(name, folder, info.source_names(folder, **options), options, use_cache,
                                    lambda: _call(info.parse, name, options, folder, info))
    return ratings.clipped() if clip else ratings


def _call(func, label: str, options: dict, *args) -> Ratings:
    params = inspect.signature(func).parameters
    allowed = [p for p in params if params[p].kind is inspect.Parameter.KEYWORD_ONLY
               or (params[p].default is not inspect.Parameter.empty)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DataError(f"{label}: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(allowed) or 'none'}")
    return func(*args, **options)


def _cached_or_parsed(name: str, folder: Path, sources: list[str], options: dict, use_cache: bool, parse) -> Ratings:
    """The cached entry for these source hashes, else a fresh parse (stored unless a source changed meanwhile)."""
    if not use_cache:
        return parse()
    hashes = hash_sources(folder, sources)
    if not hashes:
        return parse()
    key = cache_key(name, options, hashes)
    cache_dir = resolve_cache_dir()
    cached = load_cached(cache_dir, key, folder)
    if cached is not None:
        return cached
    ratings = parse()
    # the parsers hash each file after reading it: a file rewritten between the key's hash and
    # the parse would store new content under the old content's key
    changed = sorted(n for n, h in ratings.source_files.items() if n in hashes and hashes[n] != h)
    if changed:
        warnings.warn(f"{', '.join(changed)} in {folder} changed while being read; the parsed copy is not cached",
                      RuntimeWarning, stacklevel=3)
        return ratings
    store(cache_dir, key, ratings)
    return ratings
