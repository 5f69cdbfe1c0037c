"""The prediction rule used for held-out metrics: clipping and the cold-start fallback."""

from __future__ import annotations

import math

import pytest
import torch

from recsys_flowadam.data.ratings import RatingScale
from recsys_flowadam.train import Predictor, evaluate_predictor, rmse_mae


def _predictor(biased: bool) -> Predictor:
    params = {"user_factors": torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]),
              "item_factors": torch.tensor([[0.5, 0.5], [1.0, -1.0], [9.0, 9.0]])}
    if biased:
        params["user_bias"] = torch.tensor([0.1, -0.2, 7.0])
        params["item_bias"] = torch.tensor([0.3, 0.0, 7.0])
    # user 2 and item 2 have no training ratings
    return Predictor(params, offset=3.0 if biased else 0.0, global_mean=3.5, scale=RatingScale(1, 5),
                     seen_users=torch.tensor([True, True, False]), seen_items=torch.tensor([True, True, False]))


def test_warm_predictions_follow_the_factor_rule_and_are_clipped():
    p = _predictor(biased=True)
    pred, cold = p.predict(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), clip=False)
    # 3 + 0.1 + 0.3 + 0.5 = 3.9 ; 3 - 0.2 + 0.3 + 1.0 = 4.1 ; 3 - 0.2 + 0 - 2 = 0.8
    assert pred.tolist() == pytest.approx([3.9, 4.1, 0.8])
    assert not cold.any()
    clipped, _ = p.predict(torch.tensor([1]), torch.tensor([1]))
    assert clipped.tolist() == [1.0]


def test_cold_users_and_items_get_global_mean_plus_known_biases():
    p = _predictor(biased=True)
    pred, cold = p.predict(torch.tensor([2, 0, 2]), torch.tensor([0, 2, 2]), clip=False)
    assert cold.tolist() == [True, True, True]
    assert pred.tolist() == pytest.approx([3.5 + 0.3, 3.5 + 0.1, 3.5])
    mf = _predictor(biased=False)
    pred, _ = mf.predict(torch.tensor([2, 0]), torch.tensor([0, 0]), clip=False)
    assert pred.tolist() == pytest.approx([3.5, 0.5])


def test_metrics_and_cold_breakdown():
    p = _predictor(biased=True)
    users, items = torch.tensor([0, 2, 1]), torch.tensor([0, 0, 2])
    truth = torch.tensor([4.0, 4.0, 3.0], dtype=torch.float64)
    m = evaluate_predictor(p, users, items, truth, breakdown=True)
    errs = [3.9 - 4.0, 3.8 - 4.0, (3.5 - 0.2) - 3.0]
    assert m["n"] == 3
    assert m["rmse"] == pytest.approx(math.sqrt(sum(e * e for e in errs) / 3))
    assert m["mae"] == pytest.approx(sum(abs(e) for e in errs) / 3)
    assert m["cold_users"]["n"] == 1 and m["cold_users"]["rmse"] == pytest.approx(0.2)
    assert m["cold_items"]["n"] == 1 and m["cold_items"]["mae"] == pytest.approx(0.3)
    empty = rmse_mae(torch.empty(0), torch.empty(0))
    assert empty["n"] == 0 and math.isnan(empty["rmse"])
