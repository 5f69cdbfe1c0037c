"""Random-factor artifacts for tests, benchmarks and demos (no training needed).

The factors are random but the artifact is a complete, valid v1 artifact written with
:func:`recsys_flowadam.artifact.save_artifact`, so the service treats it like a trained one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from recsys_flowadam.artifact import save_artifact


def random_artifact(
    directory: str | Path,
    n_users: int = 50,
    n_items: int = 80,
    rank: int = 8,
    model_type: Literal["mf", "biased-mf", "cp"] = "biased-mf",
    *,
    n_contexts: int = 3,
    ratings_per_user: int = 10,
    scale: tuple[float, float] = (1.0, 5.0),
    seed: int = 0,
    factor_std: float = 0.5,
    cold_users: int = 0,
    cold_items: int = 0,
    titles: bool = True,
    dataset_name: str = "synthetic",
) -> Path:
    """Write an artifact with random factors, biases and training interactions; return its path.

    User IDs are ``"u0".."u{n-1}"`` and item IDs ``"i0".."i{m-1}"``; each user "rated" a random
    ``ratings_per_user`` items in training (stored as the CSR train_indptr/train_items), except
    the last ``cold_users`` users, and no one rated the last ``cold_items`` items.
    """
    rng = np.random.default_rng(seed)
    lo, hi = scale
    mean = (lo + hi) / 2
    tensors: dict[str, np.ndarray] = {
        "user_factors": rng.normal(0.0, factor_std, (n_users, rank)).astype(np.float32),
        "item_factors": rng.normal(0.0, factor_std, (n_items, rank)).astype(np.float32),
    }
    if model_type in ("biased-mf", "cp"):
        tensors["user_bias"] = rng.normal(0.0, 0.3, n_users).astype(np.float32)
        tensors["item_bias"] = rng.normal(0.0, 0.3, n_items).astype(np.float32)
    if model_type == "cp":
        tensors["context_factors"] = rng.normal(1.0, 0.3, (n_contexts, rank)).astype(np.float32)
    warm_users, warm_items = n_users - cold_users, n_items - cold_items
    per_user = min(ratings_per_user, warm_items)
    # argpartition of random keys = a random subset of per_user items for every user, vectorised.
    # Done in blocks of users: the whole (users x items) key matrix plus its argpartition indices
    # peak at 16 GB for 10,000 x 100,000 (the serve bench's model) on a 24 GB machine. Blocks
    # consume the generator's stream in the same order, so the result is identical.
    block = max(1, (1 << 22) // max(warm_items, 1))
    rated = np.empty((warm_users, per_user), dtype=np.int64)
    for start in range(0, warm_users, block):
        keys = rng.random((min(block, warm_users - start), warm_items))
        rated[start : start + keys.shape[0]] = np.argpartition(keys, per_user - 1, axis=1)[:, :per_user]
    rated.sort(axis=1)
    counts = np.r_[np.full(warm_users, per_user), np.zeros(cold_users, dtype=np.int64)]
    tensors["train_indptr"] = np.r_[0, np.cumsum(counts)].astype(np.int64)
    tensors["train_items"] = rated.reshape(-1).astype(np.int64)
    meta = {
        "model_type": model_type,
        "rank": rank,
        "n_users": n_users,
        "n_items": n_items,
        "n_contexts": n_contexts if model_type == "cp" else 0,
        "dataset": {"name": dataset_name, "source_files": {}, "split": "random", "seed": seed},
        "rating_scale": {"min": lo, "max": hi},
        "global_mean": mean,
        "prediction_offset": mean,  # as if trained on centred ratings
        "user_ids": [f"u{u}" for u in range(n_users)],
        "item_ids": [f"i{i}" for i in range(n_items)],
        "item_titles": [f"Item {i}" for i in range(n_items)] if titles else None,
        "train_config": {"synthetic": True, "seed": seed},
        "optimizer": {"name": "none", "params": {}, "diagnostics": {}},
        "metrics": {},
    }
    return save_artifact(directory, tensors, meta)
