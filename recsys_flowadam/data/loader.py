"""``load_dataset``: find (or download) a dataset's files, parse them (or reuse the parsed cache)."""

from __future__ import annotations

import inspect
from pathlib import Path

from .cache import cache_key, hash_sources, load_cached, store
from .custom import load_custom_csv
from .errors import DataError
from .paths import offline_by_default, resolve_cache_dir, resolve_data_dir
from .ratings import Ratings
from .registry import DatasetEntry, get_info
from .synthetic import load_synthetic


def load_dataset(name: str, data_dir: str | Path | None = None, *, offline: bool = False, clip: bool = False,
                 **options) -> Ratings:
    """Load a dataset by name (see ``DATASETS``), ``"synthetic"`` or ``"csv:PATH"``.

    Missing files are downloaded into ``<data root>/<name>/`` unless ``offline`` (or
    ``$RECSYS_FLOWADAM_OFFLINE=1``), in which case the error says which files to put where.
    ``clip=True`` clips ratings to the documented scale (Jester-4 has values outside it).
    ``cache=False`` skips the parsed-dataset cache. Other options go to the parser:
    ``duplicates`` ("error" | "first" | "last" | "mean"), jester-1 ``part``, synthetic and csv options.
    """
    use_cache = bool(options.pop("cache", True))
    if name == "synthetic":
        ratings = _call(load_synthetic, "synthetic", options)
    elif name.startswith("csv:"):
        ratings = _cached_or_parsed(name, Path(name[4:]).expanduser().parent, [Path(name[4:]).name], options,
                                    use_cache, lambda: _call(load_custom_csv, name, options, Path(name[4:])))
    else:
        info = get_info(name)
        folder = resolve_data_dir(data_dir) / name
        files = info.required_files(**options)
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            if offline or offline_by_default():
                raise DataError(offline_message(info, folder, missing))
            from .download import fetch  # network code only when needed
            fetch(name, data_dir, files=files)
        sources = list(files) + list(info.optional_files)
        ratings = _cached_or_parsed(name, folder, sources, options, use_cache,
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
    store(cache_dir, key, ratings)
    return ratings


def offline_message(info: DatasetEntry, folder: Path, missing: list[str]) -> str:
    lines = [f"{info.name}: missing {', '.join(str(folder / m) for m in missing)} and downloads are off (offline)."]
    for d in info.downloads_for(tuple(missing)):
        digest = f"sha256 {d.sha256}" if d.sha256 else "no published sha256"
        if d.archive:
            lines.append(f"  download {d.url} ({digest}), unzip it and put the files of its top folder "
                         f"({', '.join(d.provides)}) into {folder}/")
        else:
            lines.append(f"  download {d.url} ({digest}) and save it as {folder / d.provides[0]}")
    return "\n".join(lines)
