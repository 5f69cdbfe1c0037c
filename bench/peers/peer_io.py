"""What every contender runner of ``bench/bench_scale.py`` shares: its command line, reading the
train/test files, scoring held-out ratings the same way, and printing one JSON line.

The runners run in different virtual environments (ours in the project's, the peers in a
separate one), so this module needs only numpy and pandas. A runner prints exactly one JSON
object on its last stdout line; ``bench_scale.py`` reads that line and measures the process's
wall time and peak memory itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

SCALE = (0.5, 5.0)  # the generated problem's half-star rating scale: predictions are clipped to it


def arg_parser(description: str) -> argparse.ArgumentParser:
    """The options every runner takes: the two files, the seed and the CPU threads."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--train", type=Path, required=True, help="train CSV (user,item,rating with a header)")
    ap.add_argument("--test", type=Path, required=True, help="test CSV, same columns")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads; 0: the library's choice")
    return ap


def read_ratings(path: Path) -> pd.DataFrame:
    """A ``user,item,rating`` CSV as int64/int64/float32 columns."""
    return pd.read_csv(path, dtype={"user": np.int64, "item": np.int64, "rating": np.float32}, engine="c")


def rmse(pred: np.ndarray, truth: np.ndarray) -> float:
    """Root mean squared error of predictions clipped to the rating scale (as every contender is scored)."""
    err = np.clip(np.asarray(pred, dtype=np.float64), *SCALE) - np.asarray(truth, dtype=np.float64)
    return float(np.sqrt(np.mean(err * err)))


def index_of(ids: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Position of each of ``ids`` in the sorted array ``known``, -1 where absent (vectorised lookup)."""
    if len(known) == 0:
        return np.full(len(ids), -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(known, ids), len(known) - 1)
    return np.where(known[pos] == ids, pos, -1)


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds`` (perf_counter)."""

    def __enter__(self) -> "Stopwatch":
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0


def emit(result: dict) -> None:
    """Print the runner's result as the last stdout line."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
