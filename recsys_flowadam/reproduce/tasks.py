"""Experiment tasks: what is trained (model, training coordinates) and how it is scored.

A :class:`Task` bundles a model spec, the training coordinates, the loss family and two
scoring functions (validation, test) over the model parameters. The objective's L2 weight is
*not* part of a task: the protocol decides it per optimizer (see ``protocols``).

Builders here wrap the data layer's generators (``make_low_rank_matrix``/``_tensor``) and add
the one generator the data layer does not have: robust factorization M = L + S + noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from recsys_flowadam.data import make_low_rank_matrix, make_low_rank_tensor
from recsys_flowadam.models import Coords, ModelSpec, coords_from_ratings, predict

Scorer = Callable[[dict[str, torch.Tensor]], dict[str, float]]

# share of the observed entries held out for validation (fair protocol, synthetic problems)
SYNTHETIC_VAL_FRACTION = 0.1


@dataclass
class Task:
    """One training problem: ``train`` coordinates, a model ``spec`` and its scorers.

    ``score_test(params)`` returns at least ``{"test": error}`` (lower is better) and may add
    more metrics; ``score_val`` returns ``{"val": error}`` or is None when there is no
    validation split.
    """

    scenario: str
    spec: ModelSpec
    train: Coords
    score_test: Scorer
    score_val: Scorer | None = None
    loss: str = "mse"
    huber_delta: float = 1.0
    offset: float = 0.0
    init_std: float = 0.1
    info: dict[str, Any] = field(default_factory=dict)


def rmse(diff: torch.Tensor) -> float:
    """Root mean square of ``diff``, summed in float64."""
    return float(torch.sqrt(torch.mean(diff.double() ** 2)))


def full_prediction(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense predicted matrix U V^T (or CP tensor sum_r U V W)."""
    U = params["user_factors"].detach()
    V = params["item_factors"].detach()
    if "context_factors" in params:
        return torch.einsum("ir,jr,kr->ijk", U, V, params["context_factors"].detach())
    return U @ V.T


def coords_scorer(coords: Coords, key: str, offset: float = 0.0) -> Scorer:
    """RMSE of the raw (unclipped) predictions at ``coords`` against their values."""

    def score(params: dict[str, torch.Tensor]) -> dict[str, float]:
        with torch.no_grad():
            pred = predict({k: p.detach() for k, p in params.items()}, coords.users, coords.items,
                           coords.contexts, offset)
        return {key: rmse(pred - coords.values)}

    return score


def dense_scorer(truth: torch.Tensor, select: torch.Tensor | None, key: str = "test") -> Scorer:
    """RMSE of the full prediction against ``truth`` over the cells where ``select`` is True (all if None)."""

    def score(params: dict[str, torch.Tensor]) -> dict[str, float]:
        with torch.no_grad():
            diff = full_prediction(params) - truth
            return {key: rmse(diff[select] if select is not None else diff)}

    return score


def _split_val(coords: Coords, seed: int, fraction: float) -> tuple[Coords, Coords]:
    """Seeded hold-out of ``fraction`` of the observed entries (validation), the rest for training."""
    n = len(coords)
    perm = np.random.default_rng([seed, 7919]).permutation(n)
    n_val = max(1, int(round(fraction * n)))
    val_idx = torch.from_numpy(np.sort(perm[:n_val])).to(coords.users.device)
    tr_idx = torch.from_numpy(np.sort(perm[n_val:])).to(coords.users.device)
    return coords.select(tr_idx), coords.select(val_idx)


def synthetic_task(scenario: str, shape: tuple[int, ...], rank: int, density: float, noise: float, extra_rank: int,
                   seed: int, *, with_val: bool, device: torch.device, dtype: torch.dtype = torch.float32,
                   init_std: float = 0.1) -> Task:
    """Matrix (2-D ``shape``) or CP tensor (3-D) completion; test = every unobserved cell vs the noiseless truth.

    The problem (factors, mask, noise) is drawn from ``seed``. ``with_val`` holds out a seeded
    ``SYNTHETIC_VAL_FRACTION`` of the observed entries for validation (they are then not trained on).
    """
    if len(shape) == 2:
        prob = make_low_rank_matrix(shape[0], shape[1], rank, density, noise, seed)
        spec = ModelSpec("mf", shape[0], shape[1], rank + extra_rank)
    else:
        prob = make_low_rank_tensor(tuple(shape), rank, density, noise, seed)  # type: ignore[arg-type]
        spec = ModelSpec("cp", shape[0], shape[1], rank + extra_rank, n_contexts=shape[2])
    coords = coords_from_ratings(prob.ratings, device=device, dtype=dtype, use_contexts=len(shape) == 3)
    truth = torch.as_tensor(prob.truth, dtype=dtype, device=device)
    unobserved = torch.as_tensor(~prob.mask, device=device)
    score_val = None
    if with_val:
        coords, val = _split_val(coords, seed, SYNTHETIC_VAL_FRACTION)
        score_val = coords_scorer(val, "val")
    info = {"shape": list(shape), "rank": rank, "density": density, "noise": noise, "model_rank": rank + extra_rank,
            "n_train": len(coords), "n_test": int(unobserved.sum()), "seed": seed}
    return Task(scenario, spec, coords, dense_scorer(truth, unobserved), score_val, init_std=init_std, info=info)


def make_robust_matrix(n_rows: int, n_cols: int, rank: int, outlier_fraction: float, outlier_scale: float,
                       noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(M, L): L = U V^T with U, V ~ N(0, 1/r) (as the completion problems), M = L + S + N.

    S is sparse: each cell is an outlier with probability ``outlier_fraction`` and then gets
    ``outlier_scale * Uniform(-1, 1)`` (the issue fixes fraction and scale, not the law; this
    choice is ours). N ~ N(0, noise^2) everywhere.
    """
    rng = np.random.default_rng(seed)
    std = np.sqrt(1.0 / rank)
    low = rng.normal(0.0, std, (n_rows, rank)) @ rng.normal(0.0, std, (n_cols, rank)).T
    outliers = rng.random((n_rows, n_cols)) < outlier_fraction
    sparse = np.where(outliers, outlier_scale * rng.uniform(-1.0, 1.0, (n_rows, n_cols)), 0.0)
    observed = low + sparse + noise * rng.standard_normal((n_rows, n_cols))
    return observed, low


def robust_task(scenario: str, n_rows: int, n_cols: int, rank: int, outlier_fraction: float, outlier_scale: float,
                noise: float, extra_rank: int, seed: int, *, with_val: bool, device: torch.device,
                dtype: torch.dtype = torch.float32, huber_delta: float = 1.0) -> Task:
    """Robust factorization: fit the fully observed M under Huber loss; error = RMSE of U V^T vs L (every cell).

    With ``with_val`` a seeded share of M's cells is held out (validation = RMSE against M there).
    """
    observed, low = make_robust_matrix(n_rows, n_cols, rank, outlier_fraction, outlier_scale, noise, seed)
    users, items = np.indices((n_rows, n_cols)).reshape(2, -1)
    coords = Coords(torch.from_numpy(users).to(device), torch.from_numpy(items).to(device),
                    torch.as_tensor(observed.reshape(-1), dtype=dtype, device=device))
    score_val = None
    if with_val:
        coords, val = _split_val(coords, seed, SYNTHETIC_VAL_FRACTION)
        score_val = coords_scorer(val, "val")
    spec = ModelSpec("mf", n_rows, n_cols, rank + extra_rank)
    info = {"shape": [n_rows, n_cols], "rank": rank, "outlier_fraction": outlier_fraction,
            "outlier_scale": outlier_scale, "noise": noise, "model_rank": rank + extra_rank, "n_train": len(coords),
            "seed": seed}
    truth = torch.as_tensor(low, dtype=dtype, device=device)
    return Task(scenario, spec, coords, dense_scorer(truth, None), score_val, loss="huber", huber_delta=huber_delta,
                info=info)
