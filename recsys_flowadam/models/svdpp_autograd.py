"""SVD++'s loss by autograd over gathered rows: the reference its hand-written paths are tested
against (time-svdpp's too: the objective's time axis adds time-mf's moving biases).

The implicit sums are written as plainly as possible (every user's ``Y`` rows gathered, scaled
and added with ``index_add``), independent of the SpMMs the fast paths use.
"""

from __future__ import annotations

import torch

from recsys_flowadam.models.coords import Coords
from recsys_flowadam.models.factorization import Objective
from recsys_flowadam.models.implicit import ImplicitFeedback
from recsys_flowadam.models.svdpp import IMPLICIT
from recsys_flowadam.models.time_axis import TimeAxis, time_biases


def svdpp_predict(params: dict[str, torch.Tensor], implicit: ImplicitFeedback, users: torch.Tensor,
                  items: torch.Tensor, offset: float = 0.0, time: TimeAxis | None = None,
                  timestamps: torch.Tensor | None = None) -> torch.Tensor:
    """Raw SVD++ predictions at ``(users, items)``; differentiable in every parameter. With
    ``time`` (time-svdpp) the biases are ``b_u(t)``, ``b_i(t)`` at ``timestamps``."""
    scaled = params[IMPLICIT][implicit.items] * implicit.weights[:, None]
    Z = params["user_factors"].index_add(0, implicit.users, scaled)
    pred = (Z[users] * params["item_factors"][items]).sum(dim=1)
    if time is not None:
        bu, bi = time_biases(params, time, users, items, timestamps)
        return pred + bu + bi + offset
    return pred + params["user_bias"][users] + params["item_bias"][items] + offset


class SvdppAutogradPath:
    """Loss and gradient of all ratings or of a batch, by autograd (batch mean + full penalty)."""

    name = "svdpp-autograd"

    def __init__(self, coords: Coords, objective: Objective, implicit: ImplicitFeedback) -> None:
        self.coords, self.objective, self.implicit = coords, objective, implicit

    def loss_and_grad(self, params: dict[str, torch.Tensor], batch: Coords | None = None):
        """Return ``(loss, grads)`` with grads a dict like ``params``."""
        batch = self.coords if batch is None else batch
        names = list(params)
        with torch.enable_grad():
            leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
            pred = svdpp_predict(leaves, self.implicit, batch.users, batch.items, self.objective.offset,
                                 self.objective.time, batch.contexts)
            loss = self.objective.rho(pred - batch.values).mean() + self.objective.penalty(leaves)
            grads = torch.autograd.grad(loss, [leaves[k] for k in names])
        return loss.detach(), dict(zip(names, grads))
