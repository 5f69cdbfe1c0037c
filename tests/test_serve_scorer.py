"""The scorer against a direct float64 implementation of the artifact spec's prediction rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsys_flowadam.artifact import load_artifact
from recsys_flowadam.serve.scorer import Scorer, UnknownIDError
from recsys_flowadam.serve.synthetic import random_artifact


def seen(art) -> tuple[np.ndarray, np.ndarray]:
    """Which users / items have training ratings (the others are served as cold)."""
    indptr, items = art.tensors["train_indptr"], art.tensors["train_items"]
    seen_items = np.zeros(art.meta.n_items, dtype=bool)
    seen_items[items] = True
    return np.diff(indptr) > 0, seen_items


def reference_scores(art) -> np.ndarray:
    """Full (n_users, n_items) matrix of unclipped predictions, straight from the spec: the
    model's rule where user and item have training ratings, global mean + known biases otherwise."""
    t, m = art.tensors, art.meta
    U = t["user_factors"].astype(np.float64)
    V = t["item_factors"].astype(np.float64)
    if m.model_type == "cp":
        V = V * t["context_factors"].astype(np.float64).mean(axis=0)
    bu = t["user_bias"].astype(np.float64) if "user_bias" in t else np.zeros(m.n_users)
    bi = t["item_bias"].astype(np.float64) if "item_bias" in t else np.zeros(m.n_items)
    warm = m.prediction_offset + U @ V.T + bu[:, None] + bi[None, :]
    su, si = seen(art)
    cold = m.global_mean + np.where(su, bu, 0)[:, None] + np.where(si, bi, 0)[None, :]
    return np.where(su[:, None] & si[None, :], warm, cold)


@pytest.fixture(scope="module", params=["mf", "biased-mf", "cp"])
def art(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "model"
    return load_artifact(random_artifact(path, n_users=40, n_items=70, rank=6, model_type=request.param, seed=3,
                                         factor_std=1.0, cold_users=3, cold_items=5))


def test_predictions_equal_reference(art) -> None:
    scorer = Scorer(art)
    ref = reference_scores(art)
    rng = np.random.default_rng(0)
    u = rng.integers(0, art.meta.n_users, 500)
    i = rng.integers(0, art.meta.n_items, 500)
    users = [art.meta.user_ids[k] for k in u]
    items = [art.meta.item_ids[k] for k in i]
    raw = scorer.predict(users, items, clip=False)
    np.testing.assert_allclose(raw.ratings, ref[u, i], rtol=0, atol=1e-5)
    su, si = seen(art)
    assert (raw.known_user == su[u]).all() and (raw.known_item == si[i]).all()
    assert not raw.known_user.all() and not raw.known_item.all(), "cold users/items are exercised"
    clipped = scorer.predict(users, items)
    np.testing.assert_allclose(clipped.ratings, np.clip(ref[u, i], 1.0, 5.0), atol=1e-5)
    assert clipped.ratings.min() >= 1.0 and clipped.ratings.max() <= 5.0
    # the random factors produce out-of-scale raw scores, so clipping is really exercised
    assert (raw.ratings > 5.0).any() or (raw.ratings < 1.0).any()


def test_cold_start(art) -> None:
    scorer = Scorer(art)
    t, m = art.tensors, art.meta
    bu = t["user_bias"].astype(np.float64) if "user_bias" in t else np.zeros(m.n_users)
    bi = t["item_bias"].astype(np.float64) if "item_bias" in t else np.zeros(m.n_items)
    # u39 and i69 are listed but have no training ratings: served like unlisted IDs
    users = ["u3", "nobody", "nobody", "u39", "u39", "u3", "u0"]
    items = ["nothing", "i5", "nothing", "i5", "i69", "i69", "i1"]
    pred = scorer.predict(users, items, clip=False)
    gm = m.global_mean
    expected_cold = [gm + bu[3], gm + bi[5], gm, gm + bi[5], gm, gm + bu[3]]
    np.testing.assert_allclose(pred.ratings[:6], expected_cold, atol=1e-5)
    assert pred.known_user.tolist() == [True, False, False, False, False, True, True]
    assert pred.known_item.tolist() == [False, True, False, True, False, False, True]
    np.testing.assert_allclose(pred.ratings[6], reference_scores(art)[0, 1], atol=1e-5)


def assert_is_top_k(scores: np.ndarray, ids: np.ndarray, candidates: set[int], k: int) -> None:
    """ids are k distinct candidates, best first, and none left out scores higher (ties allowed)."""
    ids = ids.tolist()
    assert len(ids) == len(set(ids)) == min(k, len(candidates)) and set(ids) <= candidates
    chosen = scores[ids]
    assert (np.diff(chosen) <= 1e-6).all(), "best first"
    rest = [j for j in candidates if j not in set(ids)]
    if rest:
        assert chosen.min() >= scores[rest].max() - 1e-6


def test_recommend_matches_brute_force(art) -> None:
    scorer = Scorer(art)
    ref = reference_scores(art)
    indptr, train_items = art.tensors["train_indptr"], art.tensors["train_items"]
    everything = set(range(art.meta.n_items))
    for u in (0, 7, 39):  # u39 has no training ratings: the cold ranking (mean + item bias)
        rated = set(train_items[indptr[u] : indptr[u + 1]].tolist())
        ids, ratings = scorer.recommend(f"u{u}", 10)
        assert_is_top_k(ref[u], ids, everything - rated, 10)
        np.testing.assert_allclose(ratings, np.clip(ref[u, ids], 1, 5), atol=1e-5)
        with_rated, _ = scorer.recommend(f"u{u}", 10, exclude_rated=False)
        assert_is_top_k(ref[u], with_rated, everything, 10)
    # a warm user's scores have no ties: the order is the exhaustive ranking's exactly
    ids, _ = scorer.recommend("u7", 10)
    rated = set(train_items[indptr[7] : indptr[8]].tolist())
    assert ids.tolist() == [i for i in np.argsort(-ref[7], kind="stable") if i not in rated][:10]


def test_recommend_k_larger_than_catalogue(art) -> None:
    scorer = Scorer(art)
    n_rated = int(np.diff(art.tensors["train_indptr"])[2])
    ids, ratings = scorer.recommend("u2", 1000)
    assert len(ids) == art.meta.n_items - n_rated == len(set(ids.tolist()))
    np.testing.assert_allclose(ratings, np.clip(reference_scores(art)[2, ids], 1, 5), atol=1e-5)
    ids, _ = scorer.recommend("u2", 1000, exclude_rated=False)
    assert sorted(ids.tolist()) == list(range(art.meta.n_items))


def test_similar_matches_brute_force_cosine(art) -> None:
    scorer = Scorer(art)
    t = art.tensors
    V = t["item_factors"].astype(np.float64)
    if art.meta.model_type == "cp":
        V = V * t["context_factors"].astype(np.float64).mean(axis=0)
    unit = V / np.linalg.norm(V, axis=1, keepdims=True)
    cos = unit @ unit.T
    _, si = seen(art)
    for i in (0, 33, 64):
        ids, sims = scorer.similar(f"i{i}", 5)
        expected = [j for j in np.argsort(-cos[i], kind="stable") if j != i and si[j]][:5]
        assert ids.tolist() == expected
        np.testing.assert_allclose(sims, cos[i, expected], atol=1e-5)
    ids, _ = scorer.similar("i0", 1000)
    assert sorted(ids.tolist()) == [j for j in range(1, art.meta.n_items) if si[j]]
    with pytest.raises(UnknownIDError, match="item 'i69' has no training ratings"):
        scorer.similar("i69")


def test_unknown_ids_raise(art) -> None:
    scorer = Scorer(art)
    with pytest.raises(UnknownIDError, match="unknown user 'ghost'"):
        scorer.recommend("ghost")
    with pytest.raises(UnknownIDError, match="unknown item 'ghost'"):
        scorer.similar("ghost")


def test_user_who_rated_everything(tmp_path: Path) -> None:
    path = random_artifact(tmp_path / "m", n_users=3, n_items=4, rank=2, ratings_per_user=4)
    scorer = Scorer(load_artifact(path))
    ids, ratings = scorer.recommend("u1", 10)
    assert ids.size == 0 and ratings.size == 0


def test_agrees_with_the_trainers_evaluation(art) -> None:
    """The service and `recsys-flowadam evaluate` apply one prediction rule (cold start included)."""
    pipeline = pytest.importorskip("recsys_flowadam.train.pipeline")
    torch = pytest.importorskip("torch")
    predictor = pipeline.predictor_from_artifact(art, torch.device("cpu"))
    rng = np.random.default_rng(1)
    u = rng.integers(-1, art.meta.n_users, 2000)  # index -1 = not listed (cold)
    i = rng.integers(-1, art.meta.n_items, 2000)
    theirs, cold = predictor.predict(torch.from_numpy(u), torch.from_numpy(i))
    ours = Scorer(art).predict_indices(u, i)
    np.testing.assert_allclose(ours.ratings, theirs.double().numpy(), atol=1e-5)
    assert (cold.numpy() == ~(ours.known_user & ours.known_item)).all() and cold.any() and not cold.all()


def test_a_lazy_scorer_builds_the_training_matrix_once_on_first_use(art) -> None:
    import threading

    eager, lazy = Scorer(art), Scorer(art, lazy=True)
    assert eager._train is not None and lazy._train is None
    user = art.meta.user_ids[0]
    ids, ratings = lazy.recommend(user, k=5)
    want_ids, want_ratings = eager.recommend(user, k=5)
    assert np.array_equal(ids, want_ids) and np.array_equal(ratings, want_ratings)
    assert lazy._train is not None and (lazy.train != eager.train).nnz == 0
    fresh, built = Scorer(art, lazy=True), []
    threads = [threading.Thread(target=lambda: built.append(fresh.train)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 8 and all(b is built[0] for b in built)  # made once, whoever asked first



def test_a_scorer_copies_and_pickles_with_its_lazy_matrix(art) -> None:
    import copy
    import pickle

    lazy = Scorer(art, lazy=True)
    for other in (copy.deepcopy(lazy), pickle.loads(pickle.dumps(lazy))):
        user = art.meta.user_ids[0]
        assert np.array_equal(other.recommend(user, k=5)[0], lazy.recommend(user, k=5)[0])
