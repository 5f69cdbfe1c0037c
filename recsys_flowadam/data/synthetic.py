"""The FlowAdam paper's synthetic low-rank problems (matrix, or 3-way CP tensor).

Factors U*, V* (, W*) have i.i.d. N(0, 1/r) entries, so every entry of the noiseless
matrix has variance 1/r (tensor: 1/r^2). Each cell is observed independently
with probability ``density``; observed values get i.i.d. N(0, noise^2) noise. The rating
scale of a synthetic dataset is the observed range [min, max] of the noisy observed values.
Raw IDs are the 0-based row/column numbers as strings ("0", "1", ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import DataError
from .ratings import Ratings, RatingScale


@dataclass
class SyntheticProblem:
    """Observed noisy entries (``ratings``), the dense noiseless ``truth`` and the observed ``mask``."""

    ratings: Ratings
    truth: np.ndarray
    mask: np.ndarray


def _check(shape: tuple[int, ...], rank: int, density: float, noise: float) -> None:
    if any(int(s) < 1 for s in shape):
        raise DataError(f"synthetic: every dimension must be >= 1, got {shape}")
    if rank < 1:
        raise DataError(f"synthetic: rank must be >= 1, got {rank}")
    if not 0.0 < density <= 1.0:
        raise DataError(f"synthetic: density must be in (0, 1], got {density}")
    if noise < 0:
        raise DataError(f"synthetic: noise must be >= 0, got {noise}")


def _problem(name: str, truth: np.ndarray, density: float, noise: float, rng: np.random.Generator,
             description: str) -> SyntheticProblem:
    mask = rng.random(truth.shape) < density
    if not mask.any():  # keep at least one observation so the problem is usable
        mask.flat[int(rng.integers(mask.size))] = True
    coords = np.nonzero(mask)
    values = (truth[coords] + noise * rng.standard_normal(coords[0].shape[0])).astype(np.float32)
    lo, hi = float(values.min()), float(values.max())  # of the stored float32 values, so none is out of scale
    if not lo < hi:
        lo, hi = lo - 0.5, hi + 0.5
    three_way = truth.ndim == 3
    ratings = Ratings(
        name=name,
        users=coords[0],
        items=coords[1],
        values=values,
        user_ids=np.arange(truth.shape[0]).astype(str).astype(object),
        item_ids=np.arange(truth.shape[1]).astype(str).astype(object),
        scale=RatingScale(lo, hi),
        contexts=coords[2] if three_way else None,
        n_contexts=truth.shape[2] if three_way else 0,
        description=description,
    )
    return SyntheticProblem(ratings=ratings, truth=truth, mask=mask)


def make_low_rank_matrix(n_rows: int, n_cols: int, rank: int, density: float, noise: float,
                         seed: int) -> SyntheticProblem:
    """M* = U* V*^T with U* (n_rows x r), V* (n_cols x r) ~ N(0, 1/r); observe a Bernoulli(density) mask plus noise."""
    _check((n_rows, n_cols), rank, density, noise)
    rng = np.random.default_rng(seed)
    std = np.sqrt(1.0 / rank)
    u = rng.normal(0.0, std, size=(n_rows, rank))
    v = rng.normal(0.0, std, size=(n_cols, rank))
    truth = u @ v.T
    desc = f"synthetic rank-{rank} {n_rows}x{n_cols} matrix, density {density:g}, noise {noise:g}, seed {seed}"
    return _problem("synthetic", truth, density, noise, rng, desc)


def make_low_rank_tensor(shape: tuple[int, int, int], rank: int, density: float, noise: float,
                         seed: int) -> SyntheticProblem:
    """T*_ijk = sum_r U*_ir V*_jr W*_kr (CP), factors ~ N(0, 1/r); contexts of the ratings = third index."""
    if len(shape) != 3:
        raise DataError(f"synthetic: a tensor shape needs 3 dimensions, got {shape}")
    _check(tuple(shape), rank, density, noise)
    rng = np.random.default_rng(seed)
    std = np.sqrt(1.0 / rank)
    u, v, w = (rng.normal(0.0, std, size=(int(n), rank)) for n in shape)
    truth = np.einsum("ir,jr,kr->ijk", u, v, w, optimize=True)
    desc = (f"synthetic rank-{rank} {shape[0]}x{shape[1]}x{shape[2]} tensor, density {density:g}, "
            f"noise {noise:g}, seed {seed}")
    return _problem("synthetic", truth, density, noise, rng, desc)


def load_synthetic(n_users: int = 1000, n_items: int = 1000, rank: int = 10, density: float = 0.1,
                   noise: float = 0.1, seed: int = 0, n_contexts: int = 0) -> Ratings:
    """``load_dataset("synthetic", ...)``: the ratings of a matrix problem, or a tensor one when n_contexts > 0."""
    if n_contexts:
        return make_low_rank_tensor((n_users, n_items, n_contexts), rank, density, noise, seed).ratings
    return make_low_rank_matrix(n_users, n_items, rank, density, noise, seed).ratings
