"""The one ratings container every dataset loader returns and every model consumes.

Ratings are stored as coordinate arrays (user index, item index, value) rather than a
matrix: that is the only layout that is cheap for ML-100K and for ML-25M alike, and the
models build dense, CSR or mini-batch views from it themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Mapping

import numpy as np


@dataclass(frozen=True)
class RatingScale:
    """The documented rating range of a dataset (e.g. 1..5 stars, -10..10 for Jester)."""

    min: float
    max: float

    def __post_init__(self) -> None:
        if not self.min < self.max:
            raise ValueError(f"rating scale needs min < max, got min={self.min}, max={self.max}")

    def clip(self, values: np.ndarray) -> np.ndarray:
        return np.clip(values, self.min, self.max)


@dataclass(eq=False)
class Ratings:
    """Explicit ratings of one dataset (or one split of it), indexed 0..n-1.

    ``users[k]``, ``items[k]`` and ``values[k]`` describe rating k. ``user_ids[u]`` is the
    raw dataset ID (always a string) of user index ``u``; likewise ``item_ids``. Splits of
    one dataset share the same ID arrays, so an index means the same user in train and test.
    """

    name: str
    users: np.ndarray  # int64, shape (n,)
    items: np.ndarray  # int64, shape (n,)
    values: np.ndarray  # float32, shape (n,)
    user_ids: np.ndarray  # str (object) array, shape (n_users,)
    item_ids: np.ndarray  # str (object) array, shape (n_items,)
    scale: RatingScale
    timestamps: np.ndarray | None = None  # int64 seconds since the epoch, shape (n,)
    item_titles: np.ndarray | None = None  # str (object) array, shape (n_items,)
    contexts: np.ndarray | None = None  # int64 third-mode index (tensor data), shape (n,)
    n_contexts: int = 0
    source_files: Mapping[str, str] = field(default_factory=dict)  # file name -> sha256
    source_dir: Path | None = None  # folder the files were read from (canonical split files live there)
    description: str = ""
    n_duplicates: int = 0  # duplicated (user, item[, context]) rows resolved by the loader's duplicates policy

    def __post_init__(self) -> None:
        self.users = np.ascontiguousarray(self.users, dtype=np.int64)
        self.items = np.ascontiguousarray(self.items, dtype=np.int64)
        values = np.asarray(self.values)
        with np.errstate(over="ignore"):
            self.values = np.ascontiguousarray(values, dtype=np.float32)
        if values.dtype != np.float32 and (overflow := np.isinf(self.values) & np.isfinite(values)).any():
            k = int(np.argmax(overflow))  # parsers refuse these naming the line; this guards every other caller
            raise ValueError(f"Ratings '{self.name}': value {values[k]:g} at position {k} overflows float32")
        self.user_ids = np.asarray(self.user_ids, dtype=object)
        self.item_ids = np.asarray(self.item_ids, dtype=object)
        n = self.users.shape[0]
        for label, arr in (("items", self.items), ("values", self.values)):
            if arr.shape != (n,):
                raise ValueError(f"Ratings '{self.name}': {label} has shape {arr.shape}, expected ({n},)")
        if self.timestamps is not None:
            self.timestamps = np.ascontiguousarray(self.timestamps, dtype=np.int64)
            if self.timestamps.shape != (n,):
                raise ValueError(f"Ratings '{self.name}': timestamps has shape {self.timestamps.shape}, expected ({n},)")
        if self.contexts is not None:
            self.contexts = np.ascontiguousarray(self.contexts, dtype=np.int64)
            if self.contexts.shape != (n,):
                raise ValueError(f"Ratings '{self.name}': contexts has shape {self.contexts.shape}, expected ({n},)")
            if n and (self.contexts.min() < 0 or self.contexts.max() >= self.n_contexts):
                raise ValueError(f"Ratings '{self.name}': context index outside 0..{self.n_contexts - 1}")
        if self.item_titles is not None:
            self.item_titles = np.asarray(self.item_titles, dtype=object)
            if self.item_titles.shape != (self.n_items,):
                raise ValueError(
                    f"Ratings '{self.name}': item_titles has {self.item_titles.shape[0]} entries for {self.n_items} items"
                )
        if n:
            if self.users.min() < 0 or self.users.max() >= self.n_users:
                raise ValueError(f"Ratings '{self.name}': user index outside 0..{self.n_users - 1}")
            if self.items.min() < 0 or self.items.max() >= self.n_items:
                raise ValueError(f"Ratings '{self.name}': item index outside 0..{self.n_items - 1}")

    # --- sizes -------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.users.shape[0])

    @property
    def n_ratings(self) -> int:
        return len(self)

    @property
    def n_users(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.item_ids.shape[0])

    @property
    def density(self) -> float:
        cells = self.n_users * self.n_items * max(self.n_contexts, 1)
        return len(self) / cells if cells else 0.0

    # --- raw ID <-> index maps -----------------------------------------------------------
    @cached_property
    def user_index(self) -> dict[str, int]:
        return {raw: i for i, raw in enumerate(self.user_ids.tolist())}

    @cached_property
    def item_index(self) -> dict[str, int]:
        return {raw: i for i, raw in enumerate(self.item_ids.tolist())}

    # --- value statistics -----------------------------------------------------------------
    @property
    def observed_min(self) -> float:
        return float(self.values.min()) if len(self) else float("nan")

    @property
    def observed_max(self) -> float:
        return float(self.values.max()) if len(self) else float("nan")

    @property
    def mean(self) -> float:
        return float(self.values.mean(dtype=np.float64)) if len(self) else float("nan")

    @property
    def out_of_scale(self) -> int:
        """How many ratings fall outside the documented scale (Jester-4 has some)."""
        return int(np.count_nonzero((self.values < self.scale.min) | (self.values > self.scale.max)))

    # --- derived views --------------------------------------------------------------------
    def subset(self, selection: np.ndarray, name: str | None = None) -> "Ratings":
        """The ratings picked by a boolean mask or an index array, sharing the ID maps."""
        selection = np.asarray(selection)
        return replace(
            self,
            name=name or self.name,
            users=self.users[selection],
            items=self.items[selection],
            values=self.values[selection],
            timestamps=None if self.timestamps is None else self.timestamps[selection],
            contexts=None if self.contexts is None else self.contexts[selection],
        )

    def clipped(self) -> "Ratings":
        """A copy with every rating clipped to the documented scale (explicit, never implicit)."""
        return replace(self, values=self.scale.clip(self.values).astype(np.float32))

    def summary(self) -> dict:
        """The figures `data info` prints."""
        return {
            "name": self.name,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "n_contexts": self.n_contexts,
            "n_ratings": self.n_ratings,
            "density": self.density,
            "rating_min": self.observed_min,
            "rating_max": self.observed_max,
            "rating_mean": self.mean,
            "scale_min": self.scale.min,
            "scale_max": self.scale.max,
            "out_of_scale": self.out_of_scale,
            "has_timestamps": self.timestamps is not None,
            "has_titles": self.item_titles is not None,
            "n_duplicates": self.n_duplicates,
        }
