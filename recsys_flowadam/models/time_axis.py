"""The time axis of the time-aware model (``time-mf``): time bins, user drift, prediction time.

``time-mf`` is biased MF plus two time effects in the spirit of timeSVD++ (Koren, "Collaborative
filtering with temporal dynamics", KDD 2009)::

    rating(u, i, t) = offset + b_u(t) + b_i(t) + U[u] . V[i]
    b_u(t) = b_u[u] + alpha[u] * dev_u(t),   dev_u(t) = sign(t - t_u) |t - t_u|^beta   (t in days)
    b_i(t) = b_i[i] + B[i, bin(t)]

``alpha`` is ``user_drift_bias``, ``B`` is ``item_time_bias`` (n_items, n_bins); both are biases
(zero start, ``bias_reg``). ``t_u`` is the user's mean training date, ``bin(t)`` one of
``n_bins`` equal-count bins of the *training* timestamps. Everything here comes from the
ratings the model is fitted on, so a refit on train + validation re-derives it.

Prediction time: a rating's timestamp when one is given; without one (the service, which
predicts "now") the latest training timestamp (``now``). A timestamp after the training period
falls into the last bin, one before it into the first; the drift never extrapolates: ``dev_u``
is taken at ``t`` clamped to the user's training period ``[first_u, last_u]`` (so a user's
latest drift holds after it; extrapolated, ``|t - t_u|^beta`` grows far beyond anything fitted and
cost 0.01 validation RMSE on the temporal split: models/README.md). Within the training
period the clamp changes nothing, so training is unaffected.

This module imports numpy only (the service reads it); the functions take numpy arrays or torch
tensors alike, as :mod:`recsys_flowadam.models.prediction` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from recsys_flowadam.models.prediction import array_namespace, take_rows

Array = Any  # numpy.ndarray or torch.Tensor
SECONDS_PER_DAY = 86400.0
DEFAULT_TIME_BINS = 8
DEFAULT_BETA = 0.4
TIME_PARAMS = ("item_time_bias", "user_drift_bias")
# The time terms' L2 weight is bias_reg times this (times their mode's row weight under frequency
# weighting): a cell of item_time_bias sees about 1/n_bins of its item's ratings, so the item
# bias's shrinkage leaves it nearly unregularised (validation RMSE 0.954 against biased MF's 0.918
# on u1 at factor 1). Chosen on validation: models/README.md, "time-mf".
TIME_REG_SCALE = 300.0
USER_DAY_TENSOR = "user_mean_day"  # the artifact tensor holding t_u
USER_SPAN_TENSOR = "user_day_span"  # the artifact tensor holding (first_u, last_u) per user


@dataclass(frozen=True, eq=False)
class TimeAxis:
    """What the time terms need besides the parameters. ``edges``: inner bin edges in seconds
    (float64, ``n_bins - 1``); ``user_day``: t_u in days since the epoch (float32 values held as float64, one per user;
    users without training ratings get the mean date); ``now``: the prediction time without a
    timestamp (seconds); ``beta``: the drift exponent; ``user_span``: (n_users, 2) first and last
    training day of each user (float64; the mean date for users without ratings)."""

    edges: Array
    user_day: Array
    now: float
    beta: float = DEFAULT_BETA
    user_span: Array | None = None

    @property
    def n_bins(self) -> int:
        return int(self.edges.shape[0]) + 1

    def times(self, timestamps: Array | None, like: Array) -> Array:
        """Timestamps (seconds) as float64; ``now`` for each entry of ``like`` when there are none."""
        xp = array_namespace(like)
        if timestamps is None:
            if xp is np:
                return np.full(like.shape[0], self.now, dtype=np.float64)
            return xp.full((like.shape[0],), self.now, dtype=xp.float64, device=like.device)
        return timestamps.astype(np.float64) if xp is np else timestamps.to(xp.float64)

    def bins(self, seconds: Array) -> Array:
        """Bin index of each time (int64): searchsorted on the inner edges."""
        if array_namespace(seconds) is np:
            return np.searchsorted(self.edges, seconds, side="right").astype(np.int64)
        return array_namespace(seconds).searchsorted(self.edges, seconds, right=True)

    def drift(self, users: Array, seconds: Array) -> Array:
        """``dev_u(t)`` per rating (float64)."""
        xp = array_namespace(seconds)
        days = seconds / SECONDS_PER_DAY
        if self.user_span is not None:  # no extrapolation beyond the user's training period
            span = take_rows(self.user_span, users)
            days = xp.minimum(xp.maximum(days, span[:, 0]), span[:, 1])
        d = days - take_rows(self.user_day, users)
        return xp.sign(d) * xp.abs(d) ** self.beta


def fit_time_axis(users: np.ndarray, timestamps: np.ndarray, n_users: int, n_bins: int,
                  beta: float = DEFAULT_BETA) -> TimeAxis:
    """The axis of training ratings: equal-count bins of their timestamps, each user's mean date,
    ``now`` = the latest training timestamp."""
    if n_bins < 1:
        raise ValueError(f"time-mf needs n_bins >= 1, got {n_bins}")
    seconds = np.asarray(timestamps, dtype=np.float64)
    edges = np.quantile(seconds, np.linspace(0.0, 1.0, n_bins + 1)[1:-1]) if n_bins > 1 else np.empty(0)
    days = seconds / SECONDS_PER_DAY
    counts = np.bincount(users, minlength=n_users)
    sums = np.bincount(users, weights=days, minlength=n_users)
    user_day = np.where(counts > 0, sums / np.maximum(counts, 1), days.mean())
    first = np.full(n_users, np.inf)
    np.minimum.at(first, users, days)
    last = np.full(n_users, -np.inf)
    np.maximum.at(last, users, days)
    span = np.stack([np.where(counts > 0, first, user_day), np.where(counts > 0, last, user_day)], axis=1)
    # float32 values: what the artifact stores, so served == in-process
    return TimeAxis(np.asarray(edges, dtype=np.float64), user_day.astype(np.float32).astype(np.float64),
                    float(seconds.max()), beta, span.astype(np.float32).astype(np.float64))


def time_axis_from_meta(block: Mapping[str, Any], user_day: np.ndarray, user_span: np.ndarray) -> TimeAxis:
    """The axis an artifact records: its ``time_axis`` block, ``user_mean_day`` and ``user_day_span``."""
    return TimeAxis(np.asarray(block["edges"], dtype=np.float64), np.asarray(user_day, dtype=np.float64),
                    float(block["now"]), float(block["beta"]), np.asarray(user_span, dtype=np.float64))


def time_biases(params: Mapping[str, Array], axis: TimeAxis, users: Array, items: Array,
                timestamps: Array | None) -> tuple[Array, Array]:
    """``(b_u(t), b_i(t))`` at the given (non-negative, aligned) indices, in the parameters' dtype."""
    seconds = axis.times(timestamps, users)
    return user_bias_at(params, axis, users, seconds), item_bias_at(params, axis, items, seconds)


def user_bias_at(params: Mapping[str, Array], axis: TimeAxis, users: Array, seconds: Array) -> Array:
    """``b_u(t) = b_u + alpha_u dev_u(t)`` at float64 times in seconds."""
    bu = take_rows(params["user_bias"], users)
    return bu + take_rows(params["user_drift_bias"], users) * _cast(axis.drift(users, seconds), bu)


def item_bias_at(params: Mapping[str, Array], axis: TimeAxis, items: Array, seconds: Array) -> Array:
    """``b_i(t) = b_i + B[i, bin(t)]`` at float64 times in seconds."""
    cells = items * axis.n_bins + axis.bins(seconds)
    return take_rows(params["item_bias"], items) + take_rows(params["item_time_bias"].reshape(-1), cells)


def _cast(x: Array, like: Array) -> Array:
    return x.astype(like.dtype) if array_namespace(x) is np else x.to(like.dtype)
