"""Held-out metrics with the artifact's prediction rule (clipping, cold start).

The rule itself (offset, biases, factors, context; cold users/items get ``global_mean`` plus
whichever bias is known; clipping to the rating scale) is
:class:`recsys_flowadam.models.prediction.RatingRule`, shared with ``evaluate`` and the
service. :class:`Predictor` is that rule on torch tensors, evaluated in chunks without autograd.
"""

from __future__ import annotations

import numpy as np
import torch

from recsys_flowadam.models.prediction import RatingRule


class Predictor(RatingRule):
    """Model parameters plus what the prediction rule needs; all tensors on one device.

    ``Predictor(params, offset, global_mean, scale, seen_users, seen_items)``; an index < 0 is
    an ID the model does not list (cold).
    """

    def predict(
        self,
        users: torch.Tensor,
        items: torch.Tensor,
        contexts: torch.Tensor | None = None,
        *,
        clip: bool = True,
        chunk: int = 1 << 16,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(predictions, cold)`` for index tensors; evaluated in chunks to bound memory."""
        outs, colds = [], []
        with torch.no_grad():
            for start in range(0, users.shape[0], chunk):
                c = None if contexts is None else contexts[start:start + chunk]
                pred, cold = self.rate(users[start:start + chunk], items[start:start + chunk], c, clip=clip)
                outs.append(pred)
                colds.append(cold)
        if not outs:
            empty = torch.empty(0, device=users.device)
            return empty, empty.bool()
        return torch.cat(outs), torch.cat(colds)


def rmse_mae(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """RMSE, MAE and n (NaN metrics for no ratings); one host sync."""
    n = int(truth.shape[0])
    if n == 0:
        return {"rmse": float("nan"), "mae": float("nan"), "n": 0}
    err = pred.double() - truth.double()
    both = torch.stack([err.pow(2).mean(), err.abs().mean()]).tolist()
    return {"rmse": float(np.sqrt(both[0])), "mae": float(both[1]), "n": n}


def evaluate_predictor(
    predictor: Predictor,
    users: torch.Tensor,
    items: torch.Tensor,
    values: torch.Tensor,
    contexts: torch.Tensor | None = None,
    *,
    clip: bool = True,
    breakdown: bool = False,
) -> dict:
    """RMSE/MAE/n over given ratings; with ``breakdown`` also for cold users and cold items.

    ``cold_users``: ratings whose user has no training rating (or is not listed); ``cold_items``:
    likewise items.
    """
    pred, _cold = predictor.predict(users, items, contexts, clip=clip)
    out = rmse_mae(pred, values)
    if breakdown:
        known_user, known_item = predictor.known(users, items)
        for label, sel in (("cold_users", ~known_user), ("cold_items", ~known_item)):
            out[label] = rmse_mae(pred[sel], values[sel])
    return out
