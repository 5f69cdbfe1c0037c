"""The rating rule of every model type, with cold start and clipping, on numpy or torch.

For a user ``u``, item ``i`` (and context ``c`` for cp)::

    rating = offset [+ b_u[u] + b_i[i]] + sum_k U[u,k] V[i,k] [W[c,k]]

where cp without a context uses the mean of W over contexts (the expected rating over a
uniformly chosen context) and SVD++ reads its effective user factors ``U + N Y`` as ``U``;
time-mf's biases are b_u(t), b_i(t) at the rating's timestamp (``contexts``; none: the latest
training time, see ``models.time_axis``).
A user or item without training ratings has never-fitted factors, and an index < 0 stands for
an ID the model does not list: either makes the pair *cold*, and a cold pair gets ``global_mean``
plus whichever of the two biases is known (0 for mf). Ratings are clipped to the rating scale
unless asked not to.

:class:`RatingRule` evaluates this on numpy arrays or torch tensors alike (the same operations
in the same order, picked by the parameters' type), so training evaluation, ``evaluate`` and
the service share one rule. :func:`fold_rows` is the same rule folded into augmented factor
rows, whose dot product the service uses for predictions and inner-product top-k.

This module imports numpy only; torch is used only for tensors its caller already made, so the
numpy-only service can import it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Mapping, Protocol

import numpy as np

if TYPE_CHECKING:
    from recsys_flowadam.artifact import Artifact
    from recsys_flowadam.models.time_axis import TimeAxis

Array = Any  # a numpy.ndarray or a torch.Tensor; one call never mixes the two
PARAM_NAMES = ("user_factors", "item_factors", "user_bias", "item_bias", "context_factors")
TIME_PARAM_NAMES = ("item_time_bias", "user_drift_bias")  # time-mf (models.time_axis)


class Scale(Protocol):
    """The rating scale's bounds (``data.ratings.RatingScale``, the artifact's ``rating_scale``)."""

    min: float
    max: float


def array_namespace(x: Array) -> ModuleType:
    """``torch`` for a torch tensor (already imported by whoever made it), else ``numpy``."""
    if type(x).__module__.partition(".")[0] == "torch":
        return sys.modules["torch"]
    return np


def take_rows(x: Array, indices: Array) -> Array:
    """``x[indices]`` along the first axis; on torch by ``index_select`` (the same rows, about 4x
    faster on the CPU than advanced indexing, which dominated evaluating 1M ratings)."""
    if array_namespace(x) is np:
        return x[indices]
    return x.index_select(0, indices)


def row_dots(P: Array, Q: Array, rows_p: Array, rows_q: Array) -> Array:
    """``sum_k P[rows_p, k] Q[rows_q, k]``. CPU tensors (training's validation, ``evaluate``) take
    one compiled pass (``models.fused_cpu.row_dots``: no (n, rank) gathers, about 10x faster);
    numpy arrays (the service, which does not load numba for it) and other devices gather."""
    if array_namespace(P) is not np:
        from recsys_flowadam.models.fused_cpu import row_dots as compiled

        out = compiled(P, Q, rows_p, rows_q)
        if out is not None:
            return out
    return (take_rows(P, rows_p) * take_rows(Q, rows_q)).sum(1)


def seen_mask(indices: Array, n: int) -> Array:
    """Bool mask of length ``n``: which of ``0..n-1`` occur in ``indices`` (non-negative ints)."""
    return array_namespace(indices).bincount(indices, minlength=n) > 0


def seen_in_training(users: Array, items: Array, n_users: int, n_items: int) -> tuple[Array, Array]:
    """``(seen_users, seen_items)``: which users / items have a training rating."""
    return seen_mask(users, n_users), seen_mask(items, n_items)


def seen_from_csr(indptr: np.ndarray, items: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """The same masks from an artifact's CSR of training pairs (``train_indptr``, ``train_items``)."""
    return np.diff(indptr) > 0, seen_mask(items, n_items)


def known(indices: Array, seen: Array) -> Array:
    """Bool per index: listed (``>= 0``) and with training ratings, i.e. not cold."""
    return (indices >= 0) & take_rows(seen, indices.clip(min=0))


def known_bias(bias: Array, seen: Array) -> Array:
    """The bias where it was fitted (a training rating exists), 0 elsewhere."""
    return array_namespace(bias).where(seen, bias, 0.0)


def clip_ratings(ratings: Array, scale: Scale) -> Array:
    """Ratings clipped to the scale (as Surprise does)."""
    return array_namespace(ratings).clip(ratings, scale.min, scale.max)


@dataclass(frozen=True)
class RatingRule:
    """Model parameters plus what the rule needs; arrays all numpy or all torch (one device)."""

    params: Mapping[str, Array]
    offset: float
    global_mean: float
    scale: Scale
    seen_users: Array  # bool (n_users,)
    seen_items: Array  # bool (n_items,)
    time: TimeAxis | None = None  # time-mf: contexts are timestamps (seconds), biases move with them

    def known(self, users: Array, items: Array) -> tuple[Array, Array]:
        """``(known_user, known_item)`` masks for index arrays (-1 = not listed)."""
        return known(users, self.seen_users), known(items, self.seen_items)

    def rate(self, users: Array, items: Array, contexts: Array | None = None, *,
             clip: bool = True) -> tuple[Array, Array]:
        """``(ratings, cold)`` for index arrays, one pass (callers chunk large inputs)."""
        p = self.params
        xp = array_namespace(p["user_factors"])
        su, si = self.known(users, items)
        u, i = users.clip(min=0), items.clip(min=0)  # cold rows are gathered but not used
        if "context_factors" in p:
            prod = take_rows(p["user_factors"], u) * take_rows(p["item_factors"], i)
            w = take_rows(p["context_factors"], contexts) if contexts is not None else p["context_factors"].mean(0)
            pred = (prod * w).sum(1) + self.offset
        else:
            pred = row_dots(p["user_factors"], p["item_factors"], u, i) + self.offset
        cold = ~(su & si)
        if "user_bias" in p:
            bu, bi = take_rows(p["user_bias"], u), take_rows(p["item_bias"], i)
            if self.time is not None:  # time-mf: b_u(t), b_i(t) at the timestamps (none: at `now`)
                from recsys_flowadam.models.time_axis import time_biases

                bu, bi = time_biases(p, self.time, u, i, contexts)
            pred = pred + bu + bi
            fallback = self.global_mean + known_bias(bu, su) + known_bias(bi, si)
        else:
            fallback = xp.full_like(pred, self.global_mean)
        pred = xp.where(cold, fallback, pred)
        return (clip_ratings(pred, self.scale) if clip else pred), cold


def implicit_user_factors(user_factors: np.ndarray, implicit_factors: np.ndarray, indptr: np.ndarray,
                          items: np.ndarray, n_items: int) -> np.ndarray:
    """SVD++'s effective user factors ``Z = U + N Y`` (float32) from the CSR of training pairs:
    row ``u`` of ``N`` is ``|N(u)|^{-1/2}`` on the distinct items ``u`` rated (as ``models.implicit``)."""
    from scipy import sparse  # only SVD++ artifacts need it

    n_users = len(indptr) - 1
    rows = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(indptr))
    key = np.unique(rows * n_items + np.asarray(items, dtype=np.int64))
    rows, cols = key // n_items, key % n_items
    weights = 1.0 / np.sqrt(np.maximum(np.bincount(rows, minlength=n_users), 1))[rows]
    N = sparse.csr_matrix((weights, (rows, cols)), shape=(n_users, n_items))
    sums = N @ np.asarray(implicit_factors, dtype=np.float64)
    return (np.asarray(user_factors, dtype=np.float64) + sums).astype(np.float32)


def rule_from_artifact(artifact: Artifact) -> RatingRule:
    """The rule over an artifact's tensors (float32 numpy, not copied) and metadata; for SVD++
    the user factors are the effective ones, ``U + N Y`` (:func:`implicit_user_factors`)."""
    t, meta = artifact.tensors, artifact.meta
    params = {name: np.asarray(t[name], dtype=np.float32) for name in PARAM_NAMES + TIME_PARAM_NAMES if name in t}
    if "implicit_factors" in t:
        params["user_factors"] = implicit_user_factors(params["user_factors"], t["implicit_factors"],
                                                       t["train_indptr"], t["train_items"], meta.n_items)
    seen_users, seen_items = seen_from_csr(np.asarray(t["train_indptr"]), np.asarray(t["train_items"]),
                                           meta.n_items)
    time = None
    if meta.time_axis is not None:  # time-mf, time-svdpp
        from recsys_flowadam.models.time_axis import USER_DAY_TENSOR, USER_SPAN_TENSOR, time_axis_from_meta

        time = time_axis_from_meta(meta.time_axis.model_dump(), t[USER_DAY_TENSOR], t[USER_SPAN_TENSOR])
    return RatingRule(params, float(meta.prediction_offset), float(meta.global_mean), meta.rating_scale,
                      seen_users, seen_items, time)


def fold_rows(rule: RatingRule) -> tuple[np.ndarray, np.ndarray]:
    """The rule on numpy as augmented float32 rows: ``rating(u, i) = user_rows[u] . item_rows[i]``.

    Each has one extra (last) row for an ID not listed at all. With rank ``r``::

        user_rows[u] = [U[u], 1, c_u, f_u]      item_rows[i] = [V[i], b_i, 1, e_i]
        seen user:   c_u = offset + b_u, f_u = mean - offset;   cold user: U = 0, c_u = mean, f_u = 0
        seen item:   e_i = 0;                                   cold item: V = 0, b_i = 0, e_i = 1

    so the dot product is the rule for seen pairs and the cold-start value otherwise (before
    clipping). For cp, V[i] is V[i] * mean_c W[c] (the rule without a context); for time-mf,
    b_u and b_i are b_u(now) and b_i(now) (the rule without a timestamp).
    """
    p, su, si = rule.params, rule.seen_users, rule.seen_items
    if rule.time is not None:
        p = {**p, **_biases_now(rule)}
    U = np.asarray(p["user_factors"], dtype=np.float32)
    V = np.asarray(p["item_factors"], dtype=np.float32)
    if "context_factors" in p:
        V = V * np.asarray(p["context_factors"], dtype=np.float64).mean(axis=0).astype(np.float32)
    U = np.where(su[:, None], U, np.float32(0))
    V = np.where(si[:, None], V, np.float32(0))
    (n_users, rank), n_items = U.shape, V.shape[0]
    has_bias = "user_bias" in p
    bu = known_bias(p["user_bias"], su).astype(np.float32) if has_bias else np.zeros(n_users, np.float32)
    bi = known_bias(p["item_bias"], si).astype(np.float32) if has_bias else np.zeros(n_items, np.float32)
    offset, mean = rule.offset, rule.global_mean

    user_rows = np.zeros((n_users + 1, rank + 3), np.float32)
    user_rows[:n_users, :rank] = U
    user_rows[:, rank] = 1.0
    user_rows[:n_users, rank + 1] = np.where(su, offset + bu, mean)
    user_rows[n_users, rank + 1] = mean
    user_rows[:n_users, rank + 2] = np.where(su, mean - offset, 0.0)
    item_rows = np.zeros((n_items + 1, rank + 3), np.float32)
    item_rows[:n_items, :rank] = V
    item_rows[:n_items, rank] = bi
    item_rows[:, rank + 1] = 1.0
    item_rows[:n_items, rank + 2] = ~si
    item_rows[n_items, rank + 2] = 1.0
    return user_rows, item_rows


def _biases_now(rule: RatingRule) -> dict[str, np.ndarray]:
    """time-mf's ``user_bias`` and ``item_bias`` at the prediction time ``now`` (float32)."""
    from recsys_flowadam.models.time_axis import item_bias_at, user_bias_at

    users = np.arange(rule.seen_users.shape[0], dtype=np.int64)
    items = np.arange(rule.seen_items.shape[0], dtype=np.int64)
    params = {k: np.asarray(v, dtype=np.float32) for k, v in rule.params.items()}
    return {"user_bias": user_bias_at(params, rule.time, users, rule.time.times(None, users)),
            "item_bias": item_bias_at(params, rule.time, items, rule.time.times(None, items))}
