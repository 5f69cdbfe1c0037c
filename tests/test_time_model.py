"""time-mf (biased MF + time-binned item biases + user drift) and time-svdpp (SVD++ with the same
time terms): gradients against autograd, the rating rule on numpy and torch, the artifact round
trip through ``evaluate`` and the service, and the defaults against the training mean."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from recsys_flowadam.artifact import load_artifact, save_artifact
from recsys_flowadam.models import make_path
from recsys_flowadam.models.coords import Coords
from recsys_flowadam.models.factorization import ModelSpec, Objective, init_params
from recsys_flowadam.models.prediction import RatingRule, fold_rows, rule_from_artifact
from recsys_flowadam.models.svdpp import implicit_of
from recsys_flowadam.models.svdpp_autograd import SvdppAutogradPath
from recsys_flowadam.models.time_axis import SECONDS_PER_DAY, fit_time_axis
from recsys_flowadam.models.timeaware import (TimeAutogradPath, TimeDensePath, TimeGatherPath, TimeSparsePath,
                                              torch_axis)
from recsys_flowadam.serve import create_app
from recsys_flowadam.serve.settings import Settings
from recsys_flowadam.train.config import TrainConfig
from recsys_flowadam.train.export import artifact_payload
from recsys_flowadam.train.pipeline import DataSettings, evaluate_artifact, evaluate_ratings, fit_and_score, load_split

N_USERS, N_ITEMS, N_BINS = 30, 40, 5
START = 880_000_000  # seconds: late 1997, as ML-100K


def _toy(n: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    cells = rng.choice(N_USERS * N_ITEMS, n, replace=False)
    users, items = cells // N_ITEMS, cells % N_ITEMS
    ts = rng.integers(START, START + 200 * 86400, n)
    return users, items, ts, rng.integers(1, 6, n).astype(np.float64)


def _problem(loss: str, weighted: bool, model: str = "time-mf"):
    users, items, ts, y = _toy()
    axis = torch_axis(fit_time_axis(users, ts, N_USERS, N_BINS), "cpu")
    coords = Coords(torch.from_numpy(users), torch.from_numpy(items), torch.from_numpy(y), torch.from_numpy(ts))
    gen = torch.Generator().manual_seed(1)
    weights = None
    if weighted:
        weights = {"user": torch.rand(N_USERS, generator=gen, dtype=torch.float64),
                   "item": torch.rand(N_ITEMS, generator=gen, dtype=torch.float64)}
        # the time terms' own weights (models.timeaware.time_penalty_weights) take precedence
        weights["item_time_bias"] = weights["item"] * 7.0
        weights["user_drift_bias"] = weights["user"] * 3.0
        weights["implicit"] = torch.rand(N_ITEMS, generator=gen, dtype=torch.float64)  # time-svdpp's Y
    objective = Objective(reg=0.05, bias_reg=0.02, loss=loss, huber_delta=0.5, offset=3.5, weights=weights, time=axis)
    spec = ModelSpec(model, N_USERS, N_ITEMS, 4, n_contexts=N_BINS)
    params = init_params(spec, generator=gen, dtype=torch.float64)
    with torch.no_grad():  # biases away from their zero start, so every term carries a gradient
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    return spec, coords, objective, params


def _assert_close(got, want) -> None:
    loss, grads = got
    ref_loss, ref_grads = want
    assert float(loss) == pytest.approx(float(ref_loss), abs=1e-5)
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("loss", ["mse", "huber"])
@pytest.mark.parametrize("weighted", [False, True], ids=["uniform", "frequency"])
def test_gradients_match_autograd(loss: str, weighted: bool) -> None:
    spec, coords, objective, params = _problem(loss, weighted)
    reference = TimeAutogradPath(coords, objective)
    want = reference.loss_and_grad(params)
    assert float(want[1]["item_time_bias"].abs().sum()) > 0 and float(want[1]["user_drift_bias"].abs().sum()) > 0
    _assert_close(TimeDensePath(spec, coords, objective).loss_and_grad(params), want)
    _assert_close(TimeSparsePath(spec, coords, objective).loss_and_grad(params), want)
    _assert_close(TimeGatherPath(coords, objective).loss_and_grad(params), want)
    for scatter in ("segment", "index_add"):
        path = TimeGatherPath(coords, objective, scatter=scatter)
        batch = coords.select(torch.arange(0, len(coords), 3))
        _assert_close(path.loss_and_grad(params, batch), reference.loss_and_grad(params, batch))


@pytest.mark.parametrize("loss", ["mse", "huber"])
@pytest.mark.parametrize("weighted", [False, True], ids=["uniform", "frequency"])
def test_time_svdpp_gradients_match_autograd(loss: str, weighted: bool) -> None:
    """time-svdpp: SVD++'s paths over time-mf's, against autograd over both additions at once."""
    spec, coords, objective, params = _problem(loss, weighted, model="time-svdpp")
    implicit = implicit_of(spec, coords)
    reference = SvdppAutogradPath(coords, objective, implicit)
    want = reference.loss_and_grad(params)
    for name in ("item_time_bias", "user_drift_bias", "implicit_factors"):
        assert float(want[1][name].abs().sum()) > 0
    for representation in ("dense", "sparse", "minibatch"):
        _assert_close(make_path(representation, spec, coords, objective).loss_and_grad(params), want)
    batch = coords.select(torch.arange(0, len(coords), 3))
    _assert_close(make_path("minibatch", spec, coords, objective).loss_and_grad(params, batch),
                  reference.loss_and_grad(params, batch))


def _rule(params, axis, xp_torch: bool) -> RatingRule:
    seen_u, seen_i = np.ones(N_USERS, bool), np.ones(N_ITEMS, bool)
    seen_u[-1] = seen_i[-1] = False  # one cold user and item
    arrays = {k: v.detach().numpy().astype(np.float32) for k, v in params.items()}
    scale = type("S", (), {"min": 1.0, "max": 5.0})
    if not xp_torch:
        return RatingRule(arrays, 3.5, 3.4, scale, seen_u, seen_i, time=axis)
    return RatingRule({k: torch.from_numpy(v) for k, v in arrays.items()}, 3.5, 3.4, scale, torch.from_numpy(seen_u),
                      torch.from_numpy(seen_i), time=torch_axis(axis, "cpu"))


def test_rule_numpy_torch_and_folded_rows_agree() -> None:
    _spec, _coords, _objective, params = _problem("mse", False)
    users, items, ts, _y = _toy()
    axis = fit_time_axis(users, ts, N_USERS, N_BINS)
    np_rule, torch_rule = _rule(params, axis, False), _rule(params, axis, True)
    u = np.arange(N_USERS).repeat(N_ITEMS)
    i = np.tile(np.arange(N_ITEMS), N_USERS)
    later = np.full(len(u), int(axis.now) + 90 * 86400)  # after the training period
    for stamps in (None, later, np.resize(ts, len(u))):
        got, cold = np_rule.rate(u, i, stamps)
        want, _ = torch_rule.rate(torch.from_numpy(u), torch.from_numpy(i),
                                  None if stamps is None else torch.from_numpy(stamps))
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    now, _ = np_rule.rate(u, i, None, clip=False)
    at_now, _ = np_rule.rate(u, i, np.full(len(u), int(axis.now)), clip=False)
    np.testing.assert_allclose(now, at_now, atol=1e-5)  # no timestamp: the latest training time
    user_rows, item_rows = fold_rows(np_rule)
    np.testing.assert_allclose(np.einsum("ij,ij->i", user_rows[u], item_rows[i]), now, atol=1e-5)
    assert cold.sum() == N_USERS + N_ITEMS - 1
    # the time terms matter: an item-bin bias moves the prediction of its bin only
    assert not np.allclose(np_rule.rate(u, i, later, clip=False)[0], np_rule.rate(u, i, ts.min() + 0 * later,
                                                                                   clip=False)[0])


def _write_csv(path: Path, seed: int = 3) -> Path:
    """Ratings whose item means drift over time, with timestamps (user, item, rating, timestamp)."""
    rng = np.random.default_rng(seed)
    n_users, n_items, n = 60, 50, 2400
    cells = rng.choice(n_users * n_items, n, replace=False)
    users, items = cells // n_items, cells % n_items
    days = rng.uniform(0, 300, n)
    drift = np.where(items % 2 == 0, 1.0, -1.0) * (days / 300 - 0.5)
    signal = 3.5 + rng.normal(0, 0.5, n_items)[items] + rng.normal(0, 0.4, n_users)[users] + drift
    ratings = np.clip(np.rint(signal + rng.normal(0, 0.5, n)), 1, 5).astype(int)
    stamps = (START + days * SECONDS_PER_DAY).astype(np.int64)
    lines = [f"u{u},i{i},{r},{t}" for u, i, r, t in zip(users, items, ratings, stamps)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module", params=["time-mf", "time-svdpp"])
def trained(tmp_path_factory, request):
    model = request.param
    root = tmp_path_factory.mktemp(model)
    data = DataSettings(dataset=f"csv:{_write_csv(root / 'r.csv')}", split="temporal",
                        data_options={"timestamp_col": 3})
    _ratings, split, _ = load_split(data, 0)
    config = TrainConfig(model=model, rank=4, steps=200, lr=0.02, device="cpu", refit=True)
    fit = fit_and_score(split.train, split.val, config)
    test = evaluate_ratings(fit.result.predictor, split.test, torch.device("cpu"))
    tensors, meta = artifact_payload(fit.result, fit.fit_ratings, dataset_name=data.dataset, split=data.split, seed=0,
                                     metrics={"test_rmse": test["rmse"]},
                                     train_config={**config.to_dict(), "data_options": data.data_options})
    save_artifact(root / "model", tensors, meta)
    return {"dir": root / "model", "fit": fit, "split": split, "test": test, "data": data, "model": model}


def test_artifact_round_trip_evaluate_and_serve(trained) -> None:
    art = load_artifact(trained["dir"])
    assert art.meta.model_type == trained["model"] and art.meta.n_contexts >= 1
    if trained["model"] == "time-svdpp":
        assert np.abs(art.tensors["implicit_factors"]).max() > 0  # Y was trained and saved
    assert len(art.meta.time_axis.edges) == art.meta.n_contexts - 1
    assert art.tensors["item_time_bias"].shape == (art.meta.n_items, art.meta.n_contexts)
    evaluated = evaluate_artifact(trained["dir"], device="cpu")
    assert evaluated["rmse"] == pytest.approx(trained["test"]["rmse"], abs=1e-6)
    # the service predicts "now" (no timestamp): the in-process rule without contexts
    fit, test = trained["fit"], trained["split"].test
    users = test.user_ids[test.users].astype(str).tolist()[:200] + ["stranger"]
    items = test.item_ids[test.items].astype(str).tolist()[:200] + [str(test.item_ids[0])]
    predictor = fit.result.predictor
    u = torch.tensor([art.meta.user_ids.index(x) if x in art.meta.user_ids else -1 for x in users])
    i = torch.tensor([art.meta.item_ids.index(x) for x in items])
    want, _ = predictor.predict(u, i, None)
    client = TestClient(create_app(Settings(artifact_dir=trained["dir"])))
    r = client.post("/v1/predict", json={"pairs": [{"user": a, "item": b} for a, b in zip(users, items)]})
    assert r.status_code == 200
    np.testing.assert_allclose([p["rating"] for p in r.json()["predictions"]], want.numpy(), atol=1e-5)
    assert rule_from_artifact(art).time.now == pytest.approx(float(predictor.time.now))


def test_time_terms_learn_and_defaults_beat_the_mean(trained) -> None:
    split, fit = trained["split"], trained["fit"]
    mean_rmse = float(np.sqrt(np.mean((split.test.values - fit.fit_ratings.values.mean()) ** 2)))
    assert trained["test"]["rmse"] < mean_rmse
    assert float(np.abs(fit.result.params["item_time_bias"].numpy()).max()) > 0.0


def test_time_mf_needs_timestamps() -> None:
    from recsys_flowadam.data import load_dataset
    from recsys_flowadam.train.trainer import train_model

    ratings = load_dataset("synthetic", None, n_users=20, n_items=20)
    if ratings.timestamps is not None:
        pytest.skip("synthetic ratings carry timestamps")
    with pytest.raises(ValueError, match="timestamps"):
        train_model(ratings, None, TrainConfig(model="time-mf", steps=2, device="cpu"))


@pytest.mark.skipif(not os.environ.get("RECSYS_FLOWADAM_DATA"), reason="needs RECSYS_FLOWADAM_DATA (ML-100K)")
def test_ml100k_temporal_defaults_beat_the_training_mean() -> None:
    data = DataSettings(dataset="ml-100k", split="temporal")
    _ratings, split, _ = load_split(data, 0)
    config = TrainConfig(model="time-mf", steps=60, device="cpu", tune=False)
    fit = fit_and_score(split.train, split.val, config)
    test = evaluate_ratings(fit.result.predictor, split.test, torch.device("cpu"))
    mean_rmse = float(np.sqrt(np.mean((split.test.values - fit.fit_ratings.values.mean()) ** 2)))
    assert test["rmse"] < mean_rmse


def test_drift_holds_outside_the_users_training_period() -> None:
    users = np.array([0, 0, 1])
    ts = START + np.array([0, 10, 5]) * 86400
    axis = fit_time_axis(users, ts, 2, 2)
    last = axis.drift(np.array([0]), np.array([START + 10 * SECONDS_PER_DAY]))
    later = axis.drift(np.array([0]), np.array([START + 400 * SECONDS_PER_DAY]))
    # t_u = day 5, last day 10; days are held at float32 precision
    assert float(last[0]) == pytest.approx(5.0 ** 0.4, rel=1e-3)
    assert later == pytest.approx(last, rel=1e-3)  # held at the user's last training day, not extrapolated
    assert float(axis.drift(np.array([1]), np.array([START + 90 * SECONDS_PER_DAY]))[0]) == 0.0  # one day: none
