"""Loss over gathered embeddings with autograd: the reference.

Autograd over ``U[users] * V[items]`` materialises (n, rank) gathers and scatters their
gradients back; it is the obviously-correct reference the hand-written paths (dense, sparse,
mini-batch) are tested against, and ``bench/bench_minibatch_step.py`` times it against them.
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
    """Loss and gradient of all ratings or of a batch, by autograd (the reference)."""

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
