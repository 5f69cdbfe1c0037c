"""Scoring over a loaded artifact: rating predictions, top-k recommendations, similar items.

The prediction rule is the artifact spec's (format v1), as
:mod:`recsys_flowadam.models.prediction` writes it once for training, ``evaluate`` and this
service. It is folded at load time into one dot product over *augmented* factor rows
(:func:`~recsys_flowadam.models.prediction.fold_rows`): offset, biases and the cold-start value
(global mean + the known biases, for users/items without training ratings or not listed at
all). For cp models served without a context, V[i] is replaced by V[i] * mean_c W[c] (the
expected rating over a uniformly chosen context). Top-k retrieval is then an inner-product
search that the ``implicit`` library's CPU top-k does (with per-user filtering of the items
rated in training).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.sparse as sp
from implicit.cpu.topk import topk

from recsys_flowadam.artifact import Artifact
from recsys_flowadam.models.prediction import clip_ratings, fold_rows, rule_from_artifact

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
    """Numpy scorer built once per artifact; immutable afterwards (its lazily built training matrix is
    made once, under a lock), so safe to share across threads. ``lazy``: build that matrix on the
    first ``recommend`` instead of now."""

    def __init__(self, artifact: Artifact, *, num_threads: int = 1, lazy: bool = False) -> None:
        meta = artifact.meta
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

        # An ID without training ratings has never-fitted factors: it is served as cold, like an
        # ID the artifact does not list at all (the same rule as the trainer's evaluation).
        self.rule = rule_from_artifact(artifact)
        self.seen_users, self.seen_items = self.rule.seen_users, self.rule.seen_items
        # user_rows[u] . item_rows[i] = the rule's rating (cold start included); the last row of
        # each stands for an ID the artifact does not list
        self.user_rows, self.item_rows = fold_rows(self.rule)
        n_items, rank = meta.n_items, meta.rank
        V = self.item_rows[:n_items, :rank]  # served item factors (cp: context-averaged; cold: 0)
        self._item_candidates = self.item_rows[:n_items]  # top-k candidates: the real items only
        norms = np.linalg.norm(V, axis=1, keepdims=True)
        self.item_unit = np.ascontiguousarray(V / np.where(norms > 0, norms, 1.0), dtype=np.float32)
        self._unseen_items = np.flatnonzero(~self.seen_items).astype(np.int32)
        self._n_seen_items = n_items - self._unseen_items.size
        self._train: sp.csr_matrix | None = None
        self._train_lock = threading.Lock()
        if not lazy:
            self.train  # noqa: B018  (built now)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_train_lock"]  # (a lock does not pickle or copy: a new one on the other side)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._train_lock = threading.Lock()

    @property
    def train(self) -> sp.csr_matrix:
        """The training pairs as a CSR matrix (what ``recommend`` excludes), built on first use when the
        scorer was made ``lazy`` (the Python API's: 0.2 s at 9M ratings that predicting never needs)."""
        if self._train is None:
            with self._train_lock:
                if self._train is None:
                    t = self.artifact.tensors
                    indptr, train_items = np.asarray(t["train_indptr"]), np.asarray(t["train_items"])
                    self._train = sp.csr_matrix((np.ones(train_items.shape[0], np.float32), train_items, indptr),
                                                shape=(self.meta.n_users, self.meta.n_items))
        return self._train

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
        return clip_ratings(values, self.rule.scale)

    def predict_indices(self, u: np.ndarray, i: np.ndarray, *, clip: bool = True) -> Predictions:
        """Predict for index pairs (-1 = an ID the artifact does not list: cold start)."""
        n_users, n_items = self.meta.n_users, self.meta.n_items
        uu = np.where(u >= 0, u, n_users)
        ii = np.where(i >= 0, i, n_items)
        ratings = np.einsum("ij,ij->i", self.user_rows[uu], self.item_rows[ii], dtype=np.float64)
        known_user, known_item = self.rule.known(u, i)
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

    def recommend_cold(self, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-k for a user the artifact does not list: the cold-start ranking (global mean +
        item bias; for mf every item ties at the mean), best first, as :meth:`recommend` returns."""
        k = min(k, self.meta.n_items)
        if k <= 0:
            return np.empty(0, np.int64), np.empty(0, np.float64)
        unknown = self.meta.n_users  # the extra last row: an ID the artifact does not list
        ids, scores = self._topk(self._item_candidates, self.user_rows[unknown : unknown + 1], k, None)
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
