"""SVD++ (``--model svdpp``): gradients of every path against autograd, the implicit-feedback
matrix against its definition, training, the artifact through ``evaluate`` and ``serve``, cold
start and the Python API."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from recsys_flowadam.cli import main
from recsys_flowadam.models import Coords, ModelSpec, Objective, init_params, make_path
from recsys_flowadam.models.implicit import ImplicitFeedback
from recsys_flowadam.models.svdpp import EffectiveParams, implicit_of, implicit_row_weights
from recsys_flowadam.models.svdpp_autograd import SvdppAutogradPath

SYN = ["--dataset", "synthetic", "--data-option", "n_users=150", "--data-option", "n_items=90",
       "--data-option", "rank=3", "--data-option", "density=0.3", "--data-option", "noise=0.1",
       "--split", "random", "--rank", "3", "--model", "svdpp", "--reg", "0.0001", "--lr", "0.01",
       "--device", "cpu", "--threads", "1", "--no-tune"]


def _problem(n_users=37, n_items=23, rank=4, n=350, seed=0, duplicates=0):
    gen = torch.Generator().manual_seed(seed)
    spec = ModelSpec("svdpp", n_users, n_items, rank)
    lin = torch.randperm(n_users * n_items, generator=gen)[:n]  # distinct cells ...
    lin = torch.cat([lin, lin[:duplicates]])  # ... and a few rated twice
    values = torch.randn(len(lin), generator=gen, dtype=torch.float64) * 3
    params = init_params(spec, init_std=0.7, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    return spec, Coords(lin // n_items, lin % n_items, values), params


def _weights(spec: ModelSpec, coords: Coords) -> dict[str, torch.Tensor]:
    n = len(coords)
    return {"user": torch.bincount(coords.users, minlength=spec.n_users).double() / n,
            "item": torch.bincount(coords.items, minlength=spec.n_items).double() / n,
            "implicit": implicit_row_weights(spec, coords)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _assert_close(got, ref, params) -> None:
    (got_loss, got_grads), (ref_loss, ref_grads) = got, ref
    assert list(got_grads) == list(params)  # the parameters' order
    assert abs(float(got_loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    for name in params:
        assert got_grads[name].shape == params[name].shape
        assert _rel(got_grads[name], ref_grads[name]) <= 1e-5, name


@pytest.mark.parametrize("representation", ["dense", "sparse", "minibatch"])
@pytest.mark.parametrize("loss", ["mse", "huber"])
@pytest.mark.parametrize("weighting", ["uniform", "frequency"])
def test_every_path_matches_autograd(representation, loss, weighting):
    spec, coords, params = _problem()
    weights = _weights(spec, coords) if weighting == "frequency" else None
    obj = Objective(reg=0.013, bias_reg=0.004, loss=loss, huber_delta=0.8, offset=0.37, weights=weights)
    ref = SvdppAutogradPath(coords, obj, implicit_of(spec, coords))
    path = make_path(representation, spec, coords, obj)
    _assert_close(path.loss_and_grad(params), ref.loss_and_grad(params), params)
    if representation == "minibatch":  # a batch: its mean loss plus the full penalty
        batch = coords.select(torch.arange(0, len(coords), 3))
        _assert_close(path.loss_and_grad(params, batch), ref.loss_and_grad(params, batch), params)


def test_the_penalty_reaches_the_implicit_factors():
    spec, coords, params = _problem()
    plain = make_path("sparse", spec, coords, Objective(offset=0.2)).loss_and_grad(params)
    reg = make_path("sparse", spec, coords, Objective(reg=0.3, offset=0.2)).loss_and_grad(params)
    Y = params["implicit_factors"].detach()
    assert torch.allclose(reg[1]["implicit_factors"] - plain[1]["implicit_factors"], 0.6 * Y)
    assert float(reg[0] - plain[0]) > 0.3 * float(Y.pow(2).sum())  # Y's term is part of the loss


def test_implicit_matrix_is_the_definition():
    """N[u, j] = |N(u)|^{-1/2} over the distinct items u rated; a pair rated twice counts once."""
    spec, coords, params = _problem(n=200, duplicates=15)
    implicit = ImplicitFeedback(coords.users, coords.items, spec.n_users, spec.n_items, torch.float64)
    Y = params["implicit_factors"].detach()
    expected = torch.zeros(spec.n_users, spec.rank, dtype=torch.float64)
    for u in range(spec.n_users):
        rated = sorted(set(coords.items[coords.users == u].tolist()))
        if rated:
            expected[u] = Y[rated].sum(0) / math.sqrt(len(rated))
    assert torch.allclose(implicit.sums(Y), expected)
    dZ = torch.randn(spec.n_users, spec.rank, dtype=torch.float64)
    assert torch.allclose(implicit.back(dZ), implicit.matrix.to_dense().T @ dZ)


def test_implicit_row_weights_are_the_definition():
    """w_j = (1/n) sum over users who rated j of n_u |N(u)|^{-1/2} (n_u counts repeated pairs, N(u) not)."""
    spec, coords, _ = _problem(n=200, duplicates=15)
    n_u = torch.bincount(coords.users, minlength=spec.n_users)
    expected = torch.zeros(spec.n_items, dtype=torch.float64)
    for j in range(spec.n_items):
        for u in set(coords.users[coords.items == j].tolist()):
            expected[j] += n_u[u] / math.sqrt(len(set(coords.items[coords.users == u].tolist())))
    assert torch.allclose(implicit_row_weights(spec, coords), expected / len(coords))


def test_effective_params_follow_in_place_updates():
    spec, coords, params = _problem()
    implicit = implicit_of(spec, coords)
    view = EffectiveParams(params, implicit)
    assert "implicit_factors" not in view and set(view) == {"user_factors", "item_factors", "user_bias", "item_bias"}
    before = view["user_factors"]
    assert view["user_factors"] is before  # read again unchanged: formed once
    params["implicit_factors"].data[3, 1] += 0.5  # as FlowAdam writes: through .data, no version bump
    after = view["user_factors"]
    assert after is not before and not torch.allclose(before, after)
    assert torch.allclose(after, params["user_factors"].detach() + implicit.sums(params["implicit_factors"].detach()))
    params["user_factors"].data[0, 0] -= 0.25
    assert float(view["user_factors"][0, 0]) == pytest.approx(float(after[0, 0]) - 0.25)


@pytest.mark.parametrize("representation,optimizer", [("sparse", "adam"), ("dense", "flowadam"), ("minibatch", "adam")])
def test_training_lowers_the_loss(representation, optimizer, one_thread):
    from recsys_flowadam.train.optimizers import build_optimizer

    spec, coords, params = _problem()
    obj = Objective(reg=0.01, bias_reg=0.001, offset=float(coords.values.mean()))
    path = make_path(representation, spec, coords, obj)
    opt = build_optimizer(optimizer, params.values(), 0.02)
    first = float(path.loss_and_grad(params)[0])

    def closure():
        loss, grads = path.loss_and_grad(params)
        for k, p in params.items():
            p.grad = grads[k]
        return loss

    for _ in range(60):
        opt.step(closure)
    assert float(path.loss_and_grad(params)[0]) < 0.7 * first


def _run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One svdpp run through `train` (an artifact) and its training-time result."""
    out = tmp_path_factory.mktemp("svdpp") / "art"
    from io import StringIO
    from contextlib import redirect_stdout

    buf = StringIO()
    with redirect_stdout(buf):
        assert main(["train", *SYN, "--optimizer", "adam", "--steps", "600", "--no-refit", "--out", str(out),
                     "--json"]) == 0
    return out, json.loads(buf.getvalue())


def test_train_evaluate_round_trip(trained, capsys):
    from recsys_flowadam.artifact import load_artifact

    out, summary = trained
    assert summary["model"] == "svdpp" and summary["test_rmse"] < 0.5  # noise 0.1: a fit model is far below 1
    art = load_artifact(out)
    assert art.meta.model_type == "svdpp"
    assert art.tensors["implicit_factors"].shape == (art.meta.n_items, art.meta.rank)
    assert np.abs(art.tensors["implicit_factors"]).max() > 0  # Y was trained and saved
    ev = _run_json(capsys, ["evaluate", str(out), "--json"])
    assert ev["n"] == summary["n_test"]
    assert ev["rmse"] == pytest.approx(summary["test_rmse"], rel=1e-6)
    assert ev["mae"] == pytest.approx(summary["test_mae"], rel=1e-6)


def _training_rule(art):
    """The trainer's rule (torch, ``Problem.predictor``: Z from the training coordinates) on the
    artifact's raw parameters, over the split the artifact was trained on (no refit)."""
    from recsys_flowadam.train.config import DataConfig, TrainConfig
    from recsys_flowadam.train.pipeline import load_split
    from recsys_flowadam.train.problem import build_problem

    cfg = art.meta.train_config
    data = DataConfig(dataset=art.meta.dataset.name, split=cfg["split"], data_options=cfg["data_options"])
    _, split, _ = load_split(data, art.meta.dataset.seed)
    problem = build_problem(split.train, TrainConfig(model="svdpp", rank=art.meta.rank, reg=0.0, device="cpu"),
                            torch.device("cpu"))
    params = {name: torch.from_numpy(np.array(art.tensors[name])) for name in problem.spec.shapes()}
    return problem.predictor(params)


def test_served_predictions_are_the_training_rule(trained):
    """``serve``'s /predict answers what the trainer's rule predicts (the artifact's numpy rule
    forms Z from its CSR of training pairs), cold IDs included."""
    from fastapi.testclient import TestClient

    from recsys_flowadam.artifact import load_artifact
    from recsys_flowadam.serve import create_app
    from recsys_flowadam.serve.settings import Settings

    out, _ = trained
    art = load_artifact(out)
    meta, t = art.meta, art.tensors
    rng = np.random.default_rng(3)
    u_idx = np.append(rng.integers(0, meta.n_users, 200), [-1, 4, -1])
    i_idx = np.append(rng.integers(0, meta.n_items, 200), [3, -1, -1])
    users = [meta.user_ids[u] if u >= 0 else "stranger" for u in u_idx]
    items = [meta.item_ids[i] if i >= 0 else "unseen" for i in i_idx]
    expected, cold = _training_rule(art).predict(torch.from_numpy(u_idx), torch.from_numpy(i_idx))
    assert cold[-3:].tolist() == [True, True, True] and not cold[:200].all()
    client = TestClient(create_app(Settings(artifact_dir=out)))
    got = client.post("/v1/predict", json={"pairs": [{"user": u, "item": i} for u, i in zip(users, items)]})
    assert got.status_code == 200, got.text
    served = np.array([p["rating"] for p in got.json()["predictions"]])
    np.testing.assert_allclose(served, expected.numpy(), rtol=0, atol=1e-5)
    # a user the artifact does not list gets the global mean plus the item's bias, nothing of Z
    scale = meta.rating_scale
    assert served[-3] == pytest.approx(np.clip(meta.global_mean + t["item_bias"][3], scale.min, scale.max), abs=1e-6)
    assert served[-1] == pytest.approx(meta.global_mean, abs=1e-6)


def test_cold_users_and_items_get_the_cold_start_rule():
    from recsys_flowadam.models.prediction import RatingRule

    spec, coords, params = _problem()
    params = {k: p.detach() for k, p in params.items()}
    keep = coords.users != 4  # user 4 has no training rating; item 22 none either
    keep &= coords.items != 22
    coords = Coords(coords.users[keep], coords.items[keep], coords.values[keep])
    view = EffectiveParams(params, implicit_of(spec, coords))
    seen_u = torch.bincount(coords.users, minlength=spec.n_users) > 0
    seen_i = torch.bincount(coords.items, minlength=spec.n_items) > 0

    class Scale:
        min, max = -100.0, 100.0

    rule = RatingRule(view, 0.5, 3.0, Scale(), seen_u, seen_i)
    users, items = torch.tensor([4, 4, 0, -1]), torch.tensor([22, 1, 22, 3])
    pred, cold = rule.rate(users, items)
    assert cold.tolist() == [True, True, True, True]
    bu, bi = params["user_bias"].detach(), params["item_bias"].detach()
    expected = torch.stack([torch.tensor(3.0, dtype=torch.float64), 3.0 + bi[1], 3.0 + bu[0], 3.0 + bi[3]])
    assert torch.allclose(pred, expected)
    warm, cold = rule.rate(torch.tensor([0]), torch.tensor([1]))
    z = view["user_factors"][0]
    assert not cold.any()
    assert float(warm) == pytest.approx(float(0.5 + bu[0] + bi[1] + z @ params["item_factors"].detach()[1]))


def test_recommender_fits_and_predicts_svdpp(one_thread):
    import pandas as pd

    from recsys_flowadam import Recommender

    rng = np.random.default_rng(0)
    users, items = np.nonzero(rng.random((80, 40)) < 0.4)
    values = np.clip(np.round(3 + rng.normal(0, 0.8, len(users))), 1, 5)
    df = pd.DataFrame({"user": users + 10, "item": items + 500, "rating": values})
    rec = Recommender(model="svdpp", optimizer="adam", rank=3, lr=0.05, reg=0.01, steps=40, eval_every=5,
                      device="cpu", seed=1).fit(df)
    assert rec.artifact_.meta.model_type == "svdpp"
    pred = rec.predict([10, 11, 99999], [500, 501, 500])
    assert pred.shape == (3,) and np.isfinite(pred).all() and (pred >= 1).all() and (pred <= 5).all()
    top = rec.recommend(10, k=5)
    assert len(top) == 5 and not set(top["item"]) & set(df.item[df.user == 10])


def test_spec_of_svdpp():
    with pytest.raises(ValueError, match="always has biases"):
        ModelSpec("svdpp", 3, 4, 2, biases=False)
    spec = ModelSpec("svdpp", 3, 4, 2)
    assert spec.has_biases and spec.shapes()["implicit_factors"] == (4, 2)
    assert list(spec.shapes()) == ["user_factors", "item_factors", "implicit_factors", "user_bias", "item_bias"]
