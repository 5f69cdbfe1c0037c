"""Where datasets are found (the data root) and where parsed copies are cached.

The data root holds one folder per dataset name with the official archive's files, e.g.
``<root>/ml-100k/u.data``. It may be read-only: the loaders never write there except to
download a dataset that is missing. Parsed datasets are cached in a separate, writable
cache folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import platformdirs

APP_NAME = "recsys-flowadam"
DATA_ENV = "RECSYS_FLOWADAM_DATA"
CACHE_ENV = "RECSYS_FLOWADAM_CACHE"
OFFLINE_ENV = "RECSYS_FLOWADAM_OFFLINE"


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data root: ``data_dir`` (--data-dir), else ``$RECSYS_FLOWADAM_DATA``, else
    ``<platform user cache dir>/recsys-flowadam/datasets`` (e.g. ``~/.cache/recsys-flowadam/datasets``)."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser().resolve()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return platformdirs.user_cache_path(APP_NAME) / "datasets"


def resolve_cache_dir() -> Path:
    """Writable folder for parsed-dataset caches: ``$RECSYS_FLOWADAM_CACHE``, else
    ``<platform user cache dir>/recsys-flowadam/parsed``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return platformdirs.user_cache_path(APP_NAME) / "parsed"


def offline_by_default() -> bool:
    """True when ``$RECSYS_FLOWADAM_OFFLINE`` is set to 1/true/yes (forbids downloads)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (never the whole file in memory).

    Remembered per (path, size, mtime) within the process: the cache key and the parsed
    ``Ratings.source_files`` both need the hash of a possibly 700 MB file.
    """
    st = os.stat(path)
    memo_key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if memo_key in _HASHES:
        return _HASHES[memo_key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    if len(_HASHES) > 256:
        _HASHES.clear()
    _HASHES[memo_key] = digest.hexdigest()
    return _HASHES[memo_key]
