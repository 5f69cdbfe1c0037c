"""Sparse (CSR) full-batch loss and gradient for data whose dense grid would not fit.

Matrix models: the residuals at the observed cells come from ``torch.sparse.sampled_addmm``
(an SDDMM: ``U V^T`` evaluated only on the CSR pattern, no (n, rank) gathers), and the
gradients from two SpMMs, ``dU = G V`` with G in CSR and ``dV = G^T U`` with the transposed
pattern prebuilt once (a permutation of the values per call). Biases use 1-D gathers and
``index_add_``.

CP tensor model: the third mode breaks the SpMM form, so residuals come from gathered rows
and gradients from ``index_add_`` scatters (vectorised, still no autograd graph).
"""

from __future__ import annotations

import torch

from recsys_flowadam.models.coords import Coords
from recsys_flowadam.models.factorization import ModelSpec, Objective
from recsys_flowadam.scoped_warnings import scoped_filter


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A CSR tensor from indices we built sorted ourselves (invariants hold by construction)."""
    with scoped_filter("ignore", message="Sparse CSR tensor support is in beta"):
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def _crow(index_sorted: torch.Tensor, n_rows: int) -> torch.Tensor:
    counts = torch.bincount(index_sorted, minlength=n_rows)
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=index_sorted.device)
    torch.cumsum(counts, dim=0, out=crow[1:])
    return crow


class SparsePath:
    """Full-batch loss/gradient touching only the observed ratings."""

    name = "sparse"

    def __init__(self, spec: ModelSpec, coords: Coords, objective: Objective):
        if len(coords) == 0:
            raise ValueError("no training ratings")
        self.spec = spec
        self.objective = objective
        self.n = len(coords)
        # sort by (user, item) so the rows form a CSR matrix
        key = coords.users * spec.n_items + coords.items
        order = torch.argsort(key, stable=True)
        self.users = coords.users[order].contiguous()
        self.items = coords.items[order].contiguous()
        self.values = coords.values[order].contiguous()
        self.contexts = None if coords.contexts is None else coords.contexts[order].contiguous()
        if not spec.is_tensor:
            self.crow = _crow(self.users, spec.n_users)
            # the transposed pattern (CSR of G^T), and where each of its entries comes from
            self.t_order = torch.argsort(self.items * spec.n_users + self.users, stable=True)
            self.t_crow = _crow(self.items[self.t_order], spec.n_items)
            self.t_col = self.users[self.t_order].contiguous()
            # values of the SDDMM input: -(y - offset), so the output is the residual minus biases
            self.neg_target = _csr(self.crow, self.items, -(self.values - objective.offset),
                                   (spec.n_users, spec.n_items))

    def residuals(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Residual ``pred - y`` of every rating, in this path's (user, item) order."""
        U = params["user_factors"].detach()
        V = params["item_factors"].detach()
        if self.spec.is_tensor:
            W = params["context_factors"].detach()
            r = (U[self.users] * V[self.items] * W[self.contexts]).sum(dim=1)
            r = r + (self.objective.offset) - self.values
        else:
            r = torch.sparse.sampled_addmm(self.neg_target, U, V.T).values()
        if "user_bias" in params:
            r = r + params["user_bias"].detach()[self.users] + params["item_bias"].detach()[self.items]
        return r

    def loss_and_grad(self, params: dict[str, torch.Tensor]):
        """Return ``(loss, grads)``; ``grads`` maps each parameter name to its gradient."""
        obj = self.objective
        spec = self.spec
        with torch.no_grad():
            r = self.residuals(params)
            data = obj.rho(r).sum() / self.n
            g = obj.psi(r).div_(self.n)
            U = params["user_factors"].detach()
            V = params["item_factors"].detach()
            grads: dict[str, torch.Tensor] = {}
            if spec.is_tensor:
                W = params["context_factors"].detach()
                gv = g[:, None] * V[self.items]
                gw = W[self.contexts]
                grads["user_factors"] = torch.zeros_like(U).index_add_(0, self.users, gv * gw)
                gu = g[:, None] * U[self.users]
                grads["item_factors"] = torch.zeros_like(V).index_add_(0, self.items, gu * gw)
                grads["context_factors"] = torch.zeros_like(W).index_add_(0, self.contexts, gu * V[self.items])
            else:
                G = _csr(self.crow, self.items, g, (spec.n_users, spec.n_items))
                GT = _csr(self.t_crow, self.t_col, g[self.t_order], (spec.n_items, spec.n_users))
                grads["user_factors"] = G @ V
                grads["item_factors"] = GT @ U
            if "user_bias" in params:
                grads["user_bias"] = torch.zeros_like(params["user_bias"]).index_add_(0, self.users, g)
                grads["item_bias"] = torch.zeros_like(params["item_bias"]).index_add_(0, self.items, g)
            return obj.add_penalty(params, data, grads)
