"""The one prediction rule (models.prediction): by hand, numpy against torch, its folded form,
and the service, the training Predictor and `evaluate` applying it."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys_flowadam.artifact import load_artifact, save_artifact
from recsys_flowadam.data.ratings import RatingScale
from recsys_flowadam.models.prediction import (
    RatingRule,
    fold_rows,
    known,
    rule_from_artifact,
    seen_from_csr,
    seen_in_training,
    seen_mask,
)
from recsys_flowadam.serve.scorer import Scorer
from recsys_flowadam.serve.synthetic import random_artifact
from recsys_flowadam.train import Predictor, evaluate_predictor

MODEL_TYPES = ["mf", "biased-mf", "cp"]


def hand_rule(xp, biased: bool) -> RatingRule:
    """3 users x 3 items; user 2 and item 2 have no training ratings (their parameters are junk)."""
    params = {"user_factors": [[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]],
              "item_factors": [[0.5, 0.5], [1.0, -1.0], [9.0, 9.0]]}
    if biased:
        params |= {"user_bias": [0.1, -0.2, 7.0], "item_bias": [0.3, 0.0, 7.0]}
    seen = [True, True, False]
    return RatingRule({k: xp.asarray(v, dtype=xp.float64) for k, v in params.items()}, 3.0 if biased else 0.0, 3.5,
                      RatingScale(1, 5), xp.asarray(seen), xp.asarray(seen))


@pytest.mark.parametrize("xp", [np, torch], ids=["numpy", "torch"])
def test_rule_by_hand(xp) -> None:
    rule = hand_rule(xp, biased=True)
    # warm: 3 + 0.1 + 0.3 + 0.5 ; 3 - 0.2 + 0.3 + 1 ; 3 - 0.2 + 0 - 2 (below the scale)
    # cold: user 2 -> mean + b_i ; item 2 -> mean + b_u ; unknown user (-1) -> mean + b_i ; both -> mean
    users, items = xp.asarray([0, 1, 1, 2, 0, -1, -1, 2]), xp.asarray([0, 0, 1, 0, 2, 1, -1, 2])
    pred, cold = rule.rate(users, items, clip=False)
    assert np.asarray(pred).tolist() == pytest.approx([3.9, 4.1, 0.8, 3.8, 3.6, 3.5, 3.5, 3.5])
    assert np.asarray(cold).tolist() == [False, False, False, True, True, True, True, True]
    clipped, _ = rule.rate(users, items)
    assert np.asarray(clipped).tolist() == pytest.approx([3.9, 4.1, 1.0, 3.8, 3.6, 3.5, 3.5, 3.5])
    known_user, known_item = rule.known(users, items)
    assert np.asarray(known_user).tolist() == [True, True, True, False, True, False, False, False]
    assert np.asarray(known_item).tolist() == [True, True, True, True, False, True, False, False]
    mf = hand_rule(xp, biased=False)
    pred, _ = mf.rate(xp.asarray([2, 0, -1, 0]), xp.asarray([0, 0, 0, 2]), clip=False)
    assert np.asarray(pred).tolist() == pytest.approx([3.5, 0.5, 3.5, 3.5])  # mf: cold = the global mean


def random_params(model_type: str, rng: np.random.Generator, *, dyadic: bool, n_users: int = 40,
                  n_items: int = 30, rank: int = 9, n_contexts: int = 4) -> dict[str, np.ndarray]:
    """float32 parameters; ``dyadic``: multiples of 1/4 in [-1, 1], so every sum is exact."""
    def draw(*shape: int) -> np.ndarray:
        x = rng.integers(-4, 5, shape) / 4 if dyadic else rng.normal(0.0, 1.0, shape)
        return x.astype(np.float32)

    params = {"user_factors": draw(n_users, rank), "item_factors": draw(n_items, rank)}
    if model_type != "mf":
        params |= {"user_bias": draw(n_users), "item_bias": draw(n_items)}
    if model_type == "cp":
        params["context_factors"] = draw(n_contexts, rank)
    return params


def numpy_and_torch_rules(params: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[RatingRule, RatingRule]:
    n_users, n_items = params["user_factors"].shape[0], params["item_factors"].shape[0]
    seen_users, seen_items = rng.random(n_users) < 0.8, rng.random(n_items) < 0.8
    args = (0.5, 0.25, RatingScale(-2.0, 2.0), seen_users, seen_items)
    rule = RatingRule(params, *args)
    as_torch = RatingRule({k: torch.from_numpy(v) for k, v in params.items()}, *args[:3],
                          torch.from_numpy(seen_users), torch.from_numpy(seen_items))
    return rule, as_torch


@pytest.mark.parametrize("model_type, with_context",
                         [("mf", False), ("biased-mf", False), ("cp", False), ("cp", True)],
                         ids=["mf", "biased-mf", "cp-mean-context", "cp-context"])
def test_numpy_and_torch_give_the_same_ratings(model_type: str, with_context: bool) -> None:
    rng = np.random.default_rng(7)
    u, i, c = rng.integers(-1, 40, 3000), rng.integers(-1, 30, 3000), rng.integers(0, 4, 3000)
    contexts = (c, torch.from_numpy(c)) if with_context else (None, None)
    for dyadic in (True, False):
        rule, as_torch = numpy_and_torch_rules(random_params(model_type, rng, dyadic=dyadic), rng)
        for clip in (True, False):
            ours, cold = rule.rate(u, i, contexts[0], clip=clip)
            theirs, cold_t = as_torch.rate(torch.from_numpy(u), torch.from_numpy(i), contexts[1], clip=clip)
            assert ours.dtype == np.float32 and theirs.dtype == torch.float32
            assert np.array_equal(cold, cold_t.numpy()) and cold.any() and not cold.all()
            if dyadic:  # every operation exact: the same operations give the same bits
                np.testing.assert_array_equal(ours, theirs.numpy())
            else:  # float32 sums: numpy and torch may add in different orders
                np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6, atol=1e-6)
        if not dyadic:
            raw, _ = rule.rate(u, i, contexts[0], clip=False)
            assert (raw < -2.0).any() and (raw > 2.0).any()  # clipping was exercised


def test_seen_masks_on_numpy_torch_and_the_artifacts_csr() -> None:
    users, items = np.array([3, 0, 3, 1]), np.array([2, 2, 0, 4])
    su, si = seen_in_training(users, items, 5, 6)
    assert su.tolist() == [True, True, False, True, False]
    assert si.tolist() == [True, False, True, False, True, False]
    tu, ti = seen_in_training(torch.from_numpy(users), torch.from_numpy(items), 5, 6)
    assert tu.dtype == torch.bool and tu.tolist() == su.tolist() and ti.tolist() == si.tolist()
    assert seen_mask(np.array([], dtype=np.int64), 3).tolist() == [False] * 3
    # the same pairs as a CSR over users (sorted by user): indptr counts per user
    order = np.argsort(users, kind="stable")
    indptr = np.r_[0, np.cumsum(np.bincount(users, minlength=5))]
    cu, ci = seen_from_csr(indptr, items[order], 6)
    assert cu.tolist() == su.tolist() and ci.tolist() == si.tolist()
    assert known(np.array([-1, 0, 2, 4]), su).tolist() == [False, True, False, False]
    assert known(torch.tensor([-1, 0, 2, 3]), tu).tolist() == [False, True, False, True]


@pytest.fixture(scope="module", params=MODEL_TYPES)
def art(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "model"
    return load_artifact(random_artifact(path, n_users=40, n_items=70, rank=6, model_type=request.param, seed=5,
                                         factor_std=1.0, cold_users=3, cold_items=5))


def test_fold_rows_is_the_rule(art) -> None:
    """Every (user, item) pair, unlisted ones included: the folded rows' dot product is the rule."""
    rule = rule_from_artifact(art)
    user_rows, item_rows = fold_rows(rule)
    n_users, n_items = art.meta.n_users, art.meta.n_items
    assert user_rows.shape == (n_users + 1, art.meta.rank + 3) and item_rows.shape == (n_items + 1, art.meta.rank + 3)
    u, i = (g.ravel() for g in np.meshgrid(np.arange(-1, n_users), np.arange(-1, n_items), indexing="ij"))
    folded = np.einsum("ij,ij->i", user_rows[np.where(u >= 0, u, n_users)], item_rows[np.where(i >= 0, i, n_items)],
                       dtype=np.float64)
    direct, cold = rule.rate(u, i, clip=False)
    np.testing.assert_allclose(folded, direct, rtol=0, atol=1e-5)
    assert cold.any() and not cold.all()


def test_scorer_and_trainer_predictor_apply_the_rule(art) -> None:
    rule = rule_from_artifact(art)
    rng = np.random.default_rng(2)
    u, i = rng.integers(-1, art.meta.n_users, 4000), rng.integers(-1, art.meta.n_items, 4000)
    expected, cold = rule.rate(u, i)
    served = Scorer(art).predict_indices(u, i)
    np.testing.assert_allclose(served.ratings, expected, rtol=0, atol=1e-5)
    assert np.array_equal(~(served.known_user & served.known_item), cold)

    from recsys_flowadam.train.pipeline import predictor_from_artifact

    predictor = predictor_from_artifact(art, torch.device("cpu"))
    assert isinstance(predictor, RatingRule)
    pred, pred_cold = predictor.predict(torch.from_numpy(u), torch.from_numpy(i), chunk=999)
    np.testing.assert_allclose(pred.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert np.array_equal(pred_cold.numpy(), cold)
    # the trainer's Predictor is the torch rule itself, chunked: bit for bit
    whole, _ = RatingRule.rate(predictor, torch.from_numpy(u), torch.from_numpy(i))
    assert torch.equal(pred, whole)
    truth = torch.from_numpy(rng.uniform(1, 5, 4000))
    m = evaluate_predictor(predictor, torch.from_numpy(u), torch.from_numpy(i), truth, breakdown=True)
    assert m["cold_users"]["n"] == int((~rule.known(u, i)[0]).sum()) > 0


def synthetic_artifact(directory: Path, model_type: str, rng: np.random.Generator) -> Path:
    """Random parameters over part of the synthetic dataset's IDs (others unknown, some never rated)."""
    params = random_params(model_type, rng, dyadic=False, n_users=25, n_items=17, rank=3, n_contexts=3)
    rows = [rng.choice(14, 4, replace=False) for _ in range(23)]  # users 23, 24 and items 14..16: no ratings
    tensors = params | {"train_indptr": np.r_[0, np.cumsum([4] * 23 + [0, 0])].astype(np.int64),
                        "train_items": np.sort(np.concatenate(rows)).astype(np.int64)}
    meta = {"model_type": model_type, "rank": 3, "n_users": 25, "n_items": 17,
            "n_contexts": 3 if model_type == "cp" else 0,
            "dataset": {"name": "synthetic", "source_files": {}, "split": "random", "seed": 0},
            "rating_scale": {"min": -1.0, "max": 1.0}, "global_mean": 0.1,
            "prediction_offset": 0.0 if model_type == "mf" else 0.05,
            "user_ids": [str(k) for k in range(25)], "item_ids": [str(k) for k in range(16)] + ["not-in-data"],
            "item_titles": None,
            "train_config": {"data_options": {"n_users": 30, "n_items": 20, "rank": 2, "density": 0.5}},
            "optimizer": {"name": "none", "params": {}, "diagnostics": {}}, "metrics": {}}
    return save_artifact(directory, tensors, meta)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_evaluate_artifact_applies_the_rule(tmp_path: Path, model_type: str) -> None:
    from recsys_flowadam.data import load_dataset, split_ratings
    from recsys_flowadam.train.pipeline import evaluate_artifact

    path = synthetic_artifact(tmp_path / "model", model_type, np.random.default_rng(3))
    result = evaluate_artifact(path, device="cpu")
    art = load_artifact(path)
    test = split_ratings(load_dataset("synthetic", n_users=30, n_items=20, rank=2, density=0.5), "random", 0).test
    user_pos = {raw: k for k, raw in enumerate(art.meta.user_ids)}
    item_pos = {raw: k for k, raw in enumerate(art.meta.item_ids)}
    u = np.array([user_pos.get(raw, -1) for raw in test.user_ids[test.users].astype(str)])
    i = np.array([item_pos.get(raw, -1) for raw in test.item_ids[test.items].astype(str)])
    rule = rule_from_artifact(art)
    pred, _ = rule.rate(u, i)
    err = pred.astype(np.float64) - test.values
    assert result["n"] == len(test) > 0
    assert result["rmse"] == pytest.approx(math.sqrt(np.mean(err**2)), rel=1e-6)
    assert result["mae"] == pytest.approx(np.mean(np.abs(err)), rel=1e-6)
    known_user, known_item = rule.known(u, i)
    assert (u < 0).any() and (i < 0).any(), "unknown IDs are exercised"
    assert result["cold_users"]["n"] == int((~known_user).sum())
    assert result["cold_items"]["mae"] == pytest.approx(np.mean(np.abs(err[~known_item])), rel=1e-6)


def test_the_service_imports_the_rule_without_torch() -> None:
    code = ("import sys, recsys_flowadam.serve.app, recsys_flowadam.models.prediction; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("halves", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_dots_compiled_on_cpu_tensors_is_the_gathered_product(dtype, halves, monkeypatch) -> None:
    from recsys_flowadam.models import fused_cpu
    from recsys_flowadam.models.prediction import row_dots

    if not fused_cpu.available():
        pytest.skip("numba is not installed")
    if halves:  # the two halves of the pairs, on the kernels' two threads
        monkeypatch.setattr(fused_cpu, "PARALLEL_MIN_RATINGS", 0)
    gen = torch.Generator().manual_seed(0)
    P, Q = torch.randn(50, 7, generator=gen, dtype=dtype), torch.randn(30, 7, generator=gen, dtype=dtype)
    for index_dtype in (torch.int64, torch.int32):
        a = torch.randint(0, 50, (999,), generator=gen).to(index_dtype)
        b = torch.randint(0, 30, (999,), generator=gen).to(index_dtype)
        compiled = fused_cpu.row_dots(P, Q, a, b)
        gathered = (P[a.long()] * Q[b.long()]).sum(1)
        assert compiled is not None and compiled.dtype == dtype
        torch.testing.assert_close(compiled, gathered, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(row_dots(P, Q, a, b), gathered, rtol=1e-6, atol=1e-6)
    with pytest.raises(IndexError, match="outside the factor tables"):
        fused_cpu.row_dots(P, Q, torch.tensor([50]), torch.tensor([0]))
    assert fused_cpu.row_dots(P, Q.float() if dtype == torch.float64 else Q.double(), a, b) is None  # mixed: gather
    np.testing.assert_allclose(row_dots(P.numpy(), Q.numpy(), a.numpy(), b.numpy()), gathered.numpy(), rtol=1e-6,
                               atol=1e-6)
