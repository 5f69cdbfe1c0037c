"""Turn parsed raw columns into a ``Ratings``: index the raw IDs, apply the duplicates policy.

Index order (documented, deterministic): raw IDs are sorted numerically when every ID of
that kind is an integer (MovieLens, Jester), otherwise lexicographically as strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal, Mapping

import numpy as np
import pandas as pd

from .errors import DataError
from .ratings import Ratings, RatingScale
from .values import first_not_float32, float_problem

DuplicatesPolicy = Literal["error", "first", "last", "mean"]
DUPLICATE_POLICIES = ("error", "first", "last", "mean")


def index_ids(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, ids): ``ids[codes[k]] == str(raw[k])``; ids sorted numerically when all are integers."""
    raw = np.asarray(raw)
    if raw.dtype.kind in "iu":
        codes, uniques = pd.factorize(raw, sort=True)
        return codes.astype(np.int64), np.asarray(uniques).astype(str).astype(object)
    codes, uniques = pd.factorize(np.asarray(raw, dtype=object), sort=False)
    uniques = np.asarray(uniques, dtype=object)
    as_num = pd.to_numeric(pd.Series(uniques), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isfinite(as_num).all() and np.all(as_num == np.round(as_num)):
        order = np.lexsort((uniques.astype(str), as_num))  # numeric, ties ("01" vs "1") by string
    else:
        order = np.argsort(uniques.astype(str), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[codes].astype(np.int64), uniques[order].astype(str).astype(object)


def resolve_duplicates(
    keys: np.ndarray,
    values: np.ndarray,
    policy: str,
    describe: Callable[[int, int], str],
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Apply the duplicates policy to ratings identified by integer ``keys`` (one per (user, item[, context])).

    Returns (kept row indices in original order, replacement values or None, number of rows dropped).
    ``describe(first_row, dup_row)`` builds the error message for policy "error".
    Policies: "error" (default: refuse, naming both lines), "first"/"last" (keep the first/last
    occurrence in file order), "mean" (one rating with the mean value, at the first occurrence).
    """
    if policy not in DUPLICATE_POLICIES:
        raise DataError(f"duplicates: unknown policy {policy!r}; choose one of {', '.join(DUPLICATE_POLICIES)}")
    n = keys.shape[0]
    if n == 0:
        return np.arange(0), None, 0
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    is_repeat = np.empty(n, dtype=bool)
    is_repeat[0] = False
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=is_repeat[1:])
    np.logical_not(is_repeat[1:], out=is_repeat[1:])
    if not is_repeat.any():
        return np.arange(n), None, 0
    n_dropped = int(is_repeat.sum())
    if policy == "error":
        pos = int(np.argmax(is_repeat))
        first = pos - 1
        while first > 0 and sorted_keys[first - 1] == sorted_keys[pos]:
            first -= 1
        raise DataError(describe(int(order[first]), int(order[pos])) + f" ({n_dropped} duplicated rows in all; "
                        "pass duplicates='first', 'last' or 'mean' to resolve them)")
    group_start = ~is_repeat
    group_id = np.cumsum(group_start) - 1
    starts = np.flatnonzero(group_start)
    if policy == "first":
        kept = order[starts]
        new_values = None
    elif policy == "last":
        ends = np.append(starts[1:], n) - 1
        kept = order[ends]
        new_values = None
    else:  # mean
        sums = np.bincount(group_id, weights=values[order].astype(np.float64))
        counts = np.bincount(group_id)
        kept = order[starts]
        new_values = (sums / counts)
    sort_back = np.argsort(kept, kind="stable")
    kept = kept[sort_back]
    if new_values is not None:
        new_values = new_values[sort_back]
    return kept, new_values, n_dropped


def build_ratings(
    name: str,
    raw_users: np.ndarray,
    raw_items: np.ndarray,
    values: np.ndarray,
    scale: RatingScale,
    *,
    timestamps: np.ndarray | None = None,
    titles: Mapping[str, str] | None = None,
    raw_contexts: np.ndarray | None = None,
    duplicates: str = "error",
    describe_row: Callable[[int], str] | None = None,
    source_files: Mapping[str, str] | None = None,
    source_dir: Path | None = None,
    description: str = "",
    all_item_ids: np.ndarray | None = None,
) -> Ratings:
    """Index raw IDs, resolve duplicated (user, item[, context]) pairs, attach titles.

    ``describe_row(k)`` names row k's origin (e.g. "u.data:17") for errors: duplicates, and values
    that are not finite or overflow float32 (refused, never stored as inf).
    ``all_item_ids`` (integers) adds items that have no rating (Jester jokes never rated) to the index.
    """
    values = np.asarray(values, dtype=np.float64)
    describe = describe_row or (lambda k: f"row {k + 1}")
    if (k := first_not_float32(values)) is not None:
        raise DataError(f"{describe(k)}: rating {values[k]:g} {float_problem(values[k])}")
    if all_item_ids is not None:
        item_codes, item_ids = _index_with_universe(np.asarray(raw_items), np.asarray(all_item_ids))
    else:
        item_codes, item_ids = index_ids(raw_items)
    user_codes, user_ids = index_ids(raw_users)
    contexts = None
    n_contexts = 0
    if raw_contexts is not None:
        contexts, context_ids = index_ids(raw_contexts)
        n_contexts = int(context_ids.shape[0])
    n_dup = 0
    if len(values):
        keys = user_codes * np.int64(len(item_ids)) + item_codes
        if contexts is not None:
            keys = keys * np.int64(n_contexts) + contexts
        kept, new_values, n_dup = resolve_duplicates(
            keys, values, duplicates,
            lambda a, b: f"{describe(b)}: duplicated rating of user {user_ids[user_codes[b]]!r}, item "
                         f"{item_ids[item_codes[b]]!r} (first given at {describe(a)})",
        )
        if n_dup:
            user_codes, item_codes = user_codes[kept], item_codes[kept]
            values = values[kept] if new_values is None else new_values
            if timestamps is not None:
                timestamps = np.asarray(timestamps)[kept]
            if contexts is not None:
                contexts = contexts[kept]
    item_titles = None
    if titles is not None:
        item_titles = np.array([titles.get(i, "") for i in item_ids.tolist()], dtype=object)
    return Ratings(
        name=name, users=user_codes, items=item_codes, values=values.astype(np.float32), user_ids=user_ids,
        item_ids=item_ids, scale=scale, timestamps=timestamps, item_titles=item_titles, contexts=contexts,
        n_contexts=n_contexts, source_files=dict(source_files or {}), source_dir=source_dir,
        description=description, n_duplicates=n_dup,
    )


def _index_with_universe(raw: np.ndarray, universe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    universe = np.unique(np.asarray(universe, dtype=np.int64))
    codes = np.searchsorted(universe, raw.astype(np.int64))
    return codes.astype(np.int64), universe.astype(str).astype(object)
