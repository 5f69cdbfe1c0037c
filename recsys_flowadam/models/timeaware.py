"""time-mf's loss and gradients without autograd (dense grid or gathers/scatters), and its
autograd reference. The model and its time axis: :mod:`recsys_flowadam.models.time_axis`.

The time terms are per rating and cheap (1-D gathers and ``index_add_``): with ``c_k`` the cell
``(i_k, bin(t_k))`` of ``B`` and ``d_k = dev_{u_k}(t_k)``::

    r_k   = [biased MF residual]_k + B[c_k] + alpha[u_k] * d_k
    g_k   = psi(r_k) / n
    dB    = P_B + scatter_add(c, g),   dalpha = P_alpha + scatter_add(u, g * d)

so a gradient costs what biased MF's costs on the same representation plus O(n):

- :class:`TimeDensePath` (``dense``): biased MF's dense masked grid (``models.dense``: one addmm
  for the residual, two matmuls for the gradients) with the time terms added at the observed
  cells before the loss.
- :class:`TimeSparsePath` (``sparse``): biased MF's CSR path (SDDMM residuals, two SpMMs) with
  the time terms added per rating.
- :class:`TimeGatherPath` (``minibatch``): gathered rows, residuals and scatter-adds
  (``models.scatter``), for one mini-batch (or all ratings).

Coordinates carry the ratings' timestamps (seconds) as ``contexts``; the bins and drifts of the
full training set are computed once, those of a mini-batch per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from recsys_flowadam.data.ratings import Ratings
from recsys_flowadam.models import fused_cpu
from recsys_flowadam.models.coords import Coords, coords_from_ratings
from recsys_flowadam.models.dense import DensePath
from recsys_flowadam.models.factorization import ModelSpec, Objective
from recsys_flowadam.models.scatter import default_method, scatter_rows
from recsys_flowadam.models.sparse import SparsePath, _csr
from recsys_flowadam.models.time_axis import TIME_PARAMS, TIME_REG_SCALE, TimeAxis, fit_time_axis, time_biases

BASE_PARAMS = ("user_factors", "item_factors", "user_bias", "item_bias")


def torch_axis(axis: TimeAxis, device: torch.device | str) -> TimeAxis:
    """The axis with its arrays as float64 tensors on ``device`` (what the paths and the
    in-process predictor use)."""
    def t(a) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.float64), device=device)

    return replace(axis, edges=t(axis.edges), user_day=t(axis.user_day),
                   user_span=None if axis.user_span is None else t(axis.user_span))


def fit_axis(train: Ratings, n_bins: int) -> TimeAxis:
    """The numpy time axis of the training ratings (ValueError without timestamps)."""
    if train.timestamps is None:
        raise ValueError(f"--model time-mf and time-svdpp need timestamps, and ratings '{train.name}' have none (MovieLens "
                         "datasets and CSV files with a timestamp column have them)")
    return fit_time_axis(train.users, train.timestamps, train.n_users, n_bins)


def time_penalty_weights(spec: ModelSpec, weights: dict[str, torch.Tensor] | None, device: torch.device | str,
                         dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """time-mf's per-parameter penalty weights (``Objective.weights`` entries named after the
    parameter): ``TIME_REG_SCALE`` times its mode's row weights (uniform: times 1); None otherwise."""
    if not spec.has_time:
        return None
    rows = {"user": spec.n_users, "item": spec.n_items}
    out = {}
    for name in TIME_PARAMS:
        mode = name.split("_")[0]
        base = (weights or {}).get(mode)
        base = torch.ones(rows[mode], dtype=dtype, device=device) if base is None else base
        out[name] = base * TIME_REG_SCALE
    return out


def time_coords(ratings: Ratings, *, device: torch.device | str, dtype: torch.dtype) -> Coords:
    """Ratings as coordinates whose ``contexts`` are their timestamps (seconds, int64)."""
    if ratings.timestamps is None:
        raise ValueError(f"ratings '{ratings.name}' have no timestamps: the time models need them")
    coords = coords_from_ratings(ratings, device=device, dtype=dtype)
    return replace(coords, contexts=torch.from_numpy(ratings.timestamps).to(device))


@dataclass(frozen=True)
class TimeTerms:
    """Per rating: the flat cell ``i * n_bins + bin`` of ``item_time_bias`` and the drift (param dtype)."""

    cells: torch.Tensor
    drift: torch.Tensor

    @classmethod
    def of(cls, coords: Coords, axis: TimeAxis, dtype: torch.dtype) -> "TimeTerms":
        seconds = axis.times(coords.contexts, coords.users)
        return cls(coords.items * axis.n_bins + axis.bins(seconds), axis.drift(coords.users, seconds).to(dtype))

    def values(self, params: dict[str, torch.Tensor], users: torch.Tensor) -> torch.Tensor:
        """``B[c_k] + alpha[u_k] * d_k`` (a fresh tensor)."""
        alpha = params["user_drift_bias"].detach().index_select(0, users)
        cells = params["item_time_bias"].detach().reshape(-1).index_select(0, self.cells)
        return torch.addcmul(cells, alpha, self.drift)

    def grads(self, params: dict[str, torch.Tensor], users: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
        """The data gradients of ``item_time_bias`` and ``user_drift_bias`` for per-rating ``g``."""
        B, alpha = params["item_time_bias"], params["user_drift_bias"]
        dB = torch.zeros(B.numel(), dtype=B.dtype, device=B.device).index_add_(0, self.cells, g).view(B.shape)
        return {"item_time_bias": dB, "user_drift_bias": torch.zeros_like(alpha).index_add_(0, users, g * self.drift)}


def _loss_terms(objective: Objective, r: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(data loss, G, scale)`` with ``psi(r) / n = G * scale`` (MSE keeps r and scales later)."""
    if objective.loss == "mse":
        flat = r.reshape(-1)
        return torch.dot(flat, flat) / n, r, 2.0 / n
    return objective.rho(r).sum() / n, objective.psi(r).div_(n), 1.0


class TimeDensePath:
    """Full batch over biased MF's dense masked grid, plus the time terms at the observed cells."""

    name = "dense"

    def __init__(self, spec: ModelSpec, coords: Coords, objective: Objective):
        base_spec = ModelSpec("biased-mf", spec.n_users, spec.n_items, spec.rank)
        self.base = DensePath(base_spec, Coords(coords.users, coords.items, coords.values), objective)
        self.objective, self.n, self.rank = objective, len(coords), spec.rank
        self.users = coords.users
        self.lin = coords.users * spec.n_items + coords.items
        self.terms = TimeTerms.of(coords, objective.time, coords.values.dtype)

    def loss_and_grad(self, params: dict[str, torch.Tensor]):
        """Return ``(loss, grads)``; ``grads`` maps each parameter name to its gradient."""
        obj, r = self.objective, self.rank
        with torch.no_grad():
            base = {k: params[k] for k in BASE_PARAMS}
            Ua, Va = self.base._products(base)
            R = self.base.residual(base, (Ua, Va))
            R.view(-1).index_add_(0, self.lin, self.terms.values(params, self.users))
            data, G, scale = _loss_terms(obj, R, self.n)
            GV = (G @ Va).mul_(scale)
            GtU = (G.T @ Ua).mul_(scale)
            g = G.view(-1).index_select(0, self.lin)
            if scale != 1.0:
                g.mul_(scale)
            grads = {"user_factors": GV[:, :r].contiguous(), "item_factors": GtU[:, :r].contiguous(),
                     "user_bias": GV[:, r].contiguous(), "item_bias": GtU[:, r + 1].contiguous(),
                     **self.terms.grads(params, self.users, g)}
            return obj.add_penalty(params, data, grads)


class TimeSparsePath:
    """Full batch on biased MF's CSR path (``models.sparse``: SDDMM residuals, two SpMMs), plus the
    time terms per rating in that path's (user, item) order."""

    name = "sparse"

    def __init__(self, spec: ModelSpec, coords: Coords, objective: Objective):
        base_spec = ModelSpec("biased-mf", spec.n_users, spec.n_items, spec.rank)
        self.base = SparsePath(base_spec, coords, objective)  # keeps the timestamps, sorted with the ratings
        b = self.base
        self.terms = TimeTerms.of(Coords(b.users, b.items, b.values, b.contexts), objective.time, b.values.dtype)
        self.objective, self.spec = objective, spec

    def loss_and_grad(self, params: dict[str, torch.Tensor]):
        """Return ``(loss, grads)``; ``grads`` maps each parameter name to its gradient."""
        b, obj, spec = self.base, self.objective, self.spec
        with torch.no_grad():
            r = b.residuals({k: params[k] for k in BASE_PARAMS})
            r.add_(self.terms.values(params, b.users))
            data, g, scale = _loss_terms(obj, r, b.n)
            g = g * scale if scale != 1.0 else g
            G = _csr(b.crow, b.items, g, (spec.n_users, spec.n_items))
            GT = _csr(b.t_crow, b.t_col, g.index_select(0, b.t_order), (spec.n_items, spec.n_users))
            grads = {"user_factors": G @ params["item_factors"].detach(),
                     "item_factors": GT @ params["user_factors"].detach(),
                     "user_bias": torch.zeros_like(params["user_bias"]).index_add_(0, b.users, g),
                     "item_bias": torch.zeros_like(params["item_bias"]).index_add_(0, b.items, g),
                     **self.terms.grads(params, b.users, g)}
            return obj.add_penalty(params, data, grads)


class TimeGatherPath:
    """All ratings (``sparse``) or one mini-batch (``minibatch``) by gathers and scatter-adds.

    ``loss_and_grad(params, batch=None)`` as :class:`~recsys_flowadam.models.minibatch.MiniBatchPath`;
    ``scatter``: how factor rows are scatter-added (``models.scatter``); default: biased MF's
    compiled pass on the CPU (``models.fused_cpu``, the time terms as its per-rating addition)
    where it applies, else by device.
    """

    def __init__(self, coords: Coords, objective: Objective, name: str = "minibatch", scatter: str | None = None):
        self.coords, self.objective, self.name = coords, objective, name
        self.fused = scatter is None
        self.scatter = scatter or default_method(coords.values.device)
        self.terms = TimeTerms.of(coords, objective.time, coords.values.dtype)  # of the full batch

    def loss_and_grad(self, params: dict[str, torch.Tensor], batch: Coords | None = None):
        """Return ``(loss, grads)`` with grads a dict like ``params`` (nothing is written to .grad)."""
        obj = self.objective
        with torch.no_grad():
            terms = self.terms if batch is None else TimeTerms.of(batch, obj.time, batch.values.dtype)
            batch = self.coords if batch is None else batch
            base = {k: params[k] for k in BASE_PARAMS}
            if self.fused and fused_cpu.supports(base, obj, batch.values.device):
                return self._fused(params, base, batch, terms)
            U, V = params["user_factors"].detach(), params["item_factors"].detach()
            u, v = U.index_select(0, batch.users), V.index_select(0, batch.items)
            r = torch.linalg.vecdot(u, v)
            r.add_(params["user_bias"].detach().index_select(0, batch.users))
            r.add_(params["item_bias"].detach().index_select(0, batch.items))
            r.add_(terms.values(params, batch.users)).sub_(batch.values).add_(obj.offset)
            data, g, scale = _loss_terms(obj, r, len(batch))
            g = g * scale if scale != 1.0 else g
            grads = {"user_factors": scatter_rows(batch.users, len(U), v, None, g, self.scatter),
                     "item_factors": scatter_rows(batch.items, len(V), u, None, g, self.scatter),
                     "user_bias": torch.zeros_like(params["user_bias"]).index_add_(0, batch.users, g),
                     "item_bias": torch.zeros_like(params["item_bias"]).index_add_(0, batch.items, g),
                     **terms.grads(params, batch.users, g)}
            return obj.add_penalty(params, data, grads)

    def _fused(self, params: dict[str, torch.Tensor], base: dict[str, torch.Tensor], batch: Coords,
               terms: TimeTerms):
        """Biased MF's compiled pass with the time terms added per rating; their gradients from its
        per-rating ``psi(r) / m``, then their L2 term by :meth:`Objective.add_penalty`."""
        obj = self.objective
        loss, grads, g = fused_cpu.loss_and_grad(base, batch, obj, extra=terms.values(params, batch.users),
                                                 with_g=True)
        time_params = {k: params[k] for k in TIME_PARAMS}
        loss, time_grads = obj.add_penalty(time_params, loss, terms.grads(params, batch.users, g))
        grads.update(time_grads)
        return loss, {k: grads[k] for k in params}


def make_time_path(representation: str, spec: ModelSpec, coords: Coords, objective: Objective):
    """time-mf's gradient path for a representation (``dense``, ``sparse`` or ``minibatch``)."""
    if objective.time is None:
        raise ValueError("time-mf needs the objective's time axis (train.problem.build_problem sets it)")
    if representation == "dense":
        return TimeDensePath(spec, coords, objective)
    if representation == "sparse":
        return TimeSparsePath(spec, coords, objective)
    if representation == "minibatch":
        return TimeGatherPath(coords, objective)
    raise ValueError(f"unknown representation {representation!r} for time-mf; choose dense, sparse or minibatch")


def time_predict(params: dict[str, torch.Tensor], coords: Coords, objective: Objective) -> torch.Tensor:
    """Raw predictions at ``coords`` (differentiable: the autograd reference)."""
    bu, bi = time_biases(params, objective.time, coords.users, coords.items, coords.contexts)
    dot = (params["user_factors"][coords.users] * params["item_factors"][coords.items]).sum(dim=1)
    return dot + bu + bi + objective.offset


class TimeAutogradPath:
    """time-mf's loss and gradient by autograd over gathered embeddings (the test reference)."""

    name = "autograd"

    def __init__(self, coords: Coords, objective: Objective):
        self.coords, self.objective = coords, objective

    def loss_and_grad(self, params: dict[str, torch.Tensor], batch: Coords | None = None):
        """Return ``(loss, grads)`` like the analytic paths."""
        names = list(params)
        batch = self.coords if batch is None else batch
        with torch.enable_grad():
            leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
            pred = time_predict(leaves, batch, self.objective)
            loss = self.objective.rho(pred - batch.values).mean() + self.objective.penalty(leaves)
            grads = torch.autograd.grad(loss, [leaves[k] for k in names])
        return loss.detach(), dict(zip(names, grads))
