"""The third mode of the CP model: time bins from timestamps (``--context time:N``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from recsys_flowadam.data.ratings import Ratings


def parse_context(spec: str | None) -> int | None:
    """``"time:N"`` -> N (bins); None/"" -> None. ValueError with the expected form otherwise."""
    if not spec:
        return None
    kind, _, count = spec.partition(":")
    if kind != "time" or not count.isdigit() or int(count) < 1:
        raise ValueError(f"--context must look like time:N with N >= 1 (got {spec!r})")
    return int(count)


def time_bin_edges(ratings: Ratings, n_bins: int) -> list[float]:
    """Quantile edges of the timestamps (equal-count bins), from the whole dataset so every
    split bins the same way; inner edges only (``n_bins - 1`` numbers)."""
    if ratings.timestamps is None:
        raise ValueError(f"dataset '{ratings.name}' has no timestamps: --context time:N needs them")
    qs = np.quantile(ratings.timestamps.astype(np.float64), np.linspace(0, 1, n_bins + 1)[1:-1])
    return [float(q) for q in qs]


def with_time_contexts(ratings: Ratings, edges: list[float]) -> Ratings:
    """A copy whose ``contexts`` are the time bins given by ``edges`` (``len(edges) + 1`` bins)."""
    if ratings.timestamps is None:
        raise ValueError(f"ratings '{ratings.name}' have no timestamps: --context time:N needs them")
    bins = np.searchsorted(np.asarray(edges, dtype=np.float64), ratings.timestamps.astype(np.float64), side="right")
    return replace(ratings, contexts=bins.astype(np.int64), n_contexts=len(edges) + 1)
