"""LensKit biased ALS (``lenskit.als.BiasedMFScorer``) on the bench's train/test files; prints one JSON line.

Settings are the issue's: 20 features, 10 epochs; everything else LensKit's defaults (regularisation
0.1, bias damping 5). The LensKit Dataset is built before the clock starts; ``train`` (bias model,
rating matrices, the ALS epochs) is the fit time. Predictions are scored in one vectorised pass from
the learned biases and embeddings (what the scorer computes user by user).
"""

from __future__ import annotations

import numpy as np

from peer_io import Stopwatch, arg_parser, emit, read_ratings, rmse

FEATURES, EPOCHS = 20, 10


def predict(scorer, test) -> np.ndarray:
    """Global + user + item bias + embedding dot product; unknown users or items keep what is known."""
    u = scorer.users.numbers(test["user"].to_numpy(), missing="negative")
    i = scorer.items.numbers(test["item"].to_numpy(), missing="negative")
    bias = scorer.bias
    pred = np.full(len(test), float(bias.global_bias), dtype=np.float64)
    ku, ki = u >= 0, i >= 0
    if bias.user_biases is not None:
        pred[ku] += bias.user_biases[u[ku]]
    if bias.item_biases is not None:
        pred[ki] += bias.item_biases[i[ki]]
    both = ku & ki
    pred[both] += np.einsum("nk,nk->n", scorer.user_embeddings[u[both]], scorer.item_embeddings[i[both]])
    return pred


def main() -> None:
    args = arg_parser(__doc__.splitlines()[0]).parse_args()
    import lenskit
    from lenskit.als import BiasedMFScorer
    from lenskit.data import from_interactions_df
    from lenskit.parallel import get_parallel_config, initialize
    from lenskit.training import TrainingOptions

    if args.threads:
        initialize(threads=args.threads)
    train, test = read_ratings(args.train), read_ratings(args.test)
    with Stopwatch() as prep:
        data = from_interactions_df(train, user_col="user", item_col="item", rating_col="rating")
    scorer = BiasedMFScorer(embedding_size=FEATURES, epochs=EPOCHS)
    with Stopwatch() as fit:
        scorer.train(data, TrainingOptions(rng=args.seed))
    emit({"name": "LensKit biased ALS", "version": lenskit.__version__,
          "test_rmse": rmse(predict(scorer, test), test["rating"].to_numpy()), "fit_seconds": fit.seconds,
          "prep_seconds": prep.seconds, "threads": get_parallel_config().threads,
          "settings": f"{FEATURES} features, {EPOCHS} epochs, LensKit defaults"})


if __name__ == "__main__":
    main()
