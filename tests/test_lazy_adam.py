"""lazy-adam: the fused row-sparse step against an autograd + torch reference, its batches, the
trainer's use of it (resume included) and its refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys_flowadam.data.ratings import Ratings, RatingScale
from recsys_flowadam.models import ModelSpec, Objective, init_params
from recsys_flowadam.models.coords import Coords
from recsys_flowadam.models.row_sparse import LazyAdamStep, SlottedRatings, unsupported_reason
from recsys_flowadam.optim import make_optimizer
from recsys_flowadam.optim.lazy_adam import LazyAdam
from recsys_flowadam.train.batches import Batch, SlottedMiniBatches
from recsys_flowadam.train.config import TrainConfig
from recsys_flowadam.train.trainer import train_model

pytest.importorskip("numba")


def _coords(n_users=40, n_items=25, n=600, seed=0, dtype=torch.float64, crowd=True) -> Coords:
    rng = np.random.default_rng(seed)
    pairs = rng.choice(n_users * n_items, n, replace=False)
    users, items = pairs // n_items, pairs % n_items
    if crowd:
        users[:5] = 0  # a user with several ratings in most batches
    values = rng.integers(1, 6, n).astype(np.float64)
    return Coords(torch.from_numpy(users), torch.from_numpy(items), torch.from_numpy(values).to(dtype))


def _objective(coords: Coords, spec: ModelSpec, weighting: str, loss: str, dtype) -> Objective:
    if weighting == "uniform":
        weights = None
    else:
        weights = {"user": torch.bincount(coords.users, minlength=spec.n_users).to(dtype) / len(coords),
                   "item": torch.bincount(coords.items, minlength=spec.n_items).to(dtype) / len(coords)}
    return Objective(reg=0.05, bias_reg=0.02, offset=3.0, weights=weights, loss=loss, huber_delta=0.7)


def _reference_step(params, moments, batch: Coords, obj: Objective, coef, t, lr, betas=(0.9, 0.999), eps=1e-8):
    """Autograd gradient of the batch mean of each rating's objective, then Adam on the touched rows."""
    leaves = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    U, V = leaves["user_factors"], leaves["item_factors"]
    u, i = batch.users, batch.items
    pred = obj.offset + (U[u] * V[i]).sum(1)
    if "user_bias" in leaves:
        pred = pred + leaves["user_bias"][u] + leaves["item_bias"][i]
    r = pred - batch.values
    rho = r**2 if obj.loss == "mse" else torch.where(r.abs() <= obj.huber_delta, r**2,
                                                     2 * obj.huber_delta * r.abs() - obj.huber_delta**2)
    cu, ci = coef["user"][u], coef["item"][i]
    pen = obj.reg * (cu * (U[u] ** 2).sum(1) + ci * (V[i] ** 2).sum(1))
    if "user_bias" in leaves:
        pen = pen + obj.bias_reg * (cu * leaves["user_bias"][u] ** 2 + ci * leaves["item_bias"][i] ** 2)
    loss = (rho + pen).mean()
    loss.backward()
    b1, b2 = betas
    for name, p in params.items():
        rows = torch.unique(u if name.startswith("user") else i)
        g = leaves[name].grad[rows]
        m, v = moments[name]
        m[rows] = b1 * m[rows] + (1 - b1) * g
        v[rows] = b2 * v[rows] + (1 - b2) * g * g
        denom = v[rows].sqrt() / math.sqrt(1 - b2**t) + eps
        p[rows] -= lr / (1 - b1**t) * m[rows] / denom
    return float(loss.detach())


@pytest.mark.parametrize("model", ["biased-mf", "mf"])
@pytest.mark.parametrize("weighting,loss", [("frequency", "mse"), ("uniform", "huber")])
def test_fused_step_matches_autograd_and_lazy_adam(model, weighting, loss):
    dtype = torch.float64
    coords = _coords(n_users=200, dtype=dtype)
    spec = ModelSpec(model, 200, 25, 4)
    obj = _objective(coords, spec, weighting, loss, dtype)
    params = init_params(spec, init_std=0.3, generator=torch.Generator().manual_seed(1), dtype=dtype)
    reference = {k: p.detach().clone() for k, p in params.items()}
    ref_moments = {k: (torch.zeros_like(p), torch.zeros_like(p)) for k, p in params.items()}
    opt = LazyAdam(params.values(), lr=0.05)
    slotted = SlottedRatings(coords, 150, torch.randperm(len(coords), generator=torch.Generator().manual_seed(3)),
                             (spec.n_users, spec.n_items), dtype)
    step = LazyAdamStep(slotted, params, obj, opt, coords)
    counts_u = torch.bincount(coords.users, minlength=200).double()
    counts_i = torch.bincount(coords.items, minlength=25).double()
    share_u, share_i = counts_u / len(coords), counts_i / len(coords)
    wu = share_u if weighting == "frequency" else torch.ones(200, dtype=dtype)
    wi = share_i if weighting == "frequency" else torch.ones(25, dtype=dtype)
    coef = {"user": torch.where(counts_u > 0, wu / share_u.clamp_min(1e-300), 0.0),
            "item": torch.where(counts_i > 0, wi / share_i.clamp_min(1e-300), 0.0)}
    for t, index in enumerate([2, 0, 3, 0], start=1):
        lo, hi = int(slotted.starts[index]), int(slotted.starts[index + 1])
        batch = Coords(torch.from_numpy(slotted.users[lo:hi]), torch.from_numpy(slotted.items[lo:hi]),
                       torch.from_numpy(slotted.values[lo:hi]))
        step.batch = Batch(None, 1.0, index)
        loss = float(opt.step(step))
        ref_loss = _reference_step(reference, ref_moments, batch, obj, coef, t, lr=0.05)
        assert loss == pytest.approx(ref_loss, rel=1e-10)
        for name, p in params.items():
            assert torch.allclose(p, reference[name], rtol=1e-10, atol=1e-12), (name, t)
            m, v = opt.moments(p)
            assert torch.allclose(m, ref_moments[name][0], rtol=1e-10, atol=1e-14), name
    # rows the batches never touched kept their initial values and zero moments
    touched_users = set(slotted.users[slotted.starts[0]:slotted.starts[1]]) | set(
        slotted.users[slotted.starts[2]:slotted.starts[4]])
    untouched = [u for u in range(200) if u not in touched_users]
    assert untouched and torch.equal(opt.moments(params["user_factors"])[0][untouched],
                                     torch.zeros(len(untouched), 4, dtype=dtype))


@pytest.mark.parametrize("threads", [1, 2])
def test_slotted_batches_cover_every_rating_once_grouped_by_user(threads, monkeypatch):
    from recsys_flowadam import kernel_pool

    coords = _coords(n=601, crowd=False)  # distinct (user, item) pairs: each names one rating
    perm = torch.randperm(601, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(kernel_pool, "KERNEL_THREADS", 1)
    one = SlottedRatings(coords, 100, perm, (40, 25), torch.float32)
    monkeypatch.setattr(kernel_pool, "KERNEL_THREADS", threads)  # halves of the batches laid out at once
    s = SlottedRatings(coords, 100, perm, (40, 25), torch.float32)
    assert all(np.array_equal(getattr(s, a), getattr(one, a)) for a in ("users", "items", "values", "starts"))
    assert s.n_batches == 7 and [s.batch_size(b) for b in range(7)] == [100] * 6 + [1]
    seen = sorted(zip(s.users.tolist(), s.items.tolist()))
    assert seen == sorted(zip(coords.users.tolist(), coords.items.tolist()))
    for b in range(s.n_batches):
        users = s.users[s.starts[b]:s.starts[b + 1]]
        assert np.all(np.diff(users) >= 0)  # grouped by user
        # batch b holds the ratings the permutation put in positions b*100 .. b*100+99
        expected = sorted(perm[b * 100:(b + 1) * 100].tolist())
        got = sorted(int(np.flatnonzero((coords.users.numpy() == u) & (coords.items.numpy() == i))[0])
                     for u, i in zip(users, s.items[s.starts[b]:s.starts[b + 1]]))
        assert got == expected


def _ratings(n_users=120, n_items=80, n=5000, seed=0):
    rng = np.random.default_rng(seed)
    pairs = rng.choice(n_users * n_items, n, replace=False)
    u, i = pairs // n_items, pairs % n_items
    P, Q = rng.normal(size=(n_users, 3)), rng.normal(size=(n_items, 3))
    values = np.clip(np.round(3 + 0.5 * (P[u] * Q[i]).sum(1) + rng.normal(0, 0.5, n)), 1, 5).astype(np.float32)
    r = Ratings(users=u, items=i, values=values, user_ids=np.arange(n_users).astype(str).astype(object),
                item_ids=np.arange(n_items).astype(str).astype(object), scale=RatingScale(1.0, 5.0), name="t")
    cut = int(0.8 * n)
    return r.subset(np.arange(cut)), r.subset(np.arange(cut, n))


def test_trainer_runs_lazy_adam_and_learns():
    """(Resuming from a checkpoint: tests/test_train_trainer.py's resume test, for every optimizer.)"""
    train, val = _ratings()
    cfg = TrainConfig(model="biased-mf", rank=3, optimizer="lazy-adam", lr=0.02, reg=0.05, batch_size=300,
                      epochs=12, eval_every=7, patience=0)
    full = train_model(train, val, cfg)
    baseline = float(np.sqrt(np.mean((val.values - train.values.mean()) ** 2)))
    assert full.representation == "minibatch" and full.grad_evals == full.steps == 12 * 14
    assert full.best_val_rmse < 0.8 * baseline
    again = train_model(train, val, cfg)  # the same seed: the same run, bit for bit
    assert all(torch.equal(again.params[k], full.params[k]) for k in full.params)


def test_lazy_adam_without_batch_size_picks_its_batches_by_size(monkeypatch):
    from recsys_flowadam.models import path_choice

    train, val = _ratings()
    cfg = TrainConfig(model="mf", rank=2, optimizer="lazy-adam", lr=0.02, reg=0.05, steps=5, patience=0)
    res = train_model(train, val, cfg)  # small data: 80 batches a pass at the configured rate, no schedule
    choice = res.path_choice
    assert res.representation == "minibatch" and "lazy-adam steps on mini-batches" in choice["reason"]
    assert choice["batch_size"] == round(len(train) / path_choice.SMALL_BATCHES_PER_EPOCH)
    assert choice["lr_half_life_steps"] is None and choice["eval_every"] == 40
    monkeypatch.setattr(path_choice, "MINIBATCH_MIN_RATINGS", 1000)  # counted as large: the automatic schedule
    big = train_model(train, val, cfg).path_choice
    assert big["lr_half_life_steps"] is not None and big["batch_size"] == len(train)  # MIN_AUTO_BATCH > n
    with pytest.raises(ValueError, match="lazy-adam steps on mini-batches, not on representation 'sparse': drop"):
        train_model(train, val, TrainConfig(**{**cfg.to_dict(), "representation": "sparse"}))


def test_lazy_adam_runs_on_the_cpu_under_device_auto_where_cuda_is(monkeypatch):
    train, val = _ratings()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = TrainConfig(model="biased-mf", rank=2, optimizer="lazy-adam", reg=0.05, steps=3, batch_size=500)
    assert train_model(train, val, cfg).device == "cpu"


def test_layout_refuses_an_index_outside_the_tables():
    coords = _coords(n=50)
    with pytest.raises(IndexError, match="item index"):
        SlottedRatings(coords, 10, torch.randperm(50), (40, 3), torch.float64)
    with pytest.raises(IndexError, match="user index"):
        SlottedRatings(coords, 10, torch.randperm(50), (2, 25), torch.float64)


def test_lazy_adam_refuses_what_its_fused_step_cannot_train():
    train, val = _ratings()
    with pytest.raises(ValueError, match="lazy-adam cannot train this run: it trains mf and biased-mf only"):
        train_model(train, val, TrainConfig(model="svdpp", rank=2, optimizer="lazy-adam", reg=0.05, steps=2,
                                            batch_size=100))
    params = init_params(ModelSpec("biased-mf", 3, 3, 2), init_std=0.1, generator=torch.Generator().manual_seed(0))
    obj = Objective(reg=0.1)
    assert "CPU" in unsupported_reason(params, obj, torch.device("meta"), False)
    assert "one process" in unsupported_reason(params, obj, torch.device("cpu"), True)
    assert unsupported_reason(params, obj, torch.device("cpu"), False) is None
    # the optimizer alone, with a closure that only sets .grad: refused (it cannot know the touched rows)
    opt = make_optimizer("lazy-adam", list(params.values()), 0.01)
    with pytest.raises(RuntimeError, match="fused row-sparse"):
        opt.step(lambda: torch.zeros(()))
    with pytest.raises(ValueError, match="lr must be positive"):
        LazyAdam(list(params.values()), lr=0.0)


def test_slotted_source_epochs_visit_every_batch_in_a_new_order():
    from recsys_flowadam.train.loop_state import LoopState

    coords = _coords(n=600)
    source = SlottedMiniBatches(coords, 100, torch.Generator().manual_seed(5), (40, 25), torch.float64)
    state = LoopState()
    epochs = [[source.next(state).index for _ in range(6)] for _ in range(3)]
    assert all(sorted(e) == list(range(6)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1 and state.epoch == 3


@pytest.mark.parametrize("n, batch_size", [(10, 3), (1000, 3), (601, 100), (5, 5)])
def test_random_batch_labels_are_a_seeded_partition_and_lay_out_like_their_permutation(n, batch_size):
    from recsys_flowadam.train.batches import random_batch_labels

    labels = random_batch_labels(n, batch_size, torch.Generator().manual_seed(4))
    n_batches = -(-n // batch_size)
    sizes = np.bincount(labels, minlength=n_batches)  # 1000 / 3: 334 labels, two bytes each
    assert len(sizes) == n_batches and (sizes[:-1] == batch_size).all() and sizes[-1] == n - batch_size * (n_batches - 1)
    assert np.array_equal(labels, random_batch_labels(n, batch_size, torch.Generator().manual_seed(4)))
    if n > batch_size:
        assert not np.array_equal(labels, random_batch_labels(n, batch_size, torch.Generator().manual_seed(5)))
    # laid out from the labels = laid out from the permutation that lists each batch's ratings in order
    coords = _coords(n=n, crowd=True)
    perm = torch.from_numpy(np.argsort(labels, kind="stable"))
    by_labels = SlottedRatings(coords, batch_size, None, (40, 25), torch.float32, labels=labels)
    by_perm = SlottedRatings(coords, batch_size, perm, (40, 25), torch.float32)
    assert all(np.array_equal(getattr(by_labels, a), getattr(by_perm, a)) for a in ("users", "items", "values", "starts"))


def test_slotted_ratings_refuse_bad_cuts():
    coords = _coords(n=50, crowd=True)
    with pytest.raises(ValueError, match="exactly one"):
        SlottedRatings(coords, 10, None, (40, 25), torch.float32)
    with pytest.raises(ValueError, match="10 ratings in each batch"):
        SlottedRatings(coords, 10, None, (40, 25), torch.float32, labels=np.zeros(50, np.uint8))
    with pytest.raises(ValueError, match="a batch in 0..4"):
        SlottedRatings(coords, 10, None, (40, 25), torch.float32, labels=np.full(50, 7, np.uint8))


def test_random_batch_labels_put_each_rating_in_each_batch_about_equally_often():
    from recsys_flowadam.train.batches import random_batch_labels

    n, batch_size, runs = 40, 10, 2000
    hits = np.zeros((n, 4))
    gen = torch.Generator().manual_seed(0)
    for _ in range(runs):
        hits[np.arange(n), random_batch_labels(n, batch_size, gen)] += 1
    share = hits / runs  # 1/4 each; binomial sd 0.0097 per cell
    assert np.abs(share - 0.25).max() < 0.05
