"""Parse-speed figures of the dataset layer (prints them; no assertions).

* ml-100k and jester-4 from the real files under --data-dir / $RECSYS_FLOWADAM_DATA
  (parse without the cache, then a load served from the parsed-dataset cache);
* a generated ML-25M-sized ``ratings.csv`` (25,000,095 rows by default, official CSV format)
  written to a temporary folder under /tmp (never the repository) and removed afterwards.

    python bench/bench_data_parse.py [--data-dir D] [--rows N] [--skip-large]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from recsys_flowadam.data import load_dataset, resolve_data_dir


def timed(label: str, func):
    start, cpu = time.perf_counter(), time.process_time()
    result = func()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    n = result.n_ratings
    print(f"{label:<46} wall {seconds:7.2f} s  cpu {cpu:7.2f} s  {n:>11,} ratings  {n / seconds:>12,.0f} ratings/s")
    return result


def write_ml25m_like(folder: Path, rows: int, seed: int = 0) -> Path:
    """A ratings.csv with ML-25M's header, shape and value formats (distinct pairs sorted by user, half stars)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    path = folder / "ratings.csv"
    n_users, n_items = 162_541, 209_171
    keys = np.unique(rng.integers(0, n_users * n_items, int(rows * 1.01)))  # distinct (user, movie) pairs
    while keys.size < rows:
        keys = np.unique(np.concatenate([keys, rng.integers(0, n_users * n_items, rows - keys.size + 1000)]))
    keys = np.sort(rng.choice(keys, rows, replace=False))  # sorted by user, then movie, like ML-25M
    users, items = keys // n_items + 1, keys % n_items + 1
    with open(path, "w", newline="") as fh:
        fh.write("userId,movieId,rating,timestamp\n")
        chunk = 2_000_000
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            k = stop - start
            frame = pd.DataFrame({
                "userId": users[start:stop],
                "movieId": items[start:stop],
                "rating": rng.integers(1, 11, k) / 2.0,
                "timestamp": rng.integers(789_652_009, 1_574_327_703, k),
            })
            frame.to_csv(fh, header=False, index=False, float_format="%.1f", lineterminator="\n")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--rows", type=int, default=25_000_095)
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args()

    cache = Path(tempfile.mkdtemp(prefix="recsys-bench-cache-"))
    os.environ["RECSYS_FLOWADAM_CACHE"] = str(cache)
    root = resolve_data_dir(args.data_dir)
    print(f"data root {root}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"pandas {pd.__version__}, numpy {np.__version__}")
    try:
        for name in ("ml-100k", "jester-4"):
            if not (root / name).is_dir():
                print(f"{name}: not under {root}, skipped")
                continue
            timed(f"{name}: parse (no cache)", lambda: load_dataset(name, root, offline=True, cache=False))
            timed(f"{name}: parse + write cache", lambda: load_dataset(name, root, offline=True))
            timed(f"{name}: load from parsed cache", lambda: load_dataset(name, root, offline=True))
        if not args.skip_large:
            tmp = Path(tempfile.mkdtemp(prefix="recsys-bench-ml25m-", dir="/tmp"))
            try:
                start = time.perf_counter()
                write_ml25m_like(tmp / "ml-25m", args.rows)
                size = (tmp / "ml-25m" / "ratings.csv").stat().st_size
                print(f"generated {args.rows:,}-row ratings.csv ({size / 1e6:,.0f} MB) in "
                      f"{time.perf_counter() - start:.1f} s")
                timed("ml-25m-sized ratings.csv: parse (no cache)",
                      lambda: load_dataset("ml-25m", tmp, offline=True, cache=False))
                timed("ml-25m-sized ratings.csv: parse + write cache", lambda: load_dataset("ml-25m", tmp, offline=True))
                timed("ml-25m-sized ratings.csv: load from cache", lambda: load_dataset("ml-25m", tmp, offline=True))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak resident memory {peak:,.0f} MB")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
