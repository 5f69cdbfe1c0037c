"""Splits: partitions, proportions, seeds, canonical ML-100K files, temporal order, leave-out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsys_flowadam.data import DataError, Ratings, RatingScale, Split, load_dataset, split_ratings


def make_ratings(n_users=40, n_items=30, density=0.5, seed=0, source_dir: Path | None = None) -> Ratings:
    rng = np.random.default_rng(seed)
    users, items = np.nonzero(rng.random((n_users, n_items)) < density)
    n = users.size
    return Ratings(
        name="toy", users=users, items=items, values=rng.integers(1, 6, n).astype(np.float32),
        user_ids=np.arange(1, n_users + 1).astype(str), item_ids=np.arange(1, n_items + 1).astype(str),
        scale=RatingScale(1, 5), timestamps=rng.permutation(n) * 10 + 1_000_000, source_dir=source_dir,
    )


def parts(split: Split) -> list[np.ndarray]:
    """Each part's ratings as sorted (user, item) keys (the toy data has one rating per pair)."""
    return [np.sort(p.users * 1000 + p.items) for p in (split.train, split.val, split.test)]


def assert_partition(split: Split, ratings: Ratings) -> None:
    keys = np.concatenate(parts(split))
    np.testing.assert_array_equal(np.sort(keys), np.sort(ratings.users * 1000 + ratings.items))
    assert len(np.unique(keys)) == len(keys)
    for p in (split.train, split.val, split.test):  # values travel with their (user, item)
        assert p.user_ids is ratings.user_ids and p.item_ids is ratings.item_ids


@pytest.mark.parametrize("spec,fractions", [("random", (0.7, 0.1, 0.2)), ("random:0.5,0.25,0.25", (0.5, 0.25, 0.25)),
                                            ("temporal", (0.7, 0.1, 0.2)), ("temporal:0.8,0.1,0.1", (0.8, 0.1, 0.1))])
def test_fraction_splits(spec, fractions):
    r = make_ratings()
    s = split_ratings(r, spec, seed=5)
    assert_partition(s, r)
    n = len(r)
    assert len(s.train) == int(fractions[0] * n) and len(s.val) == int(fractions[1] * n)
    lookup = dict(zip(r.users * 1000 + r.items, r.values))
    assert all(lookup[k] == v for k, v in zip(s.test.users * 1000 + s.test.items, s.test.values))


def test_random_is_seeded():
    r = make_ratings()
    a, b, c = (split_ratings(r, "random", seed=s) for s in (1, 1, 2))
    for x, y in zip(parts(a), parts(b)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(parts(a)[2], parts(c)[2])


def test_temporal_orders_by_time():
    r = make_ratings()
    s = split_ratings(r, "temporal")
    assert s.train.timestamps.max() < s.val.timestamps.min() <= s.val.timestamps.max() < s.test.timestamps.min()
    no_time = make_ratings()
    no_time.timestamps = None
    with pytest.raises(DataError, match="no timestamps"):
        split_ratings(no_time, "temporal")


def test_kfold_folds_partition_the_data():
    r = make_ratings()
    tests = [parts(split_ratings(r, f"kfold:5:{k}", seed=3))[2] for k in range(1, 6)]
    all_test = np.concatenate(tests)
    np.testing.assert_array_equal(np.sort(all_test), np.sort(r.users * 1000 + r.items))
    s = split_ratings(r, "kfold:5:2", seed=3)
    assert_partition(s, r)
    assert abs(len(s.val) - 0.125 * (len(s.train) + len(s.val))) <= 1
    for bad in ("kfold:5:6", "kfold:1:1", "kfold:five:1"):
        with pytest.raises(DataError):
            split_ratings(r, bad)


def test_leave_out_per_user():
    r = make_ratings(density=0.2, seed=4)
    k = 2
    s = split_ratings(r, "leave-out:2", seed=0)
    assert_partition(s, r)
    counts = np.bincount(r.users, minlength=r.n_users)
    for part in (s.val, s.test):
        per_user = np.bincount(part.users, minlength=r.n_users)
        np.testing.assert_array_equal(per_user, np.where(counts > 2 * k, k, 0))
    assert (counts <= 2 * k).any()  # the toy data has users that keep everything in train


def test_summary_counts_cold_users_and_items():
    r = make_ratings()
    s = split_ratings(r, "random", seed=0)
    # make user 0 cold by hand: move its train ratings to test
    moved = s.train.users == 0
    s = Split(train=s.train.subset(~moved), val=s.val, test=s.test, spec="custom", seed=0)
    summary = s.summary()
    assert summary["n_test_cold_user"] == int((s.test.users == 0).sum()) > 0
    assert summary["n_val_cold_user"] == int((s.val.users == 0).sum())
    assert summary["n_train"] == len(s.train) and summary["n_test"] == len(s.test)


def write_canonical(folder: Path, r: Ratings) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{r.user_ids[u]}\t{r.item_ids[i]}\t{int(v)}\t{t}\n" for u, i, v, t in
             zip(r.users, r.items, r.values, r.timestamps)]
    (folder / "u.data").write_text("".join(lines))
    folds = np.arange(len(lines)) % 5
    for k in range(5):
        (folder / f"u{k + 1}.test").write_text("".join(l for l, f in zip(lines, folds) if f == k))
        (folder / f"u{k + 1}.base").write_text("".join(l for l, f in zip(lines, folds) if f != k))


def test_canonical_ml100k_files(tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_FLOWADAM_CACHE", str(tmp_path / "cache"))
    write_canonical(tmp_path / "ml-100k", make_ratings())
    r = load_dataset("ml-100k", tmp_path, offline=True)
    for k in range(1, 6):
        s = split_ratings(r, f"u{k}", seed=0)
        assert_partition(s, r)
        test_lines = (tmp_path / "ml-100k" / f"u{k}.test").read_text().splitlines()
        want = sorted((int(l.split("\t")[0]), int(l.split("\t")[1])) for l in test_lines)
        got = sorted(zip(r.user_ids[s.test.users].astype(int), r.item_ids[s.test.items].astype(int)))
        assert got == want
        assert len(s.val) == round(0.125 * (len(s.train) + len(s.val)))
    with pytest.raises(DataError, match=r"ua\.test not found"):
        split_ratings(r, "ua")
    with open(tmp_path / "ml-100k" / "u2.test", "a") as fh:
        fh.write("999\t1\t3\t5\n")
    with pytest.raises(DataError, match=r"u2\.test:\d+: user 999, item 1 is not a rating"):
        split_ratings(r, "u2")


def test_bad_specs():
    r = make_ratings()
    for bad in ("bogus", "random:0.5,0.5", "random:0.5,0.4,0.4", "random:a,b,c", "leave-out:x", "leave-out:0"):
        with pytest.raises(DataError):
            split_ratings(r, bad)
