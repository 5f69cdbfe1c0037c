"""Scoring over a loaded artifact: rating predictions, top-k recommendations, similar items.

The prediction rule is the artifact spec's (format v1). Every model type is reduced at load
time to one dot product over *augmented* factor vectors, which folds the offset and both
biases in exactly (for a user and an item with training ratings)::

    user_rows[u] = [U[u], 1, offset + b_u[u], ...]      item_rows[i] = [V[i], b_i[i], 1, ...]
    user_rows[u] . item_rows[i] = offset + b_u[u] + b_i[i] + U[u] . V[i]

and gives the cold-start value (global mean + the known biases) for users/items without
training ratings or not listed at all (see ``Scorer.__init__``). For cp models served without
a context, V[i] is replaced by V[i] * mean_c W[c] (the expected rating over a uniformly chosen
context). Top-k retrieval is then an inner-product search that the ``implicit`` library's CPU
top-k does (with per-user filtering of the items rated in training).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.sparse as sp
from implicit.cpu.topk import topk

from recsys_flowadam.artifact import Artifact

# implicit gives filtered-out candidates this score; never returned (K is clamped), but guarded.
_FILTERED = -np.finfo(np.float32).max / 2


@dataclass(frozen=True)
class Predictions:
    """Batch prediction result; arrays are aligned with the input pairs."""

    ratings: np.ndarray  # float64, clipped to the rating scale
    known_user: np.ndarray  # bool
    known_item: np.ndarray  # bool


class UnknownIDError(KeyError):
    """A raw user/item ID the model does not know (or cannot answer for)."""

    def __init__(self, kind: str, raw_id: str, reason: str = "") -> None:
        super().__init__(f"{kind} '{raw_id}' {reason}" if reason else f"unknown {kind} '{raw_id}'")
        self.kind = kind
        self.raw_id = raw_id

    def __str__(self) -> str:
        return self.args[0]


class Scorer:
    """Numpy scorer built once per artifact; immutable afterwards, so safe to share across threads."""

    def __init__(self, artifact: Artifact, *, num_threads: int = 1) -> None:
        meta, t = artifact.meta, artifact.tensors
        self.artifact = artifact
        self.meta = meta
        self.num_threads = num_threads
        self.scale_min = float(meta.rating_scale.min)
        self.scale_max = float(meta.rating_scale.max)
        self.global_mean = float(meta.global_mean)
        self.user_ids = meta.user_ids
        self.item_ids = meta.item_ids
        self.item_titles = meta.item_titles
        self._user_pos = {raw: k for k, raw in enumerate(meta.user_ids)}
        self._item_pos = {raw: k for k, raw in enumerate(meta.item_ids)}

        n_users, n_items, rank = meta.n_users, meta.n_items, meta.rank
        indptr, train_items = np.asarray(t["train_indptr"]), np.asarray(t["train_items"])
        # An ID without training ratings has never-fitted factors: it is served as cold, like an
        # ID the artifact does not list at all (the same rule as the trainer's evaluation).
        self.seen_users = np.diff(indptr) > 0
        self.seen_items = np.zeros(n_items, dtype=bool)
        self.seen_items[train_items] = True
        U = np.asarray(t["user_factors"], dtype=np.float32)
        V = np.asarray(t["item_factors"], dtype=np.float32)
        if meta.model_type == "cp":
            V = V * np.asarray(t["context_factors"], dtype=np.float64).mean(axis=0).astype(np.float32)
        U = np.where(self.seen_users[:, None], U, np.float32(0))
        V = np.where(self.seen_items[:, None], V, np.float32(0))
        has_bias = "user_bias" in t
        bu = np.where(self.seen_users, t["user_bias"], 0).astype(np.float32) if has_bias else np.zeros(n_users, np.float32)
        bi = np.where(self.seen_items, t["item_bias"], 0).astype(np.float32) if has_bias else np.zeros(n_items, np.float32)
        offset, mean = float(meta.prediction_offset), self.global_mean

        # Augmented rows, one extra (last) row each for IDs absent from the artifact:
        #   user_rows[u] = [U[u], 1, c_u, f_u]      item_rows[i] = [V[i], b_i, 1, e_i]
        #   seen user:   c_u = offset + b_u, f_u = mean - offset;   cold user: c_u = mean, f_u = 0
        #   seen item:   e_i = 0;                                   cold item: V = 0, b_i = 0, e_i = 1
        # so the dot product is exactly the spec's rule for seen pairs and the cold-start value
        # (global mean + the known biases) otherwise, for predictions and top-k alike.
        self.user_rows = np.zeros((n_users + 1, rank + 3), np.float32)
        self.user_rows[:n_users, :rank] = U
        self.user_rows[:, rank] = 1.0
        self.user_rows[:n_users, rank + 1] = np.where(self.seen_users, offset + bu, mean)
        self.user_rows[n_users, rank + 1] = mean
        self.user_rows[:n_users, rank + 2] = np.where(self.seen_users, mean - offset, 0.0)
        self.item_rows = np.zeros((n_items + 1, rank + 3), np.float32)
        self.item_rows[:n_items, :rank] = V
        self.item_rows[:n_items, rank] = bi
        self.item_rows[:, rank + 1] = 1.0
        self.item_rows[:n_items, rank + 2] = ~self.seen_items
        self.item_rows[n_items, rank + 2] = 1.0
        self._item_candidates = self.item_rows[:n_items]  # top-k candidates: the real items only
        norms = np.linalg.norm(V, axis=1, keepdims=True)
        self.item_unit = np.ascontiguousarray(V / np.where(norms > 0, norms, 1.0), dtype=np.float32)
        self._unseen_items = np.flatnonzero(~self.seen_items).astype(np.int32)
        self._n_seen_items = n_items - self._unseen_items.size
        self.train = sp.csr_matrix(
            (np.ones(train_items.shape[0], np.float32), train_items, indptr), shape=(n_users, n_items)
        )

    # -- ID lookup -------------------------------------------------------------------------

    def user_index(self, raw: str) -> int:
        try:
            return self._user_pos[raw]
        except KeyError:
            raise UnknownIDError("user", raw) from None

    def item_index(self, raw: str) -> int:
        try:
            return self._item_pos[raw]
        except KeyError:
            raise UnknownIDError("item", raw) from None

    def lookup(self, users: Sequence[str], items: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Raw IDs -> indices, -1 where unknown."""
        get_u, get_i = self._user_pos.get, self._item_pos.get
        u = np.fromiter((get_u(x, -1) for x in users), dtype=np.int64, count=len(users))
        i = np.fromiter((get_i(x, -1) for x in items), dtype=np.int64, count=len(items))
        return u, i

    # -- predictions -----------------------------------------------------------------------

    def clip(self, values: np.ndarray) -> np.ndarray:
        return np.clip(values, self.scale_min, self.scale_max)

    def predict_indices(self, u: np.ndarray, i: np.ndarray, *, clip: bool = True) -> Predictions:
        """Predict for index pairs (-1 = an ID the artifact does not list: cold start)."""
        n_users, n_items = self.meta.n_users, self.meta.n_items
        uu = np.where(u >= 0, u, n_users)
        ii = np.where(i >= 0, i, n_items)
        ratings = np.einsum("ij,ij->i", self.user_rows[uu], self.item_rows[ii], dtype=np.float64)
        known_user = (u >= 0) & self.seen_users[np.minimum(uu, n_users - 1)]
        known_item = (i >= 0) & self.seen_items[np.minimum(ii, n_items - 1)]
        return Predictions(self.clip(ratings) if clip else ratings, known_user, known_item)

    def predict(self, users: Sequence[str], items: Sequence[str], *, clip: bool = True) -> Predictions:
        """Predict ratings for raw-ID pairs (in order), with cold start for unknown IDs."""
        u, i = self.lookup(users, items)
        return self.predict_indices(u, i, clip=clip)

    # -- retrieval -------------------------------------------------------------------------

    def _topk(self, factors: np.ndarray, query: np.ndarray, k: int, exclude: sp.csr_matrix | None,
              never: np.ndarray | None = None):
        """implicit's top-k for one query; ``exclude`` per query (CSR row), ``never`` for all."""
        ids, scores = topk(factors, query, k, filter_query_items=exclude, filter_items=never,
                           num_threads=self.num_threads)
        ids, scores = ids[0].astype(np.int64), scores[0].astype(np.float64)
        keep = scores > _FILTERED
        return ids[keep], scores[keep]

    def recommend(self, user: str, k: int = 10, *, exclude_rated: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item indices for a listed user and their predicted ratings (clipped), best first.

        Items the user rated in training are left out when ``exclude_rated``; a listed user
        without training ratings gets the cold-start ranking (global mean + item bias). Raises
        :class:`UnknownIDError` for a user the artifact does not list.
        """
        u = self.user_index(user)
        exclude = self.train[u] if exclude_rated else None
        available = self.meta.n_items - (exclude.nnz if exclude is not None else 0)
        k = min(k, available)
        if k <= 0:
            return np.empty(0, np.int64), np.empty(0, np.float64)
        ids, scores = self._topk(self._item_candidates, self.user_rows[u : u + 1], k, exclude)
        return ids, self.clip(scores)

    def similar(self, item: str, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The k items with the highest cosine similarity of (served) item factors, itself excluded.

        Only items with training ratings take part (the others have no fitted factors); asking
        for such an item raises :class:`UnknownIDError`.
        """
        i = self.item_index(item)
        if not self.seen_items[i]:
            raise UnknownIDError("item", item, "has no training ratings, so no fitted factors to compare")
        k = min(k, self._n_seen_items - 1)
        if k <= 0:
            return np.empty(0, np.int64), np.empty(0, np.float64)
        exclude = sp.csr_matrix((np.ones(1, np.float32), np.array([i]), np.array([0, 1])), shape=(1, self.meta.n_items))
        never = self._unseen_items if self._unseen_items.size else None
        return self._topk(self.item_unit, self.item_unit[i : i + 1], k, exclude, never)

    def title(self, index: int) -> str | None:
        return None if self.item_titles is None else self.item_titles[index]
