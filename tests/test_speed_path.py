"""The automatic large-data path (issue 13): its schedule, validation cadence and sample, the
fused optimizer and single thread it runs with, and the mini-batch step's buffers."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from recsys_flowadam.data.ratings import Ratings, RatingScale
from recsys_flowadam.models import Coords, MiniBatchPath, ModelSpec, Objective, PathChoice, init_params
from recsys_flowadam.models import path_choice
from recsys_flowadam.models.autograd_path import AutogradPath
from recsys_flowadam.models.minibatch import Workspace, add_penalty, retained_heap
from recsys_flowadam.train.config import TrainConfig
from recsys_flowadam.train.evaluator import DEFAULT_EVAL_EVERY, Evaluator, validation_sample
from recsys_flowadam.train.trainer import LrDecay, loop_threads, optimizer_kwargs, torch_threads, train_model

CPU = torch.device("cpu")


@pytest.mark.parametrize("n", [3_000_000, 10_000_000, 40_000_000])
def test_auto_minibatch_schedule_is_in_passes_over_the_data(n):
    choice = path_choice.auto_minibatch(n, CPU, "why")
    per_epoch = math.ceil(n / choice.batch_size)
    assert choice.batch_size == path_choice.auto_batch_size(n)
    assert choice.lr_half_life_steps == round(path_choice.LR_HALF_LIFE_EPOCHS * per_epoch)
    assert choice.max_steps == path_choice.AUTO_EPOCHS * per_epoch
    assert choice.eval_every == round(per_epoch / path_choice.EVALS_PER_EPOCH)
    assert choice.eval_sample == path_choice.EVAL_SAMPLE
    assert choice.lr_scale == path_choice.AUTO_LR_SCALE
    assert choice.reason.startswith("why: mini-batches of") and "one torch thread" in choice.reason
    assert "one torch thread" not in path_choice.auto_minibatch(n, torch.device("cuda"), "why").reason


def test_auto_minibatch_starts_small_with_eps_in_units_of_a_rating_gradient():
    choice = path_choice.auto_minibatch(10_000_000, CPU, "why", rating_std=1.0)
    assert choice.init_std == path_choice.AUTO_INIT_STD == 0.0025
    unit = 2.0 * 1.0 * path_choice.EPS_FACTOR / choice.batch_size  # one rating's gradient on a factor of 0.01
    assert choice.eps == pytest.approx(path_choice.AUTO_EPS_UNITS * unit, rel=1e-3)
    # ratings twice as spread: eps twice as large; batches twice as large: half
    assert path_choice.auto_minibatch(10_000_000, CPU, "why", rating_std=2.0).eps == pytest.approx(2 * choice.eps,
                                                                                                   rel=1e-3)
    assert path_choice.auto_eps(2 * choice.batch_size, 1.0) == pytest.approx(path_choice.auto_eps(
        choice.batch_size, 1.0) / 2)
    assert f"eps is {choice.eps:.3g}" in choice.reason and "start at std 0.0025" in choice.reason
    spec = ModelSpec("biased-mf", 943, 1682, 20)
    small = path_choice.choose_path(spec, 80_000, CPU)  # full batch: the paper's start, the optimizer's eps
    assert (small.init_std, small.eps) == (path_choice.DEFAULT_INIT_STD, None)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "flowadam", "lazy-adam"])
def test_the_paths_eps_reaches_the_adam_family_unless_given(optimizer):
    choice = PathChoice("minibatch", 100, "why", eps=2.5e-6)
    assert optimizer_kwargs(TrainConfig(optimizer=optimizer), choice, CPU)["eps"] == 2.5e-6
    given = TrainConfig(optimizer=optimizer, optimizer_kwargs={"eps": 1e-8})
    assert optimizer_kwargs(given, choice, CPU)["eps"] == 1e-8
    # a given start above EPS_FACTOR scales it (eps in rating gradients on such factors); smaller ones keep it
    assert path_choice.EPS_FACTOR == 0.01
    assert optimizer_kwargs(TrainConfig(optimizer=optimizer, init_std=0.1), choice, CPU)["eps"] == pytest.approx(2.5e-5)
    for small in (0.01, 0.0025, 0.001):
        assert optimizer_kwargs(TrainConfig(optimizer=optimizer, init_std=small), choice, CPU)["eps"] == 2.5e-6
    assert "eps" not in optimizer_kwargs(TrainConfig(optimizer=optimizer), PathChoice("dense", None, "why"), CPU)
    assert "eps" not in optimizer_kwargs(TrainConfig(optimizer="sgd"), choice, CPU)  # SGD has no eps


def test_the_automatic_path_trains_from_its_start_unless_one_is_given(monkeypatch):
    from recsys_flowadam.models import factorization

    seen = []
    original = factorization.init_params

    def spy(spec, *, init_std, **kw):
        seen.append(init_std)
        return original(spec, init_std=init_std, **kw)

    monkeypatch.setattr("recsys_flowadam.train.trainer.init_params", spy)
    monkeypatch.setattr(path_choice, "MINIBATCH_MIN_RATINGS", 1_000)
    monkeypatch.setattr(path_choice, "MIN_AUTO_BATCH", 100)
    rng = np.random.default_rng(0)
    cells = rng.permutation(60 * 50)[:2_000]  # distinct (user, item) pairs
    train = Ratings(name="t", users=cells // 50, items=cells % 50, values=rng.uniform(1, 5, len(cells)).astype(
        np.float32), user_ids=np.arange(60).astype(str).astype(object),
        item_ids=np.arange(50).astype(str).astype(object), scale=RatingScale(1.0, 5.0))
    cfg = TrainConfig(model="biased-mf", rank=4, optimizer="adam", epochs=1, reg=0.01)
    result = train_model(train, None, cfg)
    assert seen == [path_choice.AUTO_INIT_STD]
    assert result.path_choice["init_std"] == path_choice.AUTO_INIT_STD
    assert result.path_choice["eps"] == pytest.approx(path_choice.auto_eps(result.path_choice["batch_size"],
                                                                           float(np.std(train.values))), rel=1e-2)
    train_model(train, None, dataclasses.replace(cfg, init_std=0.2))
    assert seen[-1] == 0.2


def test_cpu_minibatches_of_mf_are_laid_out_once():
    from recsys_flowadam.train.trainer import lays_out_batches

    coords = _coords(600)
    mini = PathChoice("minibatch", 100, "why")
    assert lays_out_batches(ModelSpec("biased-mf", 50, 30, 4), coords, mini, CPU, None)
    assert lays_out_batches(ModelSpec("mf", 50, 30, 4), coords, mini, CPU, None)
    assert not lays_out_batches(ModelSpec("biased-mf", 50, 30, 4), coords, PathChoice("dense", None, "why"), CPU,
                                None)
    assert not lays_out_batches(ModelSpec("biased-mf", 50, 30, 4), coords, mini, torch.device("cuda"), None)
    assert not lays_out_batches(ModelSpec("biased-mf", 50, 30, 4), coords, mini, CPU, object())  # distributed
    assert not lays_out_batches(ModelSpec("time-mf", 50, 30, 4, n_contexts=3), coords, mini, CPU, None)


def test_laid_out_batches_keep_their_members_and_come_user_by_user():
    from recsys_flowadam.train.batches import SlottedMiniBatches
    from recsys_flowadam.train.loop_state import LoopState

    coords = _coords(650)
    source = SlottedMiniBatches(coords, 100, torch.Generator().manual_seed(3), (50, 30), torch.float32, as_coords=True)
    state = LoopState()
    epochs = [[source.next(state) for _ in range(source.n_batches)] for _ in range(3)]
    assert source.n_batches == 7 and state.epoch == 3
    def triples(c):
        return sorted(zip(c.users.tolist(), c.items.tolist(), c.values.tolist()))

    for batches in epochs:  # every rating once a pass, with its own value
        assert sorted(t for b in batches for t in triples(b.coords)) == triples(coords)
        for b in batches:
            assert torch.equal(b.coords.users, torch.sort(b.coords.users, stable=True).values)
    members = [{b.index: tuple(b.coords.items.tolist()) for b in batches} for batches in epochs]
    assert members[0] == members[1] == members[2]  # the same batches every pass ...
    assert len({tuple(b.index for b in batches) for batches in epochs}) > 1  # ... in a new order


def test_full_batch_choices_keep_the_default_cadence_and_rate():
    spec = ModelSpec("biased-mf", 943, 1682, 20)
    choice = path_choice.choose_path(spec, 80_000, CPU)
    assert (choice.eval_every, choice.eval_sample, choice.lr_scale, choice.lr_half_life_steps) == (None, None, 1.0,
                                                                                                   None)


def test_lr_decay_holds_then_halves():
    p = torch.zeros(3, requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.01)
    decay = LrDecay(opt, half_life=10, scale=4.0, hold=5)
    for done, want in ((0, 0.04), (5, 0.04), (15, 0.02), (25, 0.01)):
        decay.apply(done)
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12)
    plain = LrDecay(torch.optim.Adam([p], lr=0.01), half_life=10)  # the defaults: no scale, no hold
    plain.apply(10)
    assert plain.opt.param_groups[0]["lr"] == pytest.approx(0.005, rel=1e-12)


def _coords(n: int, seed: int = 0) -> Coords:
    gen = torch.Generator().manual_seed(seed)
    return Coords(torch.randint(0, 50, (n,), generator=gen), torch.randint(0, 30, (n,), generator=gen),
                  torch.rand(n, generator=gen) * 4 + 1)


def test_validation_sample_is_fixed_seeded_and_in_order():
    val = _coords(1000)
    a, b = validation_sample(val, 100, seed=3), validation_sample(val, 100, seed=3)
    assert len(a) == 100 and torch.equal(a.users, b.users) and torch.equal(a.values, b.values)
    assert not torch.equal(a.values, validation_sample(val, 100, seed=4).values)
    # every sampled rating is a validation rating, kept in the validation order (values number them here)
    numbered = Coords(val.users, val.items, torch.arange(len(val), dtype=torch.float32))
    pos = validation_sample(numbered, 100, seed=3).values.long()
    assert torch.equal(pos, pos.sort().values) and len(pos.unique()) == 100
    assert torch.equal(numbered.users[pos], a.users) and torch.equal(numbered.items[pos], a.items)
    assert validation_sample(val, 5000, seed=3) is val  # no more ratings than asked: all of them


def test_evaluator_cadence_config_then_path_then_default():
    params = init_params(ModelSpec("mf", 50, 30, 2), generator=torch.Generator().manual_seed(0))
    val = _coords(500)
    predictor = None  # not scored here
    assert Evaluator(predictor, params, val, TrainConfig()).every == DEFAULT_EVAL_EVERY
    assert Evaluator(predictor, params, val, TrainConfig(), every=7).every == 7
    assert Evaluator(predictor, params, val, TrainConfig(eval_every=3), every=7).every == 3
    sampled = Evaluator(predictor, params, val, TrainConfig(), sample=100)
    assert len(sampled.val) == 100 and len(Evaluator(predictor, params, val, TrainConfig()).val) == 500
    assert Evaluator(predictor, params, None, TrainConfig(), sample=100).val is None


def test_fused_adam_on_the_minibatch_path_only():
    mini, full = PathChoice("minibatch", 100, "x"), PathChoice("sparse", None, "x")
    assert optimizer_kwargs(TrainConfig(optimizer="adam"), mini, CPU) == {"fused": True}
    assert optimizer_kwargs(TrainConfig(optimizer="AdamW"), mini, CPU) == {"fused": True}
    assert optimizer_kwargs(TrainConfig(optimizer="adam"), full, CPU) == {}
    assert optimizer_kwargs(TrainConfig(optimizer="flowadam"), mini, CPU) == {}  # FlowAdam fuses by itself
    given = TrainConfig(optimizer="adam", optimizer_kwargs={"foreach": True})
    assert optimizer_kwargs(given, mini, CPU) == {"foreach": True}


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("restored on errors too")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_loop_threads_one_for_minibatches_and_for_full_batches_on_a_busy_cpu(monkeypatch):
    mini, full = PathChoice("minibatch", 100, "x"), PathChoice("dense", None, "x")
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert loop_threads(CPU, mini, load=0.0) == 1
    assert loop_threads(CPU, full, load=0.2) is None  # idle: torch's own count
    assert loop_threads(CPU, full, load=1.5) == 1 and loop_threads(CPU, full, load=8.0) == 1
    assert loop_threads(torch.device("cuda"), mini, load=8.0) is None


def test_full_batch_numbers_do_not_depend_on_the_thread_count(monkeypatch):
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))  # idle: the loop keeps the count set here
    train, val = _ratings(n_users=200, n_items=150, n=6000)
    before = torch.get_num_threads()
    for rep in ("dense", "sparse"):
        cfg = TrainConfig(model="biased-mf", rank=4, optimizer="flowadam", reg=0.05, steps=20, eval_every=10,
                          representation=rep, refit=False)
        runs = []
        for threads in (1, 2):
            with torch_threads(threads):
                runs.append(train_model(train, val, cfg))
        assert all(torch.equal(runs[0].params[k], runs[1].params[k]) for k in runs[0].params), rep
    assert torch.get_num_threads() == before


def test_retained_heap_is_safe_to_enter_twice():
    with retained_heap(), retained_heap():
        x = torch.ones(1 << 20)
        del x


def _ratings(n_users=60, n_items=40, n=1500, seed=0) -> tuple[Ratings, Ratings]:
    rng = np.random.default_rng(seed)
    pairs = rng.choice(n_users * n_items, n, replace=False)
    users, items = pairs // n_items, pairs % n_items
    values = np.clip(np.round(3 + rng.normal(0, 1, n)), 1, 5).astype(np.float32)
    ratings = Ratings(users=users, items=items, values=values, user_ids=np.arange(n_users).astype(str).astype(object),
                      item_ids=np.arange(n_items).astype(str).astype(object), scale=RatingScale(1.0, 5.0), name="t")
    cut = int(0.8 * n)
    return ratings.subset(np.arange(cut), name="t"), ratings.subset(np.arange(cut, n), name="t:val")


def test_automatic_minibatch_run_uses_its_cadence_sample_schedule_and_one_thread(monkeypatch):
    train, val = _ratings()
    monkeypatch.setattr(path_choice, "MINIBATCH_MIN_RATINGS", 1000)
    monkeypatch.setattr(path_choice, "EVAL_SAMPLE", 200)
    threads = []
    config = TrainConfig(model="biased-mf", rank=3, optimizer="adam", lr=0.01, patience=0)
    res = train_model(train, val, config, on_step=lambda step: threads.append(torch.get_num_threads()))
    choice = PathChoice(**res.path_choice)
    assert choice.representation == "minibatch" and choice.eval_sample == 200
    assert res.steps == choice.max_steps
    assert [h["step"] for h in res.history][:3] == [choice.eval_every, 2 * choice.eval_every, 3 * choice.eval_every]
    assert set(threads) == {1}
    assert res.diagnostics == {} and res.stopped == "max_steps"
    # the same run again from its recorded choice (a refit's way): the same numbers
    again = train_model(train, val, config, path_choice=res.path_choice)
    assert [h["val_rmse"] for h in again.history] == [h["val_rmse"] for h in res.history]


def test_minibatch_grads_do_not_alias_the_reused_buffers():
    spec = ModelSpec("biased-mf", 50, 30, 4)
    coords = _coords(600)
    weights = {"user": torch.bincount(coords.users, minlength=50).float() / 600,
               "item": torch.bincount(coords.items, minlength=30).float() / 600}
    obj = Objective(reg=0.05, bias_reg=0.05, offset=3.0, weights=weights)
    params = init_params(spec, init_std=0.3, generator=torch.Generator().manual_seed(1))
    path = MiniBatchPath(coords, obj)
    first = coords.select(torch.arange(0, 300))
    loss1, grads1 = path.loss_and_grad(params, first)
    kept = {k: g.clone() for k, g in grads1.items()}
    path.loss_and_grad(params, coords.select(torch.arange(300, 600)))  # reuses the workspace
    assert all(torch.equal(kept[k], grads1[k]) for k in kept)
    ref_loss, ref = AutogradPath(coords, obj).loss_and_grad(params, first)
    assert abs(float(loss1) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    for k in ref:
        assert float((grads1[k] - ref[k]).norm() / ref[k].norm()) <= 1e-5, k


def test_add_penalty_with_and_without_workspace_agree():
    params = init_params(ModelSpec("biased-mf", 50, 30, 4), init_std=0.3, generator=torch.Generator().manual_seed(2),
                         dtype=torch.float64)
    weights = {"user": torch.rand(50, dtype=torch.float64), "item": torch.rand(30, dtype=torch.float64)}
    obj = Objective(reg=0.05, bias_reg=0.02, weights=weights)
    a = {k: torch.zeros_like(p) for k, p in params.items()}
    b = {k: torch.zeros_like(p) for k, p in params.items()}
    va, vb = add_penalty(obj, params, a), add_penalty(obj, params, b, Workspace())
    assert float(va) == pytest.approx(float(obj.penalty(params).detach()), rel=1e-12)
    assert float(vb) == pytest.approx(float(va), rel=1e-12)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_large_automatic_run_folds_most_of_val_into_one_run(monkeypatch):
    from recsys_flowadam.train.pipeline import fit_and_score, fold_validation

    train, val = _ratings(n=1500)  # 1200 train, 300 val
    monkeypatch.setattr(path_choice, "MINIBATCH_MIN_RATINGS", 1000)
    monkeypatch.setattr(path_choice, "EVAL_SAMPLE", 100)
    config = TrainConfig(model="biased-mf", rank=3, optimizer="adam", lr=0.01, reg=0.01, patience=0)
    fit = fit_and_score(train, val, config)
    folded = fit.metrics["validation_folded"]
    assert folded["n_val_held_out"] == 100 and folded["n_val_trained_on"] == 200
    assert fit.metrics["n_val"] == 100 and fit.metrics["n_train"] == 1400
    assert len(fit.fit_ratings) == 1400 and "refit" not in fit.result.extra  # one run, no refit
    assert fit.result.path_choice["representation"] == "minibatch"
    # the held-out sample is exactly the val ratings that were not trained on
    fit_train, held, _ = fold_validation(train, val, config)
    pairs = lambda r: set(zip(r.users.tolist(), r.items.tolist()))  # noqa: E731
    assert pairs(held) | (pairs(fit_train) - pairs(train)) == pairs(val)
    assert not pairs(held) & pairs(fit_train)
    assert fit.result.best_val_rmse == pytest.approx(fit.metrics["val_rmse"], abs=0.05)
    # the artifact's CSR, built during training, is the one of the ratings the model was fitted on
    from recsys_flowadam.train.export import train_csr

    assert fit.pending_csr is not None
    indptr, items = fit.training_csr()
    want_indptr, want_items = train_csr(fit.fit_ratings)
    assert np.array_equal(indptr, want_indptr) and np.array_equal(items, want_items)
    assert indptr[-1] == 1400
    # the two-run rule stays where the automatic mini-batch path is not taken, or refit is off
    for changed in ({"refit": False}, {"batch_size": 300}, {"optimizer": "lbfgs"}, {"representation": "sparse"}):
        cfg = TrainConfig(**{**config.to_dict(), **changed})
        assert fold_validation(train, val, cfg)[2] is None, changed
    monkeypatch.setattr(path_choice, "MINIBATCH_MIN_RATINGS", 1300)  # train alone is below the threshold
    assert fold_validation(train, val, config)[2] is None
    monkeypatch.setattr(path_choice, "MINIBATCH_MIN_RATINGS", 1000)
    monkeypatch.setattr(path_choice, "EVAL_SAMPLE", 300)  # no more val than the sample: nothing to fold
    assert fold_validation(train, val, config)[2] is None


def test_values_std_is_numpys_in_float64_across_chunks():
    from recsys_flowadam.train.problem import values_std

    values = np.random.default_rng(0).normal(3.5, 1.1, 10_001).astype(np.float32)
    for chunk in (7, 1000, 1 << 20):
        assert values_std(values, chunk=chunk) == pytest.approx(float(values.astype(np.float64).std()), rel=1e-12)
    assert values_std(np.array([2.0], np.float32)) == 0.0
    assert np.isnan(values_std(np.empty(0, np.float32)))
