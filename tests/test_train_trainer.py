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


def test_non_finite_loss_read_later_still_names_its_step(data):
    """Losses are read from the device at records and checkpoints only: a NaN found at the
    read after step 200 names the step it happened at, the same step a per-step read finds."""
    train, val, _ = data
    cfg = dict(model="mf", rank=3, optimizer="sgd", lr=1e4, steps=200, patience=0)
    with pytest.raises(NonFiniteLossError) as every_step:
        train_model(train, val, TrainConfig(**cfg, eval_every=1))
    with pytest.raises(NonFiniteLossError) as at_the_end:
        train_model(train, val, TrainConfig(**cfg, eval_every=1000))
    step = every_step.value.step
    assert 2 <= step < 200 and at_the_end.value.step == step
    assert f"at step {step} (found when the losses up to step 200 were read)" in str(at_the_end.value)
    assert "found when" not in str(every_step.value)  # read at its own step: nothing to add


def test_pending_losses_are_read_in_order_once():
    from recsys_flowadam.train.trainer import PendingLosses

    pending = PendingLosses(first_step=8, capacity=3)
    assert pending.read() == (8, [])
    values = [torch.tensor(0.1, dtype=torch.float32), torch.tensor(2.5, dtype=torch.float32)]
    assert [pending.add(v) for v in values] == [False, False]
    first, got = pending.read()
    assert first == 8 and got == [float(v) for v in values]  # float32 -> float64 exactly
    assert pending.add(1.0) is False and pending.add(float("nan")) is False and pending.add(3.0) is True
    first, got = pending.read()
    assert first == 10 and got[0] == 1.0 and math.isnan(got[1]) and got[2] == 3.0
    # floats and tensors mixed, in either order, keep the steps' order
    for mixed in ([0.5, torch.tensor(1.5), 2.5], [torch.tensor(0.25), 0.75], [4.0, 5.0]):
        first_before = pending.first_step
        for v in mixed:
            pending.add(v)
        assert pending.read() == (first_before, [float(v) for v in mixed])
    assert pending.read() == (20, [])


@pytest.mark.parametrize("batch", [None, 100])
def test_steps_do_not_read_the_device(data, monkeypatch, batch):
    """No host synchronisation per step: the tensor reads of a run (evaluations, the final
    record) do not grow with its number of steps."""
    train, val, _ = data
    reads = {"n": 0}
    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def reads_of(steps):
        reads["n"] = 0
        train_model(train, val, TrainConfig(model="biased-mf", rank=3, optimizer="sgd", lr=0.01, steps=steps,
                                            batch_size=batch, eval_every=1000, patience=0))
        return reads["n"]

    assert reads_of(10) == reads_of(40)


def test_auto_choice_takes_minibatches_for_large_data(data, monkeypatch):
    from recsys_flowadam.models import PathChoice, path_choice

    train, val, _ = data
    cfg = TrainConfig(model="biased-mf", rank=3, reg=1e-4, lr=0.02, optimizer="adam", epochs=20, eval_every=20,
                      patience=0)
    small = train_model(train, val, cfg)
    assert small.representation == "dense" and small.path_choice["batch_size"] is None
    assert "dense grid" in small.path_choice["reason"]
    # the same data counted as "large": mini-batches of about 1% of it. This problem's batches of
    # 30 lie far below the automatic path's (20k and up), where its small start and eps are tuned
    # (path_choice.auto_eps; tested in test_speed_path): the paper's start here
    monkeypatch.setattr(path_choice, "MINIBATCH_MIN_RATINGS", len(train))
    monkeypatch.setattr(path_choice, "MIN_AUTO_BATCH", 10)
    big = train_model(train, val, replace_cfg(cfg, init_std=0.1, optimizer_kwargs={"eps": 1e-8}))
    n_batches = math.ceil(len(train) / big.path_choice["batch_size"])
    assert big.representation == "minibatch" and big.path_choice["batch_size"] == round(
        len(train) / path_choice.BATCHES_PER_EPOCH)
    assert "mini-batches of" in big.path_choice["reason"] and big.steps == 20 * n_batches
    assert big.path_choice["lr_half_life_steps"] == round(path_choice.LR_HALF_LIFE_EPOCHS * n_batches)
    assert big.best_val_rmse < 0.7 * _baseline_rmse(train, val)
    # explicit settings override the choice, and say so
    given = train_model(train, val, replace_cfg(cfg, batch_size=500))
    assert PathChoice(**given.path_choice) == PathChoice("minibatch", 500, "--batch-size given")
    given = train_model(train, val, replace_cfg(cfg, representation="sparse"))
    assert PathChoice(**given.path_choice) == PathChoice("sparse", None, "--representation given")


def test_lr_decay_halves_smoothly_and_resumes_exactly(data, tmp_path, monkeypatch):
    from recsys_flowadam.models import path_choice
    from recsys_flowadam.train.trainer import LrDecay

    opt = torch.optim.Adam([torch.zeros(2, requires_grad=True)], lr=0.08)
    decay = LrDecay(opt, half_life=10)
    rates = []
    for done in (0, 5, 10, 30):
        decay.apply(done)
        rates.append(opt.param_groups[0]["lr"])
    assert rates == pytest.approx([0.08, 0.08 / math.sqrt(2), 0.04, 0.01])
    # the automatic mini-batch path decays the rate; a run resumed mid-way ends exactly alike
    train, val, _ = data
    monkeypatch.setattr(path_choice, "MINIBATCH_MIN_RATINGS", 1)
    monkeypatch.setattr(path_choice, "MIN_AUTO_BATCH", 10)
    cfg = TrainConfig(model="biased-mf", rank=3, reg=1e-4, lr=0.02, optimizer="adam", steps=60, eval_every=7,
                      patience=0, checkpoint_every=25)
    full = train_model(train, val, cfg)
    n_batches = math.ceil(len(train) / full.path_choice["batch_size"])
    assert full.path_choice["lr_half_life_steps"] == round(path_choice.LR_HALF_LIFE_EPOCHS * n_batches)
    assert full.path_choice["lr_scale"] == path_choice.AUTO_LR_SCALE

    class Stop(Exception):
        pass

    def stop_at_37(step):
        if step == 37:
            raise Stop

    ckpt = tmp_path / "c.safetensors"
    with pytest.raises(Stop):
        train_model(train, val, cfg, checkpoint_path=ckpt, on_step=stop_at_37)
    resumed = train_model(train, val, cfg, checkpoint_path=ckpt, resume=True)
    assert resumed.resumed_from == 25
    for name in full.params:
        assert torch.equal(resumed.params[name], full.params[name]), name


def test_refit_keeps_the_first_runs_path(data, monkeypatch):
    """train + val may cross the mini-batch threshold: the refit still takes the first run's path."""
    from recsys_flowadam.models import path_choice
    from recsys_flowadam.train.pipeline import fit_and_score

    train, val, _ = data
    monkeypatch.setattr(path_choice, "MINIBATCH_MIN_RATINGS", len(train) + 1)
    cfg = TrainConfig(model="biased-mf", rank=3, reg=1e-4, lr=0.02, optimizer="adam", steps=30, eval_every=10,
                      patience=0, refit=True)
    fit = fit_and_score(train, val, cfg)
    assert fit.metrics["n_train_refit"] == len(train) + len(val)
    assert fit.result.representation == "dense" and fit.result.path_choice["representation"] == "dense"


def replace_cfg(cfg: TrainConfig, **changes) -> TrainConfig:
    return TrainConfig(**{**cfg.to_dict(), **changes})


@pytest.mark.parametrize("optimizer,batch,halves", [("flowadam", None, False), ("adam", 300, False),
                                                    ("adam", 300, True), ("lazy-adam", 300, False)])
def test_resume_from_checkpoint_equals_uninterrupted_run(data, tmp_path, monkeypatch, optimizer, batch, halves):
    from recsys_flowadam import kernel_pool
    from recsys_flowadam.models import fused_cpu

    if halves:  # the CPU kernel's two halves of every batch, on two threads
        monkeypatch.setattr(fused_cpu, "PARALLEL_MIN_RATINGS", 0)
        monkeypatch.setattr(kernel_pool, "KERNEL_THREADS", 2)
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


def test_resume_refuses_batches_drawn_another_way(data, tmp_path, monkeypatch):
    """A mini-batch run checkpointed where batches are reshuffled every epoch (e.g. on CUDA) is not
    resumed where they are laid out once (the CPU): the same steps would see other ratings."""
    from recsys_flowadam.train import trainer

    train, val, _ = data
    cfg = TrainConfig(model="biased-mf", rank=3, optimizer="adam", steps=10, batch_size=300, checkpoint_every=5,
                      patience=0)
    ckpt = tmp_path / "c.safetensors"
    monkeypatch.setattr(trainer, "lays_out_batches", lambda *a: False)
    train_model(train, val, cfg, checkpoint_path=ckpt)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="minibatch_order"):
        train_model(train, val, cfg, checkpoint_path=ckpt, resume=True)


def test_resume_refuses_a_different_run(data, tmp_path):
    train, val, _ = data
    cfg = TrainConfig(model="mf", rank=3, optimizer="adam", steps=10, checkpoint_every=5, patience=0)
    ckpt = tmp_path / "c.safetensors"
    train_model(train, val, cfg, checkpoint_path=ckpt)
    with pytest.raises(CheckpointError, match="rank"):
        train_model(train, val, TrainConfig(**{**cfg.to_dict(), "rank": 4}), checkpoint_path=ckpt, resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train_model(train, val, cfg, checkpoint_path=tmp_path / "missing", resume=True)


def test_resume_refuses_other_ratings_with_the_same_size_and_sum(data, tmp_path):
    """Swapping which entries hold which values keeps n and the sum: the digest still tells."""
    from dataclasses import replace

    train, val, _ = data
    cfg = TrainConfig(model="mf", rank=3, optimizer="adam", steps=10, checkpoint_every=5, patience=0)
    ckpt = tmp_path / "c.safetensors"
    train_model(train, val, cfg, checkpoint_path=ckpt, data_identity={"dataset": "d", "split": "u1"})
    values = train.values.copy()
    hi, lo = int(np.argmax(values)), int(np.argmin(values))
    values[[hi, lo]] = values[[lo, hi]]
    swapped = replace(train, values=values)
    assert float(swapped.values.sum(dtype="float64")) == float(train.values.sum(dtype="float64"))
    with pytest.raises(CheckpointError, match="data: ratings_sha256"):
        train_model(swapped, val, cfg, checkpoint_path=ckpt, resume=True, data_identity={"dataset": "d", "split": "u1"})
    with pytest.raises(CheckpointError, match=r"split \('u1' -> 'u2'\)"):
        train_model(train, val, cfg, checkpoint_path=ckpt, resume=True, data_identity={"dataset": "d", "split": "u2"})
    with pytest.raises(CheckpointError, match="at step 10, past this run's limit of 5"):
        train_model(train, val, replace(cfg, steps=5), checkpoint_path=ckpt, resume=True,
                    data_identity={"dataset": "d", "split": "u1"})
    resumed = train_model(train, val, replace(cfg, steps=12), checkpoint_path=ckpt, resume=True,
                          data_identity={"dataset": "d", "split": "u1"})
    assert resumed.resumed_from == 10 and resumed.steps == 12


def test_cp_tensor_model_trains_on_contexts():
    train, val, _ = low_rank_split(n_users=40, n_items=30, n_contexts=4, density=0.3, rank=2)
    res = train_model(train, val, TrainConfig(model="cp", rank=2, reg=0.0, lr=0.03, optimizer="adam", steps=300,
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


# ---------------------------------------------------------------- the loop's parts, one at a time


def _coords(n, seed=0):
    from recsys_flowadam.models import Coords

    g = torch.Generator().manual_seed(seed)
    return Coords(torch.randint(0, 7, (n,), generator=g), torch.randint(0, 5, (n,), generator=g),
                  torch.arange(n, dtype=torch.float64))


def test_evaluator_early_stopping_rule_and_best_snapshot(monkeypatch):
    from recsys_flowadam.train import evaluator as ev
    from recsys_flowadam.train.loop_state import LoopState

    rmses = iter([1.0, 0.95, 0.949, 0.96, 0.90, 0.91, 0.92, 0.93])
    monkeypatch.setattr(ev, "evaluate_predictor", lambda *a, **k: {"rmse": next(rmses), "mae": 0.0})
    params = {"user_factors": torch.zeros(2)}
    cfg = TrainConfig(eval_every=5, patience=3, min_delta=0.01)
    e = ev.Evaluator(None, params, _coords(4), cfg)
    st = LoopState()
    stops = []
    for step in range(5, 45, 5):
        st.step = step
        params["user_factors"] += 1.0  # the parameters at step s hold s / 5
        assert e.due(step, last=False) and not e.due(step + 1, last=False) and e.due(step + 1, last=True)
        e.validate(st)
        stops.append(e.decide_stop(st))
    # 0.949 is no improvement by more than min_delta on 0.95; 0.90 is; then three bad ones stop
    assert stops == [False, False, False, False, False, False, False, True]
    assert (st.best_val, st.best_step, st.bad_evals) == (0.90, 25, 3)
    e.finish(st)
    assert torch.equal(params["user_factors"], torch.full((2,), 5.0))  # the snapshot of step 25 is back

    never = ev.Evaluator(None, params, _coords(4), TrainConfig(patience=0))
    st = LoopState(bad_evals=99)
    assert not never.patience_spent(st) and not never.decide_stop(st)
    no_val = ev.Evaluator(None, params, None, cfg)
    st = LoopState(step=17, bad_evals=99)
    assert no_val.validate(st) is None and not no_val.decide_stop(st) and no_val.best_val_rmse(st) is None
    no_val.finish(st)
    assert st.best_step == 17  # without validation the last step is the best


def test_broadcast_stop_takes_rank_zeros_decision():
    from recsys_flowadam.train.evaluator import BroadcastStop
    from recsys_flowadam.train.loop_state import LoopState

    class FakeGroup:  # rank 0 says: stop, best step 40
        def broadcast_ints(self, values, what, device):
            self.sent = (values, what)
            return [1, 40]

    group = FakeGroup()
    st = LoopState(step=55, best_step=0)
    assert BroadcastStop(group, torch.device("cpu"))(False, st) is True
    assert st.best_step == 40 and group.sent == ([False, 0], "the early-stopping broadcast (step 55)")


def test_loop_state_round_trips_through_a_checkpoint(tmp_path):
    from recsys_flowadam.train.loop_state import LoopState, Snapshot, fingerprint, load_snapshot, save_snapshot

    train, _, _ = low_rank_split(n_users=20, n_items=10)
    cfg = TrainConfig(model="mf", rank=2, steps=10)
    params = {"user_factors": torch.randn(20, 2), "item_factors": torch.randn(10, 2)}
    opt = torch.optim.Adam(params.values(), lr=0.1)
    for p in params.values():
        p.grad = torch.ones_like(p)
    opt.step()
    gen = torch.Generator().manual_seed(3)
    torch.randperm(50, generator=gen)
    state = LoopState(step=12, grad_evals=30, best_val=0.8, best_step=10, bad_evals=1, elapsed=1.5, batch_pos=2,
                      epoch=3, loss_sum=0.25, loss_count=2, checkpoint_step=12,
                      history=[{"step": 10, "epoch": 2.5, "train_loss": 0.3, "grad_evals": 25, "val_rmse": 0.8}])
    best = {k: p + 1 for k, p in params.items()}
    fp = fingerprint(cfg, train)
    path = tmp_path / "c.safetensors"
    save_snapshot(path, Snapshot(state, params, best, opt.state_dict(), gen.get_state()), fp)

    back = load_snapshot(path, fp, list(params))
    assert back.loop == state
    assert all(torch.equal(back.params[k], params[k]) and torch.equal(back.best[k], best[k]) for k in params)
    assert torch.equal(back.shuffle_state, gen.get_state())
    fresh = torch.optim.Adam([torch.zeros(20, 2), torch.zeros(10, 2)], lr=0.1)
    fresh.load_state_dict(back.optimizer)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # the resumable fields may change; others may not (named), nor the data
    assert fingerprint(TrainConfig(model="mf", rank=2, steps=99, device="cpu"), train) == fp
    with pytest.raises(CheckpointError, match=r"config fields: lr$"):
        load_snapshot(path, fingerprint(TrainConfig(model="mf", rank=2, lr=0.5), train), list(params))
    with pytest.raises(CheckpointError, match="data: n_train"):
        load_snapshot(path, fingerprint(cfg, low_rank_split(n_users=20, n_items=10, seed=1)[0]), list(params))
    assert "world_size" in fingerprint(cfg, train, world_size=2)["config"]
    with pytest.raises(CheckpointError, match="unknown loop fields"):
        LoopState.from_dict({"step": 1, "lr": 0.1})


def test_local_minibatches_cover_each_epoch_and_resume_mid_epoch():
    from recsys_flowadam.train.batches import LocalData, make_batch_source
    from recsys_flowadam.train.loop_state import LoopState

    coords = _coords(23)
    data = LocalData(coords, None)

    def run(source, state, steps):
        return [source.next(state).coords.values.tolist() for _ in range(steps)]

    src, st = make_batch_source(data, True, 5, seed=4, device=torch.device("cpu")), LoopState()
    assert src.n_batches == 5
    batches = run(src, st, 12)  # 2 epochs and 2 batches
    for epoch in (batches[:5], batches[5:10]):
        assert sorted(v for b in epoch for v in b) == list(range(23))
    assert batches[:5] != batches[5:10]  # reshuffled every epoch
    assert (st.epoch, st.batch_pos, src.epoch_label(st), src.epochs_done(st)) == (2, 2, 2.4, 2.4)
    # a source restored from (state, shuffle state) mid-epoch continues exactly
    saved, shuffle_state = LoopState(epoch=st.epoch, batch_pos=st.batch_pos), src.shuffle_state.clone()
    rest = run(src, st, 6)
    other = make_batch_source(data, True, 5, seed=4, device=torch.device("cpu"))
    other.restore(saved, shuffle_state)
    assert run(other, saved, 6) == rest

    full, st = make_batch_source(data, False, None, seed=4, device=torch.device("cpu")), LoopState()
    assert full.next(st).coords is None and st.epoch == 1 and full.n_batches == 1


def test_shard_minibatches_split_each_global_batch_between_ranks():
    from recsys_flowadam.models import Objective
    from recsys_flowadam.train.batches import ShardData, make_batch_source
    from recsys_flowadam.train.distributed import DistContext
    from recsys_flowadam.train.loop_state import LoopState

    coords, objective = _coords(41), Objective(reg=0.1)  # shards of 21 and 20: rank 1 may run out in the last batch
    ranks = [ShardData(coords, objective, DistContext(r, 2, r, "gloo", 1.0), seed=5, device=torch.device("cpu"))
             for r in (0, 1)]
    # the shards' paths compute the data term only; rank 0 adds the penalty in the all-reduce
    assert ranks[0].path_objective.reg == 0.0 and ranks[0].penalty is objective and ranks[1].penalty is None
    assert [len(d.coords) for d in ranks] == [21, 20] and ranks[0].largest == 21
    assert sorted(ranks[0].coords.values.tolist() + ranks[1].coords.values.tolist()) == list(range(41))
    sources = [make_batch_source(d, True, 10, seed=3, device=torch.device("cpu")) for d in ranks]
    states = [LoopState(), LoopState()]
    assert sources[0].n_batches == 5  # 5 ratings per rank per batch, over the longest shard
    seen = []
    for _ in range(3 * 5):
        b0, b1 = (s.next(st) for s, st in zip(sources, states))
        seen += b0.coords.values.tolist() + b1.coords.values.tolist()
        assert len(b0.coords) + len(b1.coords) <= 10
        assert b0.share + b1.share == pytest.approx(1.0)
        assert b0.share == pytest.approx(len(b0.coords) / (len(b0.coords) + len(b1.coords)))
    assert states[0] == states[1] and states[0].epoch == 3
    for epoch in range(3):  # every rating once per epoch
        assert sorted(seen[epoch * 41:(epoch + 1) * 41]) == list(range(41))
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        ShardData(_coords(3), objective, DistContext(0, 4, 0, "gloo", 1.0), seed=5, device=torch.device("cpu"))


def test_step_limit_takes_whichever_ends_first():
    from recsys_flowadam.train.batches import step_limit

    assert step_limit(TrainConfig(), 7) == TrainConfig.DEFAULT_STEPS
    assert step_limit(TrainConfig(steps=50), 7) == 50
    assert step_limit(TrainConfig(epochs=3), 7) == 21
    assert step_limit(TrainConfig(steps=10, epochs=3), 7) == 10
    # the automatic mini-batch path's horizon applies only when neither is given
    assert step_limit(TrainConfig(), 7, default_steps=40) == 40
    assert step_limit(TrainConfig(steps=50), 7, default_steps=40) == 50
    assert step_limit(TrainConfig(epochs=3), 7, default_steps=40) == 21


def test_train_command_reports_the_path_it_chose(tmp_path, capsys):
    """`train` prints its choice and why, and records it in --json and the artifact."""
    import json

    from recsys_flowadam.artifact import load_artifact
    from recsys_flowadam.cli import main

    argv = ["train", "--dataset", "synthetic", "--data-option", "n_users=60", "--data-option", "n_items=40",
            "--data-option", "rank=2", "--data-option", "density=0.3", "--rank", "2", "--optimizer", "adam",
            "--steps", "5", "--device", "cpu", "--threads", "1"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    choice = summary["path_choice"]
    assert choice["representation"] == summary["representation"] == "dense" and choice["batch_size"] is None
    assert "training ratings" in choice["reason"]
    assert load_artifact(tmp_path / "a").meta.train_config["path_choice"] == choice
    assert main([*argv, "--out", str(tmp_path / "b"), "--batch-size", "64"]) == 0
    text = capsys.readouterr().out
    assert "  path: minibatch, batches of 64 (--batch-size given)" in text.splitlines()


def _wreck_at(step_to_wreck, params_seen):
    """An ``on_step`` that multiplies the factors by 50 after step ``step_to_wreck``: a loss-raising
    last step, as FlowAdam's ODE branch can take on a plateau."""
    def on_step(step):
        if step == step_to_wreck:
            with torch.no_grad():
                for name, p in params_seen().items():
                    if name.endswith("factors"):
                        p.mul_(50.0)
    return on_step


@pytest.mark.parametrize("keep", [False, True], ids=["plain", "guarded"])
def test_a_run_without_validation_can_end_on_its_lowest_objective(data, keep, monkeypatch):
    """``keep_lowest_objective`` (what the refit uses): a wrecked last step is undone, back to the
    lowest-objective evaluation step; without it the run ends on the wreck."""
    import recsys_flowadam.train.trainer as trainer_module

    train, _val, test = data
    seen = {}
    real_init = trainer_module.init_params

    def capture_init(*args, **kwargs):
        seen["params"] = real_init(*args, **kwargs)
        return seen["params"]

    monkeypatch.setattr(trainer_module, "init_params", capture_init)
    cfg = TrainConfig(model="biased-mf", optimizer="adam", rank=3, lr=0.02, reg=1e-3, steps=60, eval_every=10,
                      seed=0, device="cpu", representation="sparse")
    result = train_model(train, None, cfg, on_step=_wreck_at(60, lambda: seen["params"]),
                         keep_lowest_objective=keep)
    rmse = _val_rmse(result, test)
    clean = train_model(train, None, TrainConfig(**{**cfg.to_dict(), "steps": 50}))
    if keep:
        assert result.extra["objective_guard"]["restored_step"] == 50
        assert result.extra["objective_guard"]["final_objective"] > 10 * result.extra["objective_guard"]["objective"]
        for name, p in clean.params.items():  # exactly the parameters after step 50
            torch.testing.assert_close(result.params[name], p, rtol=0, atol=0)
        assert result.grad_evals == 61  # 60 steps and the final objective
    else:
        assert "objective_guard" not in result.extra
        assert rmse > 5 * _val_rmse(clean, test)


def test_lowest_objective_refuses_checkpoints(data, tmp_path):
    train, _val, _test = data
    cfg = TrainConfig(model="biased-mf", optimizer="adam", rank=3, steps=10, device="cpu", checkpoint_every=5)
    with pytest.raises(ValueError, match="keep_lowest_objective"):
        train_model(train, None, cfg, checkpoint_path=tmp_path / "ck.safetensors", keep_lowest_objective=True)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("halves", [False, True])
@pytest.mark.parametrize("optimizer", ["adam", "flowadam"])
def test_laid_out_runs_let_the_kernel_take_the_rows_step_with_the_same_result(data, monkeypatch, optimizer, halves,
                                                                               dtype):
    """On laid-out CPU batches the trainer allows the gradient kernel to take Adam's step on the
    user rows (row_step), and on the item rows where it splits the batch in halves; the run is the
    one without it, to float rounding."""
    from recsys_flowadam.models import fused_cpu, path_choice
    from recsys_flowadam.optim import fused_adam

    if not fused_cpu.available():
        pytest.skip("numba is not installed")
    train, val, _ = data
    monkeypatch.setattr(path_choice, "MINIBATCH_MIN_RATINGS", len(train))
    monkeypatch.setattr(path_choice, "MIN_AUTO_BATCH", 10)
    monkeypatch.setattr(fused_adam, "MIN_ELEMENTS", 1)
    monkeypatch.setattr(fused_cpu, "PARALLEL_MIN_RATINGS", 0 if halves else 10**9)
    # the two runs' sums differ in their rounding only (the kernel and the optimizer's pass contract
    # different products): float64 checks the same numbers; float32 with the items' step taken too
    # carries the rounding into the fourth digit by the run's end
    cfg = TrainConfig(model="biased-mf", rank=3, optimizer=optimizer, reg=0.01, seed=3, patience=0,
                      optimizer_kwargs={"eps": 1e-8}, dtype=dtype)
    taken, items_taken = [], []
    real = fused_cpu._row_steps

    def spy(params, allowed, rows):
        out = real(params, allowed, rows)
        (taken if rows == fused_cpu.USER_ROWS else items_taken).append(out is not None)
        return out

    monkeypatch.setattr(fused_cpu, "_row_steps", spy)
    fused = train_model(train, val, cfg)
    assert fused.representation == "minibatch" and taken and all(taken)
    assert items_taken == [halves] * len(taken)
    taken.clear()
    monkeypatch.setattr(fused_adam, "offerable", lambda params: False)
    plain = train_model(train, val, cfg)
    assert taken and not any(taken)
    assert fused.steps == plain.steps and fused.best_step == plain.best_step
    # (rtol, atol, the validation RMSE's rel): float32 with the user rows' step alone keeps the bounds
    # this test had before the items' step was taken in the kernel
    rtol, atol, val_rel = {("float64", False): (1e-9, 1e-11, 1e-10), ("float64", True): (1e-9, 1e-11, 1e-10),
                           ("float32", False): (1e-4, 1e-5, 1e-5), ("float32", True): (2e-3, 2e-5, 2e-4)}[dtype, halves]
    assert fused.best_val_rmse == pytest.approx(plain.best_val_rmse, rel=val_rel)
    for k in plain.params:
        assert fused.params[k].dtype == getattr(torch, dtype)
        torch.testing.assert_close(fused.params[k], plain.params[k], rtol=rtol, atol=atol)
