"""The scikit-learn-style Python API: fit, predict, recommend, save, load, serve; and that it
trains exactly what the `train` command trains for the same settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from recsys_flowadam import Recommender
from recsys_flowadam.recommender import NotFittedError

SETTINGS = dict(model="biased-mf", optimizer="adam", rank=3, lr=0.05, reg=0.001, steps=80, eval_every=5,
                patience=4, seed=3, device="cpu")


def _frame(n_users=120, n_items=60, density=0.4, seed=0) -> pd.DataFrame:
    """Low-rank ratings with biases on a 1..5 scale, integer raw IDs that are not 0..n-1."""
    rng = np.random.default_rng(seed)
    u_f, i_f = rng.normal(0, 0.8, (n_users, 3)), rng.normal(0, 0.8, (n_items, 3))
    mask = rng.random((n_users, n_items)) < density
    users, items = np.nonzero(mask)
    values = 3.2 + 0.4 * rng.normal(size=n_users)[users] + (u_f[users] * i_f[items]).sum(1)
    values = np.clip(np.round(2 * (values + rng.normal(0, 0.1, len(users)))) / 2, 1, 5)  # half stars
    return pd.DataFrame({"user": 1000 + users * 7, "item": 50 + items * 3, "rating": values,
                         "timestamp": np.arange(len(users))})


@pytest.fixture(scope="module")
def data():
    df = _frame()
    rng = np.random.default_rng(1)
    is_val = rng.random(len(df)) < 0.15
    return df[~is_val].reset_index(drop=True), df[is_val].reset_index(drop=True)


@pytest.fixture(scope="module")
def fitted(data, one_thread):
    train, val = data
    return Recommender(**SETTINGS).fit(train, val)


def test_params_follow_the_configuration(one_thread):
    from recsys_flowadam.train.config import TrainConfig

    rec = Recommender(rank=7)
    params = rec.get_params()
    assert params["rank"] == 7 and rec.rank == 7
    assert params["lr"] == TrainConfig().lr and params["model"] == TrainConfig().model  # defaults shown
    assert rec.set_params(lr=0.3, reg=0.1) is rec and rec.get_params()["lr"] == 0.3
    with pytest.raises(ValueError, match="rank"):
        Recommender(rank=0)
    with pytest.raises(ValueError, match="colour"):
        Recommender(colour="blue")
    with pytest.raises(ValueError, match="lr"):
        rec.set_params(lr=-1.0)
    assert rec.get_params()["lr"] == 0.3  # a refused change leaves the settings as they were
    with pytest.raises(NotFittedError):
        rec.predict([1], [2])


def test_fit_predict_with_raw_int_ids(fitted, data):
    train, val = data
    assert fitted.n_users_ > 0 and fitted.best_val_rmse_ is not None and fitted.grad_evals_ > 0
    assert fitted.history_ and "val_rmse" in fitted.history_[0]
    pred = fitted.predict(val["user"].to_numpy(), val["item"].to_numpy())
    assert isinstance(pred, np.ndarray) and pred.dtype == np.float64 and pred.shape == (len(val),)
    rmse = float(np.sqrt(np.mean((pred - val["rating"].to_numpy()) ** 2)))
    baseline = float(np.sqrt(np.mean((train["rating"].mean() - val["rating"].to_numpy()) ** 2)))
    assert rmse < 0.7 * baseline  # learnt the low-rank structure, not just the mean
    u, i = int(train["user"][0]), int(train["item"][0])
    assert fitted.predict([u], [i])[0] == fitted.predict([str(u)], [str(i)])[0]  # ints and strings alike
    assert fitted.predict(u, i).shape == (1,)
    assert ((pred >= 1) & (pred <= 5)).all()


def test_every_form_of_ids_is_matched_as_one_by_one(fitted, data):
    from recsys_flowadam.serve.scorer import Scorer

    train, _ = data
    users = np.r_[train["user"].to_numpy()[:40], [-5, 10**9]]  # two IDs the model does not list
    items = np.r_[train["item"].to_numpy()[:40], [train["item"].iloc[0], -6]]
    # the reference: each ID made the artifact's string and looked up alone (the service's way)
    want = Scorer(fitted.artifact_).predict([str(u) for u in users], [str(i) for i in items]).ratings
    forms = {"int64 arrays": (users, items), "int32 arrays": (users.astype(np.int32), items.astype(np.int32)),
             "lists of ints": (users.tolist(), items.tolist()),
             "integral floats": (users.astype(float), items.astype(float)),
             "strings": (users.astype(str), items.astype(str)),
             "object strings": (users.astype(str).astype(object), items.astype(str).astype(object)),
             "mixed objects": ([int(u) if k % 2 else str(u) for k, u in enumerate(users)],
                               [float(i) if k % 3 else str(i) for k, i in enumerate(items)]),
             "pandas series": (pd.Series(users), pd.Series(items))}
    for name, (u, i) in forms.items():
        np.testing.assert_array_equal(fitted.predict(u, i), want, err_msg=name)
    with pytest.raises(ValueError, match=r"users: 1.5 is not a valid ID"):
        fitted.predict(np.array([1.5]), [items[0]])
    with pytest.raises(ValueError, match="items: nan is not a valid ID"):
        fitted.predict([users[0]], [float("nan")])
    with pytest.raises(ValueError, match="predict: 2 users but 1 items"):
        fitted.predict(users[:2], items[:1])
    with pytest.raises(ValueError, match=r"users: give a sequence of IDs \(one dimension\), not an array of shape"):
        fitted.predict(users[:2].reshape(2, 1), items[:2])


@pytest.mark.parametrize("int_ids", [True, False])
def test_id_lookup_matches_the_one_by_one_rule_at_the_edges(int_ids):
    from recsys_flowadam.recommender import _IDLookup, _id_strings

    listed = ["3", "7", "9007199254740993", "18446744073709551615"] + ([] if int_ids else ["a7", "<NA>"])
    big = 9007199254740993  # past 2^53: a float64 would make it ...992
    inputs = [[big, 2.0, 7.0], np.array([18446744073709551615, 3], dtype=np.uint64), [2**70, 3],
              pd.Series([3, None, 7], dtype="Int64"), pd.Series(["a7", None, "3"], dtype="string"),
              np.array([3.0, 7.0]), ["7", 3, "a7"], np.array([True, False])]
    for values in inputs:
        lookup = _IDLookup(listed, int_ids)
        raw = values.astype(object) if isinstance(values, pd.Series) else values
        want = [listed.index(x) if x in listed else -1 for x in _id_strings(raw, "users")]
        assert lookup.positions(values, "users").tolist() == want, values


def test_unknown_ids_get_the_cold_start_rule(fitted, data):
    train, _ = data
    meta = fitted.artifact_.meta
    both_unknown = fitted.predict([-5], [-6])[0]
    assert both_unknown == pytest.approx(meta.global_mean)
    i = int(train["item"][0])
    item_pos = meta.item_ids.index(str(i))
    item_bias = float(fitted.artifact_.tensors["item_bias"][item_pos])
    assert fitted.predict([-5], [i])[0] == pytest.approx(np.clip(meta.global_mean + item_bias, 1, 5), abs=1e-5)


def test_recommend_ranks_unseen_items_by_prediction(fitted, data):
    train, _ = data
    user = int(train["user"][0])
    top = fitted.recommend(user, k=5)
    assert list(top.columns) == ["item", "rating"] and len(top) == 5
    assert top["item"].dtype.kind == "i"  # int IDs in, int IDs out
    assert not set(top["item"]) & set(train.loc[train["user"] == user, "item"])
    assert (np.diff(top["rating"].to_numpy()) <= 1e-9).all()
    np.testing.assert_allclose(top["rating"], fitted.predict([user] * 5, top["item"].to_numpy()), atol=1e-5)
    all_items = fitted.recommend(user, k=10_000, exclude_seen=False)
    assert len(all_items) == fitted.n_items_
    cold = fitted.recommend("nobody", k=3)
    assert len(cold) == 3


def test_save_load_round_trip_and_serve(fitted, data, tmp_path):
    from fastapi.testclient import TestClient

    from recsys_flowadam.serve import create_app
    from recsys_flowadam.serve.settings import Settings

    _, val = data
    out = fitted.save(tmp_path / "rec")
    loaded = Recommender.load(out)
    users, items = val["user"].to_numpy(), val["item"].to_numpy()
    np.testing.assert_array_equal(loaded.predict(users, items), fitted.predict(users, items))
    user = int(users[0])
    pd.testing.assert_frame_equal(loaded.recommend(user, k=4), fitted.recommend(user, k=4))
    assert loaded.get_params()["rank"] == SETTINGS["rank"] and loaded.get_params()["optimizer"] == "adam"
    client = TestClient(create_app(Settings(artifact_dir=out)))
    body = {"pairs": [{"user": str(u), "item": str(i)} for u, i in zip(users[:20], items[:20])]}
    response = client.post("/v1/predict", json=body)
    assert response.status_code == 200
    served = [p["rating"] for p in response.json()["predictions"]]
    np.testing.assert_allclose(served, fitted.predict(users[:20], items[:20]), rtol=1e-6)


def test_dataframe_errors_name_the_problem():
    rec = Recommender(**SETTINGS)
    with pytest.raises(ValueError, match="rating"):
        rec.fit(pd.DataFrame({"user": [1], "item": [2]}))
    with pytest.raises(ValueError, match="row 1.*not a finite"):
        rec.fit(pd.DataFrame({"user": [1, 2], "item": [2, 3], "rating": [4.0, np.nan]}))
    with pytest.raises(ValueError, match="duplicated"):
        rec.fit(pd.DataFrame({"user": [1, 1], "item": [2, 2], "rating": [4.0, 3.0]}))
    with pytest.raises(TypeError, match="DataFrame"):
        rec.fit([(1, 2, 3.0)])


def test_python_api_trains_what_the_cli_trains(tmp_path, capsys, one_thread):
    """Same data, split and settings: `train` and Recommender.fit give the same model."""
    from recsys_flowadam.artifact import load_artifact
    from recsys_flowadam.cli import main
    from recsys_flowadam.data import load_dataset, split_ratings
    from recsys_flowadam.serve.scorer import Scorer

    csv = tmp_path / "ratings.csv"
    _frame(seed=5)[["user", "item", "rating"]].to_csv(csv, index=False)
    settings = {**SETTINGS, "refit": True}
    argv = ["train", "--dataset", f"csv:{csv}", "--split", "random", "--threads", "1", "--json",
            "--out", str(tmp_path / "cli")]
    for key, value in settings.items():
        argv += ["--refit"] if key == "refit" else [f"--{key.replace('_', '-')}", str(value)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)

    split = split_ratings(load_dataset(f"csv:{csv}"), "random", seed=settings["seed"])
    rec = Recommender(**settings).fit(split.train, split.val)
    test = split.test
    users, items = test.user_ids[test.users], test.item_ids[test.items]
    cli_pred = Scorer(load_artifact(tmp_path / "cli")).predict(list(users), list(items)).ratings
    np.testing.assert_array_equal(rec.predict(users, items), cli_pred)
    rmse = float(np.sqrt(np.mean((rec.predict(users, items) - test.values) ** 2)))
    assert rmse == pytest.approx(summary["test_rmse"], rel=1e-6)


@pytest.mark.parametrize("preset", [None, "ACTIVE"])
def test_import_sets_a_passive_openmp_wait_policy_unless_the_user_chose(preset):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    out = subprocess.run([sys.executable, "-c", "import os, recsys_flowadam; print(os.environ['OMP_WAIT_POLICY'])"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == (preset or "PASSIVE")
