"""Where datasets are found (the data root) and where parsed copies are cached.

The data root holds one folder per dataset name with the official archive's files, e.g.
``<root>/ml-100k/u.data``. It may be read-only: loading never writes there; only
``recsys-flowadam data fetch`` (``download.fetch``) does. Parsed datasets are cached in a
separate, writable cache folder.
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
# In a dataset folder while a download moves files in; removed when all are in place. Loads refuse
# a folder holding it: an I/O error mid-move must not leave a half dataset that loads accept.
INCOMPLETE_MARKER = ".recsys-flowadam-incomplete.json"


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data root: ``data_dir`` (--data-dir), else ``$RECSYS_FLOWADAM_DATA``, else
    ``<platform user cache dir>/recsys-flowadam/datasets`` (e.g. ``~/.cache/recsys-flowadam/datasets``)."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser().resolve()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return platformdirs.user_cache_path(APP_NAME) / "datasets"


def data_root_origin(data_dir: str | Path | None = None) -> str:
    """Where ``resolve_data_dir`` took the root from, for messages: a user who forgot an
    ``export`` must see that the default was used."""
    if data_dir is not None and str(data_dir) != "":
        return "from --data-dir"
    if os.environ.get(DATA_ENV):
        return f"from ${DATA_ENV}"
    return f"the default: neither --data-dir nor ${DATA_ENV} is set"


def dataset_folder(name: str, data_dir: str | Path | None = None) -> Path:
    """``<root>/<name>``, except when the root is itself that dataset's folder
    (``--data-dir .../datasets/ml-100k``): then the root's parent is the real root and the
    folder is the root, never ``ml-100k/ml-100k``."""
    root = resolve_data_dir(data_dir)
    if root.name == name and not (root / name).is_dir():
        return root
    return root / name


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


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (never the whole file in memory).

    Deliberately not remembered between calls: a memo keyed on (path, size, mtime) served a
    file rewritten with the same size and mtime stale, and hashing (about 1.3 GB/s) costs
    little next to parsing the same bytes.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
