"""`--context time:N`: equal-count time bins from the whole dataset, applied to every split."""

from __future__ import annotations

import numpy as np
import pytest

from recsys_flowadam.data.ratings import Ratings, RatingScale
from recsys_flowadam.train.context import parse_context, time_bin_edges, with_time_contexts


def _ratings(timestamps):
    n = len(timestamps)
    return Ratings("t", np.zeros(n), np.arange(n), np.ones(n), np.array(["u"]), np.array([str(k) for k in range(n)]),
                   RatingScale(1, 5), timestamps=np.asarray(timestamps))


def test_time_bins_are_equal_count_and_shared_by_parts():
    full = _ratings([50, 10, 20, 30, 40, 60, 70, 80])
    edges = time_bin_edges(full, 4)
    binned = with_time_contexts(full, edges)
    assert binned.n_contexts == 4
    assert np.bincount(binned.contexts).tolist() == [2, 2, 2, 2]
    assert binned.contexts[np.argsort(full.timestamps)].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    part = with_time_contexts(full.subset(np.array([0, 5])), edges)  # timestamps 50, 60
    assert part.contexts.tolist() == [2, 2] and part.n_contexts == 4


def test_bad_context_specs_and_missing_timestamps():
    assert parse_context(None) is None and parse_context("time:6") == 6
    for bad in ("time", "time:0", "day:3", "time:x"):
        with pytest.raises(ValueError, match="time:N"):
            parse_context(bad)
    no_time = Ratings("x", [0], [0], [1.0], ["u"], ["i"], RatingScale(1, 5))
    with pytest.raises(ValueError, match="timestamps"):
        time_bin_edges(no_time, 3)
