"""Cornac MF (Cython SGD) on the bench's train/test files; prints one JSON line.

Settings are the issue's: k=20, 20 epochs, lr 0.01, lambda 0.02, biases on. Cornac drops to one
thread whenever it is given a seed, so the seed draws the initial factors here instead (N(0, 0.01^2),
Cornac's own initialisation) and the SGD runs on ``--threads`` threads (0: all cores), as Cornac
does by default. The Dataset is built from numpy arrays (Cornac's ``from_uir`` loops in Python);
that preparation is timed apart from the fit.
"""

from __future__ import annotations

import multiprocessing

import numpy as np

from peer_io import Stopwatch, arg_parser, emit, index_of, read_ratings, rmse

K, EPOCHS, LR, LAMBDA = 20, 20, 0.01, 0.02


def build_dataset(train, seed: int):
    """A cornac Dataset over the training ratings, with index maps made by numpy."""
    from cornac.data import Dataset

    users, u_idx = np.unique(train["user"].to_numpy(), return_inverse=True)
    items, i_idx = np.unique(train["item"].to_numpy(), return_inverse=True)
    uid_map = dict(zip(users.tolist(), range(len(users))))
    iid_map = dict(zip(items.tolist(), range(len(items))))
    uir = (u_idx.astype(np.int64), i_idx.astype(np.int64), train["rating"].to_numpy(dtype=np.float32))
    return Dataset(len(users), len(items), uid_map, iid_map, uir, seed=seed), users, items


def predict(model, users: np.ndarray, items: np.ndarray, test) -> np.ndarray:
    """Vectorised MF scores: mean + biases + dot product; an unknown user or item keeps what is known."""
    u = index_of(test["user"].to_numpy(), users)
    i = index_of(test["item"].to_numpy(), items)
    pred = np.full(len(test), float(model.global_mean), dtype=np.float64)
    ku, ki = u >= 0, i >= 0
    pred[ku] += model.u_biases[u[ku]]
    pred[ki] += model.i_biases[i[ki]]
    both = ku & ki
    pred[both] += np.einsum("nk,nk->n", model.u_factors[u[both]], model.i_factors[i[both]])
    return pred


def main() -> None:
    args = arg_parser(__doc__.splitlines()[0]).parse_args()
    import cornac
    from cornac.models import MF

    train, test = read_ratings(args.train), read_ratings(args.test)
    with Stopwatch() as prep:
        data, users, items = build_dataset(train, args.seed)
    rng = np.random.default_rng(args.seed)
    init = {"U": rng.normal(0.0, 0.01, (len(users), K)).astype(np.float32),
            "V": rng.normal(0.0, 0.01, (len(items), K)).astype(np.float32)}
    threads = args.threads or multiprocessing.cpu_count()
    model = MF(k=K, max_iter=EPOCHS, learning_rate=LR, lambda_reg=LAMBDA, use_bias=True, backend="cpu",
               num_threads=threads, init_params=init, seed=None)
    with Stopwatch() as fit:
        model.fit(data)
    emit({"name": "Cornac MF", "version": cornac.__version__, "test_rmse": rmse(predict(model, users, items, test),
          test["rating"].to_numpy()), "fit_seconds": fit.seconds, "prep_seconds": prep.seconds,
          "threads": model.num_threads, "settings": f"k={K}, {EPOCHS} epochs, lr {LR}, lambda {LAMBDA}, biases"})


if __name__ == "__main__":
    main()
