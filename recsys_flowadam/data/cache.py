"""Parsed-dataset cache: ``.npz`` arrays (loaded with allow_pickle=False) plus a JSON sidecar.

Entries live in the writable cache dir (never the data root), named by a key built from the
dataset name, the parse options, the format version and the SHA-256 of every source file,
so a changed file can never be served from a stale cache. Writes are atomic (temp + os.replace).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np

from ..safe_write import atomic_write
from .paths import file_sha256
from .ratings import Ratings, RatingScale

FORMAT_VERSION = 1
_ARRAYS = ("users", "items", "values", "timestamps", "contexts", "user_ids", "item_ids", "item_titles")


def cache_key(name: str, options: Mapping, source_hashes: Mapping[str, str]) -> str:
    blob = json.dumps({"v": FORMAT_VERSION, "name": name, "options": dict(options),
                       "sources": dict(sorted(source_hashes.items()))}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def hash_sources(folder: Path, names) -> dict[str, str]:
    """SHA-256 of the given files under ``folder`` that exist."""
    return {n: file_sha256(folder / n) for n in names if (folder / n).is_file()}


def load_cached(cache_dir: Path, key: str, source_dir: Path | None) -> Ratings | None:
    npz, meta_path = cache_dir / f"{key}.npz", cache_dir / f"{key}.json"
    if not (npz.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        with np.load(npz, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        def text(k):
            return arrays[k].astype(object) if k in arrays else None
        return Ratings(
            name=meta["name"], users=arrays["users"], items=arrays["items"], values=arrays["values"],
            user_ids=text("user_ids"), item_ids=text("item_ids"),
            scale=RatingScale(meta["scale_min"], meta["scale_max"]),
            timestamps=arrays.get("timestamps"), item_titles=text("item_titles"), contexts=arrays.get("contexts"),
            n_contexts=meta["n_contexts"], source_files=meta["source_files"], source_dir=source_dir,
            description=meta["description"], n_duplicates=meta.get("n_duplicates", 0),
        )
    except (OSError, ValueError, KeyError) as exc:  # a damaged entry is ignored and rebuilt
        warnings.warn(f"ignoring damaged parsed-dataset cache {npz}: {exc}", RuntimeWarning, stacklevel=2)
        return None


def store(cache_dir: Path, key: str, ratings: Ratings) -> Path | None:
    """Write the entry atomically; a cache that cannot be written is only a warning."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for k in _ARRAYS:
            value = getattr(ratings, k)
            if value is None:
                continue
            arrays[k] = value.astype(str) if value.dtype == object else value
        meta = {"name": ratings.name, "scale_min": ratings.scale.min, "scale_max": ratings.scale.max,
                "n_contexts": ratings.n_contexts, "source_files": dict(ratings.source_files),
                "description": ratings.description, "n_duplicates": ratings.n_duplicates}
        npz = cache_dir / f"{key}.npz"
        atomic_write(npz, lambda fh: np.savez(fh, **arrays))
        atomic_write(cache_dir / f"{key}.json", lambda fh: fh.write(json.dumps(meta, indent=1).encode()))
        return npz
    except OSError as exc:
        warnings.warn(f"could not write the parsed-dataset cache in {cache_dir}: {exc}", RuntimeWarning, stacklevel=2)
        return None
