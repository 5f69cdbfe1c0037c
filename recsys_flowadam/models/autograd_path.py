"""Loss over gathered embeddings with autograd: the mini-batch path and the reference.

Autograd over ``U[users] * V[items]`` materialises (n, rank) gathers and scatters their
gradients back; that is fine for mini-batches of a few thousand ratings, and it is the
obviously-correct reference the fast full-batch paths are tested against.
"""

from __future__ import annotations

import torch

from recsys_flowadam.models.coords import Coords
from recsys_flowadam.models.factorization import Objective, predict


def batch_loss(params: dict[str, torch.Tensor], objective: Objective, batch: Coords) -> torch.Tensor:
    """Mean data loss over ``batch`` plus the full L2 penalty (differentiable).

    With the full penalty on every batch, each batch loss is an unbiased estimate of the
    full-batch objective, so mini-batch and full-batch runs minimise the same function.
    """
    pred = predict(params, batch.users, batch.items, batch.contexts, objective.offset)
    return objective.rho(pred - batch.values).mean() + objective.penalty(params)


class AutogradPath:
    """Full-batch loss and gradient by autograd (reference; also the mini-batch engine)."""

    name = "autograd"

    def __init__(self, coords: Coords, objective: Objective):
        self.coords = coords
        self.objective = objective

    def loss_and_grad(self, params: dict[str, torch.Tensor], batch: Coords | None = None):
        """Return ``(loss, grads)`` with grads a dict like ``params`` (nothing is written to .grad)."""
        names = list(params)
        with torch.enable_grad():
            leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
            loss = batch_loss(leaves, self.objective, self.coords if batch is None else batch)
            grads = torch.autograd.grad(loss, [leaves[k] for k in names])
        return loss.detach(), dict(zip(names, grads))
