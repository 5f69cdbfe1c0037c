"""Held-out metrics with the artifact's prediction rule (clipping, cold start).

Prediction for a (user, item): ``offset [+ b_u + b_i] + <U[u], V[i] [, W[c]]>``, clipped to
the rating scale by default (as Surprise does). A user or item with no training rating is
"cold": its factors were never fitted, so it gets ``global_mean`` plus whichever of the
biases is known (0 for mf), exactly as the service does for unknown IDs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recsys_flowadam.data.ratings import RatingScale


@dataclass(frozen=True)
class Predictor:
    """Model parameters plus what the prediction rule needs; all tensors on one device."""

    params: dict[str, torch.Tensor]
    offset: float
    global_mean: float
    scale: RatingScale
    seen_users: torch.Tensor  # bool (n_users,)
    seen_items: torch.Tensor  # bool (n_items,)

    def predict(
        self,
        users: torch.Tensor,
        items: torch.Tensor,
        contexts: torch.Tensor | None = None,
        *,
        clip: bool = True,
        chunk: int = 1 << 20,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(predictions, cold)`` for index tensors; evaluated in chunks to bound memory."""
        outs, colds = [], []
        p = {k: v.detach() for k, v in self.params.items()}
        has_bias = "user_bias" in p
        with torch.no_grad():
            for start in range(0, users.shape[0], chunk):
                u = users[start:start + chunk]
                i = items[start:start + chunk]
                c = None if contexts is None else contexts[start:start + chunk]
                prod = p["user_factors"][u] * p["item_factors"][i]
                if "context_factors" in p:
                    w = p["context_factors"][c] if c is not None else p["context_factors"].mean(dim=0)
                    prod = prod * w
                pred = prod.sum(dim=1) + self.offset
                su, si = self.seen_users[u], self.seen_items[i]
                cold = ~(su & si)
                if has_bias:
                    bu = p["user_bias"][u]
                    bi = p["item_bias"][i]
                    pred = pred + bu + bi
                    fallback = self.global_mean + torch.where(su, bu, 0.0) + torch.where(si, bi, 0.0)
                else:
                    fallback = torch.full_like(pred, self.global_mean)
                pred = torch.where(cold, fallback, pred)
                if clip:
                    pred = pred.clamp(self.scale.min, self.scale.max)
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

    ``cold_users``: ratings whose user has no training rating; ``cold_items``: likewise items.
    """
    pred, _cold = predictor.predict(users, items, contexts, clip=clip)
    out = rmse_mae(pred, values)
    if breakdown:
        for label, sel in (("cold_users", ~predictor.seen_users[users]), ("cold_items", ~predictor.seen_items[items])):
            out[label] = rmse_mae(pred[sel], values[sel])
    return out
