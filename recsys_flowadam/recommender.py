"""``Recommender``: the Python API in scikit-learn / Surprise style over the trainer and the artifact.

    rec = Recommender(model="biased-mf", rank=50, reg=0.05).fit(df)   # user, item, rating columns
    rec.predict([196, 22], [242, 377]); rec.recommend(196, k=5); rec.save("models/mine")

Settings are the training configuration's own names (:class:`~recsys_flowadam.train.config.TrainConfig`,
plus FlowAdam's knobs such as ``ode_method``), validated when given. A fitted model is exactly an
artifact (the one ``serve`` and ``evaluate`` read) held in memory: ``predict`` and ``recommend`` go
through the service's scorer, so the Python answers, the saved artifact's and the HTTP service's
are the same numbers, and ``Recommender.load(dir)`` predicts what the original predicted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from recsys_flowadam.data.ratings import Ratings, RatingScale
from recsys_flowadam.page_policy import small_pages

_ID_COLUMNS = ("user", "item", "rating")
_SMALL_PAGES_FROM = 100_000  # predict's pairs from which its gathered rows go on small pages (page_policy)


class NotFittedError(RuntimeError):
    """``predict``/``recommend``/``save`` on a Recommender that was neither fitted nor loaded."""


class Recommender:
    """A rating-prediction model: ``fit`` trains it, ``predict``/``recommend`` use it.

    Constructor keywords are training settings (``model``, ``optimizer``, ``rank``, ``reg``, ``lr``,
    ``steps``, ``patience``, ``seed``, ...; see ``recsys-flowadam train --help``); unset ones keep
    the configuration's defaults. Fitted attributes end in ``_``: ``config_`` (the validated
    configuration, reg as chosen), ``reg_search_`` (how reg was chosen), ``artifact_``, ``n_users_``,
    ``n_items_``, ``best_val_rmse_``, ``history_``, ``grad_evals_``, ``train_seconds_``.
    """

    def __init__(self, **settings: Any) -> None:
        from recsys_flowadam.train.config import training_config

        training_config(settings)  # validate now: a bad name or value fails here, not in fit
        self._settings = dict(settings)

    # -- scikit-learn's parameter protocol ---------------------------------------------------

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Every training setting's value: the ones given, and the defaults for the rest."""
        from recsys_flowadam.train.config import training_defaults

        return {**training_defaults(), **self._settings}

    def set_params(self, **settings: Any) -> "Recommender":
        """Change settings (validated at once); takes effect at the next ``fit``."""
        from recsys_flowadam.train.config import training_config

        merged = {**self._settings, **settings}
        training_config(merged)
        self._settings = merged
        return self

    def __getattr__(self, name: str) -> Any:
        # settings read as attributes (rec.rank), as scikit-learn estimators expose them
        if not name.startswith("_"):
            params = self.get_params()
            if name in params:
                return params[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        given = ", ".join(f"{k}={v!r}" for k, v in self._settings.items())
        return f"Recommender({given})"

    # -- fitting -----------------------------------------------------------------------------

    def fit(self, ratings: Any, val: Any = None, *, scale: tuple[float, float] | None = None,
            duplicates: str = "error", progress: bool = False) -> "Recommender":
        """Train on ``ratings``, early-stopping on ``val`` when given.

        ``ratings``/``val``: a :class:`~recsys_flowadam.data.Ratings` (``val`` from the same split,
        sharing its ID arrays) or a pandas DataFrame with ``user``, ``item`` and ``rating`` columns
        of raw IDs (other columns are ignored; a ``timestamp`` column is kept). ``scale``: the
        rating scale ``(min, max)`` for DataFrames (default: the observed range); ``duplicates``:
        what to do with a repeated (user, item) pair in DataFrames: ``error``, ``first``, ``last``
        or ``mean``.

        With ``reg`` unset and ``tune`` on (the defaults), ``reg`` is chosen on the validation part
        (``train.reg_search``); without ``val``, one is carved from ``ratings`` for the search and
        early stopping (12.5%, drawn with ``seed``) when ``refit`` is on, so the final model still
        fits every rating; otherwise reg takes its default and a warning says so. From 3M training
        ratings (the automatic mini-batch path) all but 100k of a validation part join the one
        training run instead of a refit (``pipeline.fold_validation``): those 100k are not fitted.
        """
        from recsys_flowadam.train.config import training_config
        from recsys_flowadam.train.pipeline import fit_and_score, in_memory_artifact

        config = training_config(self._settings)
        train, val_ratings, id_types = _as_ratings(ratings, val, scale, duplicates)
        carved = val_ratings is None and _wants_carved_validation(train, config)
        if carved:
            train, val_ratings = _carve_validation(train, config.seed)
        fit = fit_and_score(train, val_ratings, config, progress=progress)
        fit.reg_search["validation"] = "carved from ratings" if carved else "given" if val is not None else "none"
        self.config_ = fit.config
        self.reg_search_ = fit.reg_search
        self._attach(in_memory_artifact(fit, dataset_name=train.name, split="given",
                                        extra_config={"id_types": id_types}))
        result = fit.result
        self.best_val_rmse_ = result.best_val_rmse
        self.history_ = result.history
        self.grad_evals_ = result.grad_evals
        self.train_seconds_ = result.train_seconds
        return self

    def _attach(self, artifact: Any) -> None:
        from recsys_flowadam.serve.scorer import Scorer

        self.artifact_ = artifact
        self.scorer_ = Scorer(artifact, lazy=True)  # recommend's training matrix on its first call
        self.n_users_ = artifact.meta.n_users
        self.n_items_ = artifact.meta.n_items
        id_types = artifact.meta.train_config.get("id_types") or {}
        self._int_items = id_types.get("item") == "int"
        self._ids = {"users": _IDLookup(artifact.meta.user_ids, id_types.get("user") == "int"),
                     "items": _IDLookup(artifact.meta.item_ids, self._int_items)}

    def _scorer(self):
        scorer = self.__dict__.get("scorer_")
        if scorer is None:
            raise NotFittedError("this Recommender is not fitted: call fit(...) or Recommender.load(dir) first")
        return scorer

    # -- using a fitted model ----------------------------------------------------------------

    def predict(self, users: Any, items: Any, *, clip: bool = True) -> np.ndarray:
        """Predicted ratings (float64 array) for aligned sequences of raw user and item IDs.

        IDs are matched as given to ``fit`` (ints stay ints; strings work too); an ID the model has
        no training rating for gets the cold-start rule (global mean plus the known bias).
        """
        scorer = self._scorer()
        u, i = self._ids["users"].positions(users, "users"), self._ids["items"].positions(items, "items")
        if len(u) != len(i):
            raise ValueError(f"predict: {len(u)} users but {len(i)} items; give one item per user")
        if len(u) < _SMALL_PAGES_FROM:
            return scorer.predict_indices(u, i, clip=clip).ratings
        with small_pages():  # (the gathered rows are fresh arrays as large as the request)
            return scorer.predict_indices(u, i, clip=clip).ratings

    def recommend(self, user: Any, k: int = 10, *, exclude_seen: bool = True):
        """The ``k`` items with the highest predicted rating for ``user``, best first, as a DataFrame
        with columns ``item`` (raw ID) and ``rating`` (predicted, clipped). Items the user rated in
        training are left out when ``exclude_seen``; an unknown user gets the cold-start ranking."""
        import pandas as pd

        from recsys_flowadam.serve.scorer import UnknownIDError

        scorer = self._scorer()
        if k < 1:
            raise ValueError(f"recommend: k must be >= 1 (got {k})")
        try:
            ids, scores = scorer.recommend(str(user), k, exclude_rated=exclude_seen)
        except UnknownIDError:
            ids, scores = scorer.recommend_cold(k)
        raw = np.asarray(scorer.item_ids, dtype=object)[ids] if len(ids) else np.empty(0, dtype=object)
        items = raw.astype(np.int64) if self._int_items else raw
        return pd.DataFrame({"item": items, "rating": scores})

    # -- persistence ---------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write the artifact (``model.safetensors`` + ``model.json``) that ``serve`` and
        ``evaluate`` load; an existing artifact there is replaced."""
        from recsys_flowadam.artifact import save_artifact

        self._scorer()
        artifact = self.artifact_
        return save_artifact(directory, dict(artifact.tensors), artifact.meta)

    @classmethod
    def load(cls, directory: str | Path) -> "Recommender":
        """A fitted Recommender from an artifact folder; its settings are the recorded ones."""
        from recsys_flowadam.artifact import load_artifact
        from recsys_flowadam.train.config import training_defaults

        artifact = load_artifact(directory)
        known = training_defaults()
        recorded = artifact.meta.train_config
        rec = cls.__new__(cls)
        rec._settings = {k: v for k, v in recorded.items() if k in known and v != known[k]}
        rec._attach(artifact)
        return rec


# ------------------------------------------------------------------------------------------------
# input conversion


class _IDLookup:
    """Raw IDs -> positions in an artifact's ID list (-1: not listed), as ``predict`` matches them.

    Vectorised through pandas indexes built on first use: for a million pairs, a dict lookup per ID
    took 1.4 s and turning every ID into its string first 2.2 s. Integer IDs of a model fitted on
    integer IDs are looked up as integers; anything else as the artifact's strings."""

    def __init__(self, ids: list[str], int_ids: bool) -> None:
        self._ids, self._int_ids = ids, int_ids
        self._by_int = self._by_str = None

    def positions(self, values: Any, what: str) -> np.ndarray:
        import pandas as pd

        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            values = [values]
        if isinstance(values, (pd.Series, pd.Index)):  # (nullable and other extension dtypes: as objects)
            values = values.to_numpy(dtype=object if isinstance(values.dtype, pd.api.extensions.ExtensionDtype)
                                     else None)
        arr = values if isinstance(values, np.ndarray) else np.fromiter(values, dtype=object)
        if arr.ndim != 1:
            raise ValueError(f"{what}: give a sequence of IDs (one dimension), not an array of shape {arr.shape}")
        if arr.dtype == object:  # Python objects: by what they all are (pandas' inference, in C)
            arr = _typed_ids(arr, what)
        if arr.dtype.kind == "f":
            bad = ~(np.isfinite(arr) & (np.floor(arr) == arr))
            if bad.any():
                raise ValueError(f"{what}: {arr[np.argmax(bad)].item()!r} is not a valid ID")
            # integral floats as the integers they are (past int64's range: as strings, one by one)
            arr = arr.astype(np.int64) if (np.abs(arr) < 2.0**62).all() else np.asarray(_id_strings(arr, what), object)
        if arr.dtype.kind in "iu" and self._int_ids:
            if self._by_int is None:
                try:
                    self._by_int = pd.Index(np.asarray(self._ids, dtype=object).astype(np.int64))
                except OverflowError:  # IDs past int64 (uint64): matched as strings instead
                    self._int_ids = False
            if self._by_int is not None:
                return self._by_int.get_indexer(arr).astype(np.int64, copy=False)
        if arr.dtype.kind in "iuU":
            keys = arr.astype(str).astype(object)
        elif arr.dtype.kind == "O":  # strings (from _typed_ids)
            keys = arr
        else:  # other arrays (bytes, bools): each made the artifact's string
            keys = np.asarray(_id_strings(arr, what), dtype=object)
        if self._by_str is None:
            self._by_str = pd.Index(np.asarray(self._ids, dtype=object))
        return self._by_str.get_indexer(keys).astype(np.int64, copy=False)


def _typed_ids(arr: np.ndarray, what: str) -> np.ndarray:
    """An object array of IDs as int64 (all integers), float64 (numbers), or object strings (all
    strings, or anything else made the artifact's strings one by one)."""
    import pandas as pd

    kind = pd.api.types.infer_dtype(arr, skipna=False)
    try:
        if kind == "integer":
            return arr.astype(np.int64)
        if kind == "floating":
            return arr.astype(np.float64)
    except OverflowError:  # integers past int64: as strings
        pass
    # (ints mixed with floats too: an int past 2^53 would not survive a float64 array)
    return arr if kind == "string" else np.asarray(_id_strings(arr, what), dtype=object)


def _id_strings(values: Any, what: str) -> list[str]:
    """Raw IDs as the artifact's strings (an int 196 and the string "196" are the same ID)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        values = [values]
    out = []
    for v in values:
        if isinstance(v, (float, np.floating)):
            if not (np.isfinite(v) and float(v).is_integer()):
                raise ValueError(f"{what}: {v!r} is not a valid ID")
            v = int(v)
        out.append(str(v))
    return out


def _as_ratings(ratings: Any, val: Any, scale: tuple[float, float] | None,
                duplicates: str) -> tuple[Ratings, Ratings | None, dict[str, str]]:
    """``(train, val, id_types)``: Ratings sharing one ID index, and whether the raw IDs were ints."""
    if isinstance(ratings, Ratings):
        if val is not None and not isinstance(val, Ratings):
            raise TypeError("fit: val must be a Ratings when ratings is one (the parts of one split)")
        if val is not None and not (np.array_equal(val.user_ids, ratings.user_ids)
                                    and np.array_equal(val.item_ids, ratings.item_ids)):
            raise ValueError("fit: val does not share ratings' user/item ID arrays; pass two parts of one split "
                             "(split_ratings) or two DataFrames")
        return ratings, val, {"user": "str", "item": "str"}
    frames = [_check_frame(ratings, "ratings")] + ([] if val is None else [_check_frame(val, "val")])
    both = _frames_to_ratings(frames, scale, duplicates)
    id_types = {k: "int" if all(f[k].dtype.kind in "iu" for f in frames) else "str" for k in ("user", "item")}
    n_train = len(frames[0])
    train = both.subset(np.arange(n_train), name=both.name)
    val_ratings = None if val is None else both.subset(np.arange(n_train, len(both)), name=f"{both.name}:val")
    return train, val_ratings, id_types


def _wants_carved_validation(train: Ratings, config: Any) -> bool:
    """Whether ``fit`` without ``val`` carves one for the reg search (see ``fit``); warns when the
    search would have run but cannot (refit off: the carved ratings would never be fitted)."""
    import warnings

    from recsys_flowadam.train.reg_search import skip_reason

    if skip_reason(config, len(train), n_val=1, distributed=False) is not None:
        return False
    if not config.refit:
        warnings.warn("fit: reg is unset and no val was given; with refit off no validation part is carved, so "
                      "reg takes its default (give val, or reg, or leave refit on)", stacklevel=3)
        return False
    return len(train) >= 16  # a part of at least 2 ratings to validate on


def _carve_validation(train: Ratings, seed: int) -> tuple[Ratings, Ratings]:
    """``(train, val)``: ``VAL_OF_TRAIN`` of the ratings drawn with ``seed`` as validation, as the
    data layer carves one from a fixed train part."""
    from recsys_flowadam.data.splits import VAL_OF_TRAIN

    perm = np.random.default_rng(seed).permutation(len(train))
    n_val = int(round(VAL_OF_TRAIN * len(train)))
    return (train.subset(np.sort(perm[n_val:]), name=train.name),
            train.subset(np.sort(perm[:n_val]), name=f"{train.name}:val"))


def _check_frame(frame: Any, what: str):
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"fit: {what} must be a Ratings or a pandas DataFrame, not {type(frame).__name__}")
    missing = [c for c in _ID_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"fit: {what} lacks column(s) {missing}; it needs 'user', 'item' and 'rating' "
                         f"(has {list(frame.columns)})")
    for column in ("user", "item"):
        if frame[column].isna().any():
            row = int(np.flatnonzero(frame[column].isna().to_numpy())[0])
            raise ValueError(f"fit: {what} row {row}: column '{column}' is missing")
    rating = pd.to_numeric(frame["rating"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(rating)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"fit: {what} row {row}: rating {frame['rating'].iloc[row]!r} is not a finite number")
    return frame


def _frames_to_ratings(frames: list, scale: tuple[float, float] | None, duplicates: str) -> Ratings:
    import pandas as pd

    from recsys_flowadam.data.build import build_ratings

    df = pd.concat([f[[c for c in (*_ID_COLUMNS, "timestamp") if c in f.columns]] for f in frames],
                   ignore_index=True)
    values = df["rating"].to_numpy(dtype=np.float64)
    if scale is not None:
        rating_scale = RatingScale(float(scale[0]), float(scale[1]))
    else:
        lo, hi = float(values.min()), float(values.max())
        rating_scale = RatingScale(lo, hi) if lo < hi else RatingScale(lo - 0.5, hi + 0.5)
    has_time = "timestamp" in df.columns and all("timestamp" in f.columns for f in frames)
    ratings = build_ratings("dataframe", df["user"].to_numpy(), df["item"].to_numpy(), values, rating_scale,
                            timestamps=df["timestamp"].to_numpy(dtype=np.int64) if has_time else None,
                            duplicates=duplicates, describe_row=_describe_row(frames),
                            description="ratings from a pandas DataFrame")
    return ratings


def _describe_row(frames: list):
    """Row k of the concatenated frames named by its frame and position (for duplicate errors)."""
    n_train = len(frames[0])
    return lambda k: f"ratings row {k}" if k < n_train else f"val row {k - n_train}"
