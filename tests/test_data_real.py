"""The real files under $RECSYS_FLOWADAM_DATA (CI runs these; locally they skip without it)."""

from __future__ import annotations

import numpy as np
import pytest

from recsys_flowadam.data import load_dataset, split_ratings

pytestmark = pytest.mark.real_data

REMOVED_JOKES = {1, 2, 3, 4, 5, 6, 9, 10, 11, 12, 14, 20, 27, 31, 43, 51, 52, 61, 73, 80, 100, 116}


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("RECSYS_FLOWADAM_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def ml100k(real_data_dir, private_cache):
    return load_dataset("ml-100k", real_data_dir, offline=True)


@pytest.fixture(scope="module")
def jester4(real_data_dir, private_cache):
    return load_dataset("jester-4", real_data_dir, offline=True)


def test_ml100k_counts(ml100k):
    r = ml100k
    assert (r.n_ratings, r.n_users, r.n_items) == (100_000, 943, 1_682)
    assert np.bincount(r.values.astype(int), minlength=6)[1:].tolist() == [6110, 11370, 27145, 34174, 21201]
    assert r.out_of_scale == 0 and r.timestamps is not None
    assert r.item_titles[r.item_index["543"]] == "Misérables, Les (1995)"  # u.item is latin-1
    assert r.source_files["u.data"] == "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490"


def test_ml100k_u1_to_u5_test_files_partition_u_data(ml100k):
    seen = np.zeros(ml100k.n_ratings, dtype=int)
    for k in range(1, 6):
        s = split_ratings(ml100k, f"u{k}", seed=0)
        assert (len(s.train), len(s.val), len(s.test)) == (70_000, 10_000, 20_000)
        keys = ml100k.users * ml100k.n_items + ml100k.items
        order = np.argsort(keys)
        test_pos = order[np.searchsorted(keys[order], s.test.users * ml100k.n_items + s.test.items)]
        seen[test_pos] += 1
    assert (seen == 1).all()


@pytest.mark.parametrize("which", ["ua", "ub"])
def test_ml100k_ua_ub_hold_out_ten_per_user(ml100k, which):
    s = split_ratings(ml100k, which, seed=0)
    assert (np.bincount(s.test.users, minlength=943) == 10).all()
    assert len(s.train) + len(s.val) == 90_570


def test_jester4_counts_and_out_of_scale(jester4):
    r = jester4
    assert (r.n_users, r.n_items, r.n_ratings) == (7_699, 158, 106_489)
    assert r.out_of_scale == 541
    assert r.observed_min == pytest.approx(-42.28, abs=1e-4) and r.observed_max == pytest.approx(28.58, abs=1e-4)
    never_rated = {int(j) for j in r.item_ids[np.bincount(r.items, minlength=158) == 0]}
    assert never_rated == REMOVED_JOKES
    assert (np.bincount(r.users, minlength=r.n_users) >= 1).all()
    assert r.item_titles.shape == (158,) and r.item_titles[0].startswith("A man visits the doctor")
    clipped = r.clipped()
    assert clipped.out_of_scale == 0 and clipped.observed_min == -10.0 and clipped.observed_max == 10.0


def test_jester4_cache_round_trip(real_data_dir, jester4, monkeypatch):
    from recsys_flowadam.data import loader
    from recsys_flowadam.data.paths import resolve_cache_dir

    assert list(resolve_cache_dir().glob("*.npz")), "the first load stored no parsed cache"

    def parsed_again(*args):
        raise AssertionError("jester-4 was parsed again instead of being served from the cache")

    monkeypatch.setattr(loader, "store", parsed_again)  # a cache miss parses, then stores
    again = load_dataset("jester-4", real_data_dir, offline=True)
    for field in ("users", "items", "values", "user_ids", "item_ids", "item_titles"):
        np.testing.assert_array_equal(getattr(again, field), getattr(jester4, field))


def test_cli_info_json_on_real_files(real_data_dir, private_cache, jester4, capsys):
    import json

    from recsys_flowadam.cli import main

    assert main(["data", "info", "jester-4", "--data-dir", str(real_data_dir), "--json", "--offline"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["n_users"], info["n_items"], info["n_ratings"], info["out_of_scale"]) == (7_699, 158, 106_489, 541)
    assert info["rating_min"] == pytest.approx(-42.28, abs=1e-4)
    assert main(["data", "info", "jester-4", "--data-dir", str(real_data_dir), "--json", "--offline", "--clip"]) == 0
    clipped = json.loads(capsys.readouterr().out)
    assert clipped["out_of_scale"] == 0 and clipped["rating_min"] == -10.0
