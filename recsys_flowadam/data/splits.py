"""Seeded, reproducible train/validation/test splits of a ``Ratings``.

Specs (``--split``):

* ``random[:TRAIN,VAL,TEST]`` - a uniform random partition of the ratings; default 0.7,0.1,0.2
  (the FlowAdam paper's protocol). Sizes are floor(fraction * n) for train and val, test gets the rest.
* ``u1``..``u5``, ``ua``, ``ub`` - ML-100K's canonical files ``<spec>.base`` / ``<spec>.test`` read from
  ``ratings.source_dir``; test = the .test ratings; validation = a seeded random 1/8 of the .base
  ratings (so u1..u5 give 70/10/20 like the default random split), train = the rest of .base.
* ``kfold:K:FOLD`` - a seeded random partition into K folds; test = fold FOLD (1-based, 1..K);
  validation = a seeded random 1/8 of the other folds; train = the rest.
* ``temporal[:TRAIN,VAL,TEST]`` - by timestamp (ties broken by file order): the earliest TRAIN
  fraction is train, the next VAL validation, the latest TEST test (needs timestamps).
* ``leave-out:K`` - per user, K random ratings to test and K other random ratings to validation;
  users with fewer than 2K+1 ratings keep all their ratings in train.

Users or items of val/test that are absent from train (cold start) are kept where they fall and
counted by ``Split.summary()``; models predict them from what they have (e.g. global mean/biases).
The three parts share the full dataset's ID maps, so an index means the same user/item everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .delimited import Column, read_delimited
from .errors import DataError
from .ratings import Ratings

VAL_OF_TRAIN = 0.125  # validation share carved out of a fixed train part (u1..u5, ua, ub, kfold)
CANONICAL = ("u1", "u2", "u3", "u4", "u5", "ua", "ub")


@dataclass
class Split:
    train: Ratings
    val: Ratings
    test: Ratings
    spec: str
    seed: int

    def summary(self) -> dict:
        """Sizes and cold-start counts (val/test ratings whose user or item has no train rating)."""
        seen_users = np.zeros(self.train.n_users, dtype=bool)
        seen_users[self.train.users] = True
        seen_items = np.zeros(self.train.n_items, dtype=bool)
        seen_items[self.train.items] = True
        out = {"spec": self.spec, "seed": self.seed, "n_train": len(self.train), "n_val": len(self.val),
               "n_test": len(self.test)}
        for label, part in (("val", self.val), ("test", self.test)):
            cold_u = ~seen_users[part.users]
            cold_i = ~seen_items[part.items]
            out[f"n_{label}_cold_user"] = int(cold_u.sum())
            out[f"n_{label}_cold_item"] = int(cold_i.sum())
            out[f"n_{label}_cold"] = int((cold_u | cold_i).sum())
        return out


def split_ratings(ratings: Ratings, spec: str = "random", seed: int = 0) -> Split:
    """Split ``ratings`` by ``spec`` (see the module docstring) with a seeded generator."""
    spec = spec.strip()
    kind, _, arg = spec.partition(":")
    rng = np.random.default_rng(seed)
    if kind == "random":
        fr = _fractions(arg, spec)
        perm = rng.permutation(len(ratings))
        n_train, n_val = _sizes(len(ratings), fr)
        parts = perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]
    elif kind in CANONICAL and not arg:
        test, base = _canonical(ratings, kind)
        parts = _carve_val(base, rng) + (test,)
    elif kind == "kfold":
        k, fold = _kfold_args(arg, spec)
        if len(ratings) < k:
            raise DataError(f"split {spec!r}: {len(ratings)} ratings cannot make {k} folds")
        folds = np.array_split(rng.permutation(len(ratings)), k)
        test = np.sort(folds[fold - 1])
        rest = np.sort(np.concatenate([f for i, f in enumerate(folds) if i != fold - 1]))
        parts = _carve_val(rest, rng) + (test,)
    elif kind == "temporal":
        if ratings.timestamps is None:
            raise DataError(f"split {spec!r}: {ratings.name} has no timestamps")
        fr = _fractions(arg, spec)
        order = np.argsort(ratings.timestamps, kind="stable")
        n_train, n_val = _sizes(len(ratings), fr)
        parts = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    elif kind == "leave-out":
        parts = _leave_out(ratings, arg, spec, rng)
    else:
        raise DataError(f"unknown split {spec!r}; use random[:TRAIN,VAL,TEST], u1..u5, ua, ub, kfold:K:FOLD, "
                        "temporal[:TRAIN,VAL,TEST] or leave-out:K")
    train, val, test = (np.sort(p) for p in parts)
    return Split(
        train=ratings.subset(train, f"{ratings.name}[train]"),
        val=ratings.subset(val, f"{ratings.name}[val]"),
        test=ratings.subset(test, f"{ratings.name}[test]"),
        spec=spec,
        seed=seed,
    )


def _fractions(arg: str, spec: str) -> tuple[float, float, float]:
    if not arg:
        return 0.7, 0.1, 0.2
    try:
        fr = tuple(float(x) for x in arg.split(","))
    except ValueError:
        raise DataError(f"split {spec!r}: fractions must be numbers, e.g. random:0.8,0.1,0.1") from None
    if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
        raise DataError(f"split {spec!r}: give three non-negative fractions TRAIN,VAL,TEST that sum to 1")
    return fr  # type: ignore[return-value]


def _sizes(n: int, fr: tuple[float, float, float]) -> tuple[int, int]:
    n_train = int(np.floor(fr[0] * n + 1e-9))
    n_val = int(np.floor(fr[1] * n + 1e-9))
    return n_train, min(n_val, n - n_train)


def _carve_val(base: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(base)
    n_val = int(round(VAL_OF_TRAIN * base.shape[0]))
    return perm[n_val:], perm[:n_val]


def _kfold_args(arg: str, spec: str) -> tuple[int, int]:
    try:
        k, fold = (int(x) for x in arg.split(":"))
    except ValueError:
        raise DataError(f"split {spec!r}: use kfold:K:FOLD with integers, e.g. kfold:5:1") from None
    if k < 2 or not 1 <= fold <= k:
        raise DataError(f"split {spec!r}: need K >= 2 and 1 <= FOLD <= K")
    return k, fold


def _canonical(ratings: Ratings, which: str) -> tuple[np.ndarray, np.ndarray]:
    """Rating indices of ``<which>.test`` and ``<which>.base``, matched by raw (user, item) IDs."""
    if ratings.source_dir is None:
        raise DataError(f"split {which!r}: {ratings.name} has no source folder holding {which}.base/{which}.test "
                        "(the canonical ML-100K splits)")
    keys = ratings.users * np.int64(ratings.n_items) + ratings.items
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    if np.any(sorted_keys[1:] == sorted_keys[:-1]):
        raise DataError(f"split {which!r}: {ratings.name} has several ratings of one (user, item) pair")
    out = []
    cols = (Column("user", 0), Column("item", 1), Column("rating", 2, "float"), Column("timestamp", 3))
    for ext in ("test", "base"):
        path = Path(ratings.source_dir) / f"{which}.{ext}"
        if not path.is_file():
            raise DataError(f"split {which!r}: {path} not found (canonical ML-100K split file)")
        data = read_delimited(path, "\t", 4, cols)
        users = _lookup(ratings.user_index, data["user"])
        items = _lookup(ratings.item_index, data["item"])
        bad = (users < 0) | (items < 0)
        if not bad.any():
            k = users * np.int64(ratings.n_items) + items
            pos = np.searchsorted(sorted_keys, k)
            pos = np.minimum(pos, len(sorted_keys) - 1)
            bad = sorted_keys[pos] != k
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(f"{path}:{row + 1}: user {data['user'][row]}, item {data['item'][row]} is not a rating "
                            f"of {ratings.name}")
        out.append(order[pos])
    test, base = out
    if np.intersect1d(test, base).size:
        raise DataError(f"split {which!r}: {which}.base and {which}.test share ratings")
    return test, base


def _lookup(index: dict[str, int], raw: np.ndarray) -> np.ndarray:
    uniq, inv = np.unique(raw, return_inverse=True)
    mapped = np.array([index.get(str(u), -1) for u in uniq.tolist()], dtype=np.int64)
    return mapped[inv]


def _leave_out(ratings: Ratings, arg: str, spec: str, rng: np.random.Generator):
    try:
        k = int(arg)
    except ValueError:
        raise DataError(f"split {spec!r}: use leave-out:K with an integer K >= 1") from None
    if k < 1:
        raise DataError(f"split {spec!r}: K must be >= 1")
    n = len(ratings)
    order = np.lexsort((rng.random(n), ratings.users))  # by user, random within user
    users_sorted = ratings.users[order]
    counts = np.bincount(ratings.users, minlength=ratings.n_users)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.arange(n) - starts[users_sorted]
    eligible = counts[users_sorted] > 2 * k
    test = order[eligible & (rank < k)]
    val = order[eligible & (rank >= k) & (rank < 2 * k)]
    train = order[~(eligible & (rank < 2 * k))]
    return train, val, test
