"""The trainer on small synthetic problems: it learns, is reproducible, stops early,
restores the best parameters, counts gradient evaluations, resumes exactly, fails loudly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys_flowadam.data.ratings import Ratings, RatingScale
from recsys_flowadam.train import (
    CheckpointError,
    NonFiniteLossError,
    TrainConfig,
    evaluate_predictor,
    train_model,
)



pytestmark = pytest.mark.usefixtures("one_thread")


def low_rank_split(n_users=120, n_items=80, rank=3, density=0.35, noise=0.1, seed=0, offset=3.0,
                   n_contexts=0):
    """(train, val, test) Ratings of one noisy low-rank matrix (or tensor), 70/10/20."""
    rng = np.random.default_rng(seed)
    U = rng.normal(size=(n_users, rank)) / np.sqrt(rank)
    V = rng.normal(size=(n_items, rank)) / np.sqrt(rank)
    shape = (n_users, n_items) + ((n_contexts,) if n_contexts else ())
    mask = rng.random(shape) < density
    idx = np.nonzero(mask)
    if n_contexts:
        W = rng.normal(size=(n_contexts, rank)) + 1.0
        truth = np.einsum("ir,jr,kr->ijk", U, V, W)
    else:
        truth = U @ V.T
    values = truth[idx] + offset + noise * rng.normal(size=idx[0].shape[0])
    n = values.shape[0]
    perm = rng.permutation(n)
    a, b = int(0.7 * n), int(0.8 * n)
    ids_u = np.array([f"u{k}" for k in range(n_users)], dtype=object)
    ids_i = np.array([f"i{k}" for k in range(n_items)], dtype=object)

    def part(sel, name):
        return Ratings(name, idx[0][sel], idx[1][sel], values[sel].astype(np.float32), ids_u, ids_i,
                       RatingScale(-10.0, 10.0), contexts=idx[2][sel] if n_contexts else None,
                       n_contexts=n_contexts)

    return part(perm[:a], "train"), part(perm[a:b], "val"), part(perm[b:], "test")


@pytest.fixture(scope="module")
def data():
    return low_rank_split()


def _val_rmse(result, val):
    m = evaluate_predictor(result.predictor, torch.from_numpy(val.users), torch.from_numpy(val.items),
                           torch.from_numpy(val.values).double())
    return m["rmse"]


def _baseline_rmse(train, ratings):
    return float(np.sqrt(np.mean((ratings.values - train.mean) ** 2)))


@pytest.mark.parametrize("optimizer", ["adam", "flowadam"])
def test_full_batch_learns_low_rank_structure(data, optimizer):
    train, val, test = data
    cfg = TrainConfig(model="biased-mf", rank=3, reg=1e-4, lr=0.03, optimizer=optimizer, steps=300,
                      eval_every=10, patience=5)
    res = train_model(train, val, cfg)
    base = _baseline_rmse(train, val)
    assert res.best_val_rmse < 0.6 * base
    assert res.representation == "dense"
    # the returned parameters are the best ones: their val RMSE is the recorded best
    assert _val_rmse(res, val) == pytest.approx(res.best_val_rmse, rel=1e-9)
    assert res.grad_evals >= res.steps
    assert [h["step"] for h in res.history] == list(range(10, res.steps + 1, 10))


def test_sparse_and_dense_representations_train_identically(data):
    train, val, _ = data
    runs = [train_model(train, val, TrainConfig(model="mf", rank=3, lr=0.02, optimizer="adam", steps=40,
                                                representation=rep, dtype="float64", patience=0))
            for rep in ("dense", "sparse")]
    assert runs[1].representation == "sparse"
    for name in runs[0].params:
        torch.testing.assert_close(runs[0].params[name], runs[1].params[name], rtol=1e-8, atol=1e-10)


def test_minibatch_reshuffles_and_learns(data):
    train, val, _ = data
    cfg = TrainConfig(model="biased-mf", rank=3, reg=1e-4, lr=0.02, optimizer="adam", batch_size=256,
                      epochs=30, eval_every=20, patience=0)
    res = train_model(train, val, cfg)
    n_batches = math.ceil(len(train) / 256)
    assert res.representation == "minibatch"
    assert res.steps == 30 * n_batches and res.epochs == pytest.approx(30.0)
    assert res.best_val_rmse < 0.7 * _baseline_rmse(train, val)
    again = train_model(train, val, cfg)
    other_seed = train_model(train, val, TrainConfig(**{**cfg.to_dict(), "seed": 1}))
    assert torch.equal(res.params["user_factors"], again.params["user_factors"])
    assert not torch.equal(res.params["user_factors"], other_seed.params["user_factors"])


def test_same_seed_same_result_and_seed_matters(data):
    train, val, _ = data
    cfg = TrainConfig(model="mf", rank=3, lr=0.02, optimizer="flowadam", steps=30, patience=0)
    a, b = train_model(train, val, cfg), train_model(train, val, cfg)
    c = train_model(train, val, TrainConfig(**{**cfg.to_dict(), "seed": 7}))
    assert a.history == [{**h, "seconds": a.history[i]["seconds"]} for i, h in enumerate(b.history)]
    assert torch.equal(a.params["item_factors"], b.params["item_factors"])
    assert not torch.equal(a.params["item_factors"], c.params["item_factors"])


def test_early_stopping_restores_best_parameters(data):
    train, val, _ = data
    # rank far above the truth, no regularisation, large lr: validation error turns up
    cfg = TrainConfig(model="biased-mf", rank=40, reg=0.0, lr=0.05, optimizer="adam", steps=2000,
                      eval_every=5, patience=4)
    res = train_model(train, val, cfg)
    assert res.stopped == "early_stop"
    assert res.steps == res.best_step + 4 * 5
    vals = [h["val_rmse"] for h in res.history]
    assert min(vals) == res.best_val_rmse and vals[-1] > res.best_val_rmse
    assert _val_rmse(res, val) == pytest.approx(res.best_val_rmse, rel=1e-9)


def test_lbfgs_grad_evals_are_counted(data):
    train, val, _ = data
    res = train_model(train, val, TrainConfig(model="mf", rank=3, optimizer="lbfgs", lr=0.5, steps=5,
                                              patience=0, eval_every=1))
    assert res.steps == 5 and res.grad_evals > 5  # L-BFGS calls the closure up to max_iter times per step


def test_non_finite_loss_names_the_step(data, tmp_path):
    train, val, _ = data
    cfg = TrainConfig(model="mf", rank=3, optimizer="sgd", lr=1e4, steps=200, checkpoint_every=1,
                      patience=0)
    ckpt = tmp_path / "ckpt.safetensors"
    with pytest.raises(NonFiniteLossError, match=r"not finite .* at step \d+") as info:
        train_model(train, val, cfg, checkpoint_path=ckpt)
    assert info.value.step >= 2
    assert "last good checkpoint" in str(info.value) or "no checkpoint" in str(info.value)
    if ckpt.exists():  # whatever was kept holds finite numbers
        from recsys_flowadam.train import load_checkpoint

        tensors, state = load_checkpoint(ckpt)
        assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("param."))
        assert state["loop"]["step"] < info.value.step


@pytest.mark.parametrize("optimizer,batch", [("flowadam", None), ("adam", 300)])
def test_resume_from_checkpoint_equals_uninterrupted_run(data, tmp_path, optimizer, batch):
    train, val, _ = data
    cfg = TrainConfig(model="biased-mf", rank=3, reg=1e-4, lr=0.02, optimizer=optimizer, steps=60,
                      batch_size=batch, eval_every=7, patience=0, checkpoint_every=25)
    full = train_model(train, val, cfg)
    ckpt = tmp_path / "c.safetensors"

    class Stop(Exception):
        pass

    def stop_at_37(step):
        if step == 37:
            raise Stop

    with pytest.raises(Stop):
        train_model(train, val, cfg, checkpoint_path=ckpt, on_step=stop_at_37)
    resumed = train_model(train, val, cfg, checkpoint_path=ckpt, resume=True)
    assert resumed.resumed_from == 25
    assert resumed.grad_evals == full.grad_evals and resumed.steps == full.steps
    for name in full.params:
        assert torch.equal(resumed.params[name], full.params[name]), name
    strip = lambda hist: [{k: v for k, v in h.items() if k != "seconds"} for h in hist]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)
    assert resumed.diagnostics == full.diagnostics


def test_resume_refuses_a_different_run(data, tmp_path):
    train, val, _ = data
    cfg = TrainConfig(model="mf", rank=3, optimizer="adam", steps=10, checkpoint_every=5, patience=0)
    ckpt = tmp_path / "c.safetensors"
    train_model(train, val, cfg, checkpoint_path=ckpt)
    with pytest.raises(CheckpointError, match="rank"):
        train_model(train, val, TrainConfig(**{**cfg.to_dict(), "rank": 4}), checkpoint_path=ckpt, resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train_model(train, val, cfg, checkpoint_path=tmp_path / "missing", resume=True)


def test_cp_tensor_model_trains_on_contexts():
    train, val, _ = low_rank_split(n_users=40, n_items=30, n_contexts=4, density=0.3, rank=2)
    res = train_model(train, val, TrainConfig(model="cp", rank=2, lr=0.03, optimizer="adam", steps=300,
                                              center=True, patience=5))
    assert set(res.params) == {"user_factors", "item_factors", "context_factors"}
    assert res.best_val_rmse < 0.7 * _baseline_rmse(train, val)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="rank"):
        TrainConfig(rank=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(representation="minibatch")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("representation,batch", [("dense", None), ("sparse", None), ("auto", 256)])
def test_cuda_training_matches_cpu(data, representation, batch):
    train, val, _ = data
    cfg = dict(model="biased-mf", rank=3, reg=1e-4, lr=0.02, optimizer="adam", steps=40, patience=0,
               dtype="float64", representation=representation, batch_size=batch)
    cpu = train_model(train, val, TrainConfig(**cfg, device="cpu"))
    gpu = train_model(train, val, TrainConfig(**cfg, device="cuda"))
    assert gpu.device.startswith("cuda") and gpu.params["user_factors"].device.type == "cuda"
    assert gpu.best_val_rmse == pytest.approx(cpu.best_val_rmse, rel=1e-6)
    for name in cpu.params:
        torch.testing.assert_close(gpu.params[name].cpu(), cpu.params[name], rtol=1e-5, atol=1e-7)
