"""Parsed-dataset cache: ``.npz`` arrays (loaded with allow_pickle=False) plus a JSON sidecar.

Entries live in the writable cache dir (never the data root), named by a key built from the
dataset name, the parse options, the format version and the SHA-256 of every file the parser
reads, so a changed file can never be served from a stale cache. Writes are atomic (temp +
os.replace), the sidecar last. The sidecar holds a SHA-256 of the entry's content (every
array's name, dtype, shape and bytes, and the sidecar's other fields), checked on every load:
a truncated, empty or altered entry is ignored with a warning and rebuilt, never served.
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

FORMAT_VERSION = 2  # 2: sidecar holds the content digest (version 1 entries are never read)
_ARRAYS = ("users", "items", "values", "timestamps", "contexts", "user_ids", "item_ids", "item_titles")


def cache_key(name: str, options: Mapping, source_hashes: Mapping[str, str]) -> str:
    """The entry name: a hash of the dataset name, parse options, format version and source hashes."""
    blob = json.dumps({"v": FORMAT_VERSION, "name": name, "options": dict(options),
                       "sources": dict(sorted(source_hashes.items()))}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def hash_sources(folder: Path, names) -> dict[str, str]:
    """SHA-256 of the given files under ``folder`` that exist."""
    return {n: file_sha256(folder / n) for n in names if (folder / n).is_file()}


def content_digest(meta: Mapping, arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the sidecar fields and every array (name, dtype, shape, bytes), in a fixed order."""
    digest = hashlib.sha256(json.dumps(dict(meta), sort_keys=True).encode())
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        digest.update(f"\0{k}\0{a.dtype.str}\0{a.shape}\0".encode())
        digest.update(memoryview(a).cast("B"))
    return digest.hexdigest()


def load_cached(cache_dir: Path, key: str, source_dir: Path | None) -> Ratings | None:
    """The entry's Ratings, or None when there is none or it is damaged (then it is rebuilt)."""
    npz, meta_path = cache_dir / f"{key}.npz", cache_dir / f"{key}.json"
    if not (npz.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        expected = meta.pop("content_sha256")
        with np.load(npz, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        if meta.get("key") != key or content_digest(meta, arrays) != expected:
            raise ValueError("its content does not match the digest in its sidecar")
        return _ratings(meta, arrays, source_dir)
    except Exception as exc:  # noqa: BLE001 - a damaged file raises anything (EOFError, BadZipFile, ...)
        warnings.warn(f"ignoring a damaged parsed-dataset cache entry {npz} ({type(exc).__name__}: {exc}); "
                      "parsing the source files again", RuntimeWarning, stacklevel=2)
        return None


def _ratings(meta: Mapping, arrays: Mapping[str, np.ndarray], source_dir: Path | None) -> Ratings:
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


def store(cache_dir: Path, key: str, ratings: Ratings) -> Path | None:
    """Write the entry atomically (arrays, then the sidecar); a cache that cannot be written is only a warning."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for k in _ARRAYS:
            value = getattr(ratings, k)
            if value is None:
                continue
            arrays[k] = value.astype(str) if value.dtype == object else value
        meta = {"key": key, "name": ratings.name, "scale_min": ratings.scale.min, "scale_max": ratings.scale.max,
                "n_contexts": ratings.n_contexts, "source_files": dict(ratings.source_files),
                "description": ratings.description, "n_duplicates": ratings.n_duplicates}
        meta["content_sha256"] = content_digest(meta, arrays)
        npz = cache_dir / f"{key}.npz"
        atomic_write(npz, lambda fh: np.savez(fh, **arrays))
        atomic_write(cache_dir / f"{key}.json", lambda fh: fh.write(json.dumps(meta, indent=1).encode()))
        return npz
    except OSError as exc:
        warnings.warn(f"could not write the parsed-dataset cache in {cache_dir}: {exc}", RuntimeWarning, stacklevel=2)
        return None
