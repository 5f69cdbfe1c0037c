"""The hand-written mini-batch path equals autograd (float64, 1e-5) for every model, loss and
penalty weighting, on batches that repeat users and items; its scatter-adds; the automatic
choice of full batch or mini-batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys_flowadam.models import (
    AutogradPath,
    Coords,
    MiniBatchPath,
    ModelSpec,
    Objective,
    PathChoice,
    auto_batch_size,
    choose_path,
    estimate_bytes,
    init_params,
    make_path,
)
from recsys_flowadam.models import path_choice
from recsys_flowadam.models.scatter import SCATTER_METHODS, default_method, scatter_rows, segment_offsets

CASES = [
    ("mf", None, "mse"), ("mf", None, "huber"), ("biased-mf", None, "mse"), ("biased-mf", None, "huber"),
    ("cp", False, "mse"), ("cp", False, "huber"), ("cp", True, "mse"), ("cp", True, "huber"),
]


def _problem(model: str, biases, n_users=31, n_items=17, n_contexts=4, rank=5, n=400, seed=0):
    """Ratings drawn with replacement: users, items and whole cells repeat within the batch."""
    gen = torch.Generator().manual_seed(seed)
    nc = n_contexts if model == "cp" else 0
    spec = ModelSpec(model, n_users, n_items, rank, nc, biases=biases)
    # skewed draws, so a few users and items hold many ratings (like real data)
    users = torch.multinomial(torch.rand(n_users, generator=gen) ** 4, n, replacement=True, generator=gen)
    items = torch.multinomial(torch.rand(n_items, generator=gen) ** 4, n, replacement=True, generator=gen)
    contexts = torch.randint(0, nc, (n,), generator=gen) if nc else None
    values = torch.randn(n, generator=gen, dtype=torch.float64) * 2 + 3
    params = init_params(spec, init_std=0.5, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    return spec, Coords(users, items, values, contexts), params


def _frequency_weights(spec: ModelSpec, coords: Coords) -> dict[str, torch.Tensor]:
    n = len(coords)
    weights = {"user": torch.bincount(coords.users, minlength=spec.n_users).double() / n,
               "item": torch.bincount(coords.items, minlength=spec.n_items).double() / n}
    if spec.is_tensor:
        weights["context"] = torch.bincount(coords.contexts, minlength=spec.n_contexts).double() / n
    return weights


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("scatter", SCATTER_METHODS)
@pytest.mark.parametrize("weighting", ["uniform", "frequency"])
@pytest.mark.parametrize("model,biases,loss", CASES)
def test_minibatch_path_matches_autograd(model, biases, loss, weighting, scatter):
    spec, coords, params = _problem(model, biases)
    weights = _frequency_weights(spec, coords) if weighting == "frequency" else None
    obj = Objective(reg=0.07, bias_reg=0.02, loss=loss, huber_delta=0.8, offset=0.37, weights=weights)
    batch = coords.select(torch.arange(0, len(coords), 3))  # a batch of the training ratings
    assert len(torch.unique(batch.users)) < len(batch) and len(torch.unique(batch.items)) < len(batch)
    path = MiniBatchPath(coords, obj, scatter=scatter)
    for b in (batch, None):  # a mini-batch, and every training rating
        ref_loss, ref_grads = AutogradPath(coords, obj).loss_and_grad(params, b)
        got_loss, got_grads = path.loss_and_grad(params, b)
        assert list(got_grads) == list(params)
        assert abs(float(got_loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
        for name in params:
            assert got_grads[name].shape == params[name].shape and got_grads[name].dtype == torch.float64
            assert _rel(got_grads[name], ref_grads[name]) <= 1e-5, name
    if loss == "huber":  # residuals beyond delta exist, so the clipped branch is exercised
        from recsys_flowadam.models import predict

        r = predict(params, batch.users, batch.items, batch.contexts, obj.offset) - batch.values
        assert bool((r.abs() > obj.huber_delta).any()) and bool((r.abs() < obj.huber_delta).any())


def test_minibatch_path_without_penalty_and_leaves_params_alone():
    spec, coords, params = _problem("biased-mf", None)
    before = {k: p.detach().clone() for k, p in params.items()}
    obj = Objective(offset=1.0)  # no penalty: the shards of a distributed run use this
    loss, grads = MiniBatchPath(coords, obj).loss_and_grad(params, coords)
    ref_loss, ref_grads = AutogradPath(coords, obj).loss_and_grad(params, coords)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-12)
    for name in params:
        assert _rel(grads[name], ref_grads[name]) <= 1e-12
        assert torch.equal(params[name], before[name]) and params[name].grad is None
    # rows no rating touches get no data gradient
    untouched = torch.ones(spec.n_users, dtype=torch.bool)
    untouched[coords.users] = False
    assert bool(untouched.any()) and bool((grads["user_factors"][untouched] == 0).all())


def test_minibatch_loss_is_mean_plus_full_penalty_by_hand():
    params = {"user_factors": torch.tensor([[1.0], [2.0]], dtype=torch.float64),
              "item_factors": torch.tensor([[3.0], [-1.0]], dtype=torch.float64)}
    coords = Coords(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([2.0, 0.0], dtype=torch.float64))
    obj = Objective(reg=0.5)
    path = MiniBatchPath(coords, obj)
    # the batch holds rating 0 only: residual 1*3-2 = 1 -> mean sq 1; the penalty covers every row:
    # 0.5*(1+4+9+1) = 7.5
    loss, grads = path.loss_and_grad(params, coords.select(torch.tensor([0])))
    assert float(loss) == pytest.approx(8.5)
    # dU[0] = 2*r*V[0] + 2*reg*U[0] = 6 + 1; dU[1] = 0 + 2*reg*U[1] = 2
    assert grads["user_factors"].flatten().tolist() == pytest.approx([7.0, 2.0])


@pytest.mark.parametrize("method", SCATTER_METHODS)
def test_scatter_rows_adds_weighted_rows_into_their_targets(method):
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    index = torch.tensor([4, 0, 4, 4, 2, 0, 7])  # row 7 of 9: rows 1, 3, 5, 6 and 8 get nothing
    lookup = torch.tensor([5, 1, 1, 0, 3, 2, 5])
    weights = torch.randn(7, generator=gen, dtype=torch.float64)
    expected = torch.zeros(9, 3, dtype=torch.float64)
    for k in range(7):
        expected[index[k]] += weights[k] * table[lookup[k]]
    torch.testing.assert_close(scatter_rows(index, 9, table, lookup, weights, method), expected)
    rows = table[lookup]  # lookup=None: row k of the table belongs to contribution k
    torch.testing.assert_close(scatter_rows(index, 9, rows, None, weights, method), expected)
    order = torch.argsort(index, stable=True)  # an index given in order: the segment method skips its sort
    got = scatter_rows(index[order], 9, table, lookup[order], weights[order], method, index_sorted=True)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="unknown scatter method"):
        scatter_rows(index, 9, table, lookup, weights, "atomic")


def test_segment_offsets_by_counting_and_by_search_agree():
    index = torch.tensor([0, 0, 2, 2, 2, 5])
    expected = [0, 2, 2, 5, 5, 5, 6, 6]  # rows 0..6 of 7, and the end
    for count in (True, False):
        for keys in (index, index.to(torch.int32)):
            assert segment_offsets(keys, 7, count=count).tolist() == expected


def test_default_scatter_method_and_make_path():
    assert default_method(torch.device("cpu")) == "segment"
    assert default_method(torch.device("cuda")) == "index_add"
    spec, coords, _ = _problem("mf", None)
    path = make_path("minibatch", spec, coords, Objective())
    assert isinstance(path, MiniBatchPath) and path.scatter == "segment"
    with pytest.raises(ValueError, match="unknown scatter method"):
        MiniBatchPath(coords, Objective(), scatter="atomic")


# ------------------------------------------------------------------ the automatic choice


def test_auto_batch_size_is_a_bounded_share_of_the_ratings():
    assert auto_batch_size(10_000_000) == 200_000  # 1/50 of the ratings
    assert auto_batch_size(100_000_000) == path_choice.MAX_AUTO_BATCH
    assert auto_batch_size(3_000_000) == 60_000
    assert auto_batch_size(500_000) == path_choice.MIN_AUTO_BATCH
    assert auto_batch_size(1_000) == 1_000  # never more than the ratings


def test_choose_path_small_data_keeps_the_full_batch_rule():
    cpu = torch.device("cpu")
    # ML-100K's shape (4% observed): CSR; a dense Jester-like grid: dense
    ml100k = ModelSpec("biased-mf", 943, 1682, 100)
    choice = choose_path(ml100k, 80_000, cpu, optimizer="flowadam")
    assert (choice.representation, choice.batch_size) == ("sparse", None)
    jester = ModelSpec("mf", 7_000, 100, 20)
    choice = choose_path(jester, 400_000, cpu, optimizer="adam")
    assert (choice.representation, choice.batch_size) == ("dense", None) and "dense grid" in choice.reason
    # a grid holding a cell twice cannot be dense
    assert choose_path(jester, 400_000, cpu, duplicates=True).representation == "sparse"


def test_choose_path_large_data_takes_minibatches():
    cpu = torch.device("cpu")
    spec = ModelSpec("biased-mf", 62_000, 10_000, 20)
    n = 10_000_000

    def never() -> bool:  # sizing a dense grid needs a pass over the data: not asked when not needed
        raise AssertionError("duplicates were checked")

    choice = choose_path(spec, n, cpu, optimizer="adam", duplicates=never)
    assert choice == path_choice.auto_minibatch(n, cpu, choice.reason.split(": mini-batches of")[0])
    assert (choice.representation, choice.batch_size) == ("minibatch", 200_000)
    assert f"{n:,} training ratings" in choice.reason and "mini-batches of 200,000" in choice.reason
    assert "one torch thread" in choice.reason  # on the CPU
    assert PathChoice(**choice.to_dict()) == choice  # a refit takes the first run's choice from its dict
    # L-BFGS needs full batches: CSR, whatever the size
    assert choose_path(spec, n, cpu, optimizer="lbfgs", duplicates=never).representation == "sparse"
    # below the threshold but nothing full-batch fits the memory budget: mini-batches too
    small = path_choice.MINIBATCH_MIN_RATINGS - 1
    budget = estimate_bytes("sparse", spec, small) - 1
    choice = choose_path(spec, small, cpu, budget_bytes=budget, duplicates=never)
    assert choice.representation == "minibatch" and "memory budget" in choice.reason
    with pytest.raises(ValueError, match="lbfgs needs full batches"):
        choose_path(spec, small, cpu, optimizer="lbfgs", budget_bytes=budget, duplicates=never)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scatter", SCATTER_METHODS)
@pytest.mark.parametrize("model,biases,loss", CASES)
def test_minibatch_path_matches_autograd_on_cuda(model, biases, loss, scatter):
    spec, coords, params = _problem(model, biases)
    dev = torch.device("cuda")
    weights = {k: v.to(dev) for k, v in _frequency_weights(spec, coords).items()}
    coords = Coords(coords.users.to(dev), coords.items.to(dev), coords.values.to(dev),
                    None if coords.contexts is None else coords.contexts.to(dev))
    params = {k: v.detach().to(dev).requires_grad_(True) for k, v in params.items()}
    obj = Objective(reg=0.07, bias_reg=0.02, loss=loss, huber_delta=0.8, offset=0.37, weights=weights)
    batch = coords.select(torch.arange(0, len(coords), 3, device=dev))
    ref_loss, ref_grads = AutogradPath(coords, obj).loss_and_grad(params, batch)
    got_loss, got_grads = MiniBatchPath(coords, obj, scatter=scatter).loss_and_grad(params, batch)
    assert got_loss.device.type == "cuda"
    assert abs(float(got_loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    for name in params:
        assert got_grads[name].device.type == "cuda"
        assert _rel(got_grads[name], ref_grads[name]) <= 1e-5, name


# ------------------------------------------------------------------ the fused CPU kernel (numba)

FUSED_CASES = [("mf", None, "mse"), ("mf", None, "huber"), ("biased-mf", None, "mse"), ("biased-mf", None, "huber")]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weighting", ["uniform", "frequency"])
@pytest.mark.parametrize("model,biases,loss", FUSED_CASES)
def test_fused_kernel_matches_autograd(model, biases, loss, weighting, dtype, threads, monkeypatch):
    """The one-pass numba gradient (what the CPU mini-batch path runs for MF and biased MF), on one
    thread and split between two (forced here on small batches)."""
    from recsys_flowadam import kernel_pool
    from recsys_flowadam.models import fused_cpu

    if not fused_cpu.available():
        pytest.skip("numba is not installed")
    monkeypatch.setattr(kernel_pool, "KERNEL_THREADS", threads)
    monkeypatch.setattr(fused_cpu, "PARALLEL_MIN_RATINGS", 0)
    spec, coords, params = _problem(model, biases)
    coords = Coords(coords.users, coords.items, coords.values.to(dtype))
    params = {k: p.to(dtype) for k, p in params.items()}
    weights = _frequency_weights(spec, coords) if weighting == "frequency" else None
    obj = Objective(reg=0.07, bias_reg=0.02, loss=loss, huber_delta=0.8, offset=0.37, weights=weights)
    path = MiniBatchPath(coords, obj)  # the default: fused where it applies
    assert path.fused and fused_cpu.supports(params, obj, torch.device("cpu"))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for b in (coords.select(torch.arange(0, len(coords), 3)), None):
        ref_loss, ref_grads = AutogradPath(coords, obj).loss_and_grad(params, b)
        got_loss, got_grads = path.loss_and_grad(params, b)
        assert list(got_grads) == list(params)
        assert abs(float(got_loss) - float(ref_loss)) <= tol * abs(float(ref_loss))
        for name in params:
            assert got_grads[name].dtype == dtype
            assert _rel(got_grads[name], ref_grads[name]) <= tol, name


@pytest.mark.parametrize("by_user", [False, True])
def test_fused_kernel_on_two_threads_gives_one_threads_sums(by_user, monkeypatch):
    """Split at the batch's middle rating's user, the two halves write their own users' rows, each
    rating's g and the same loss; the items' gradients differ by float rounding only. Batches in
    any order (the split is then uneven) and laid out user by user (an even split)."""
    from recsys_flowadam import kernel_pool
    from recsys_flowadam.models import fused_cpu

    if not fused_cpu.available():
        pytest.skip("numba is not installed")
    spec, coords, params = _problem("biased-mf", None, n=600)
    params = {k: p.double() for k, p in params.items()}
    if by_user:
        order = torch.argsort(coords.users, stable=True)
        coords = Coords(coords.users[order], coords.items[order], coords.values[order])
    coords = Coords(coords.users, coords.items, coords.values.double())
    extra = torch.linspace(-0.3, 0.3, len(coords), dtype=torch.float64)
    obj = Objective(reg=0.07, bias_reg=0.02, loss="huber", huber_delta=0.8, offset=0.37,
                    weights=_frequency_weights(spec, coords))
    monkeypatch.setattr(fused_cpu, "PARALLEL_MIN_RATINGS", 0)
    got = {}
    for threads in (1, 2):
        monkeypatch.setattr(kernel_pool, "KERNEL_THREADS", threads)
        got[threads] = fused_cpu.loss_and_grad(params, coords, obj, extra=extra, with_g=True)
    (loss1, grads1, g1), (loss2, grads2, g2) = got[1], got[2]
    assert float(loss2) == pytest.approx(float(loss1), rel=1e-13)
    assert torch.equal(g1, g2)
    assert torch.equal(grads1["user_factors"], grads2["user_factors"])
    assert torch.equal(grads1["user_bias"], grads2["user_bias"])
    for name in ("item_factors", "item_bias"):
        assert _rel(grads2[name], grads1[name]) <= 1e-13, name


def test_kernel_thread_pool_works_in_a_forked_child(monkeypatch):
    """A process forked after the pool ran has no worker thread: its next call makes a new pool
    instead of waiting forever on the old one."""
    import multiprocessing

    from recsys_flowadam import kernel_pool

    monkeypatch.setattr(kernel_pool, "KERNEL_THREADS", 2)
    assert kernel_pool.in_two(lambda: 1, lambda: 2) == (1, 2)  # the pool and its worker exist now
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        assert pool.apply_async(_halves_in_child).get(timeout=60) == (3, 4)


def _halves_in_child() -> tuple[int, int]:
    from recsys_flowadam import kernel_pool

    kernel_pool.KERNEL_THREADS = 2
    return kernel_pool.in_two(lambda: 3, lambda: 4)


def test_kernel_threads_come_from_the_environment(monkeypatch):
    from recsys_flowadam import kernel_pool

    monkeypatch.setenv(kernel_pool.THREADS_VARIABLE, "1")
    assert kernel_pool._default_threads() == 1
    monkeypatch.setenv(kernel_pool.THREADS_VARIABLE, "3")
    with pytest.raises(ValueError, match="RECSYS_FLOWADAM_KERNEL_THREADS must be 1 or 2"):
        kernel_pool._default_threads()
    monkeypatch.setattr(kernel_pool, "KERNEL_THREADS", 2)
    with kernel_pool.kernel_threads(1):
        assert kernel_pool.KERNEL_THREADS == 1
    assert kernel_pool.KERNEL_THREADS == 2  # restored
    with kernel_pool.kernel_threads(None):  # None: as it is
        assert kernel_pool.KERNEL_THREADS == 2


@pytest.mark.parametrize("threads", [1, 2])
def test_background_work_runs_on_the_worker_or_here_and_keeps_its_error(monkeypatch, threads):
    import threading

    from recsys_flowadam import kernel_pool

    monkeypatch.setattr(kernel_pool, "KERNEL_THREADS", threads)
    here = threading.current_thread()
    ran_on = kernel_pool.in_background(threading.current_thread).result(timeout=60)
    assert (ran_on is here) == (threads == 1)

    def fails():
        raise ValueError("broken work")

    pending = kernel_pool.in_background(fails)  # the caller goes on; the error comes with the result
    with pytest.raises(ValueError, match="broken work"):
        pending.result(timeout=60)
    # an in_two submitted after background work waits for it instead of failing
    slow = kernel_pool.in_background(lambda: sum(range(200_000)))
    assert kernel_pool.in_two(lambda: 1, lambda: 2) == (1, 2) and slow.result(timeout=60) == sum(range(200_000))


def test_median_user_halves_the_ratings_in_any_order():
    from recsys_flowadam.models import fused_cpu

    if not fused_cpu.available():
        pytest.skip("numba is not installed")

    users = np.array([5, 0, 5, 2, 5, 2, 7, 0, 5, 1])  # sorted: 0 0 1 2 2 | 5 5 5 5 7
    assert fused_cpu.median_user(users, 9) == 5 == int(np.sort(users)[len(users) // 2])
    assert fused_cpu.median_user(np.sort(users), 9) == 5
    assert fused_cpu.median_user(np.array([], dtype=np.int64), 9) == 9  # no ratings: all users in the first half
    rng = np.random.default_rng(3)  # grouped (read at the middle) or not (counted): the same user
    for n in (1, 2, 3, 8, 101):
        for _ in range(50):
            users = rng.integers(0, 6, n)
            counted = int(np.searchsorted(np.cumsum(np.bincount(users, minlength=6)), n // 2, side="right"))
            assert fused_cpu.median_user(users, 6) == counted == fused_cpu.median_user(np.sort(users), 6)


def test_user_segments_of_grouped_ratings_count_what_the_sort_counts():
    """Ratings grouped by user are read in place (binary search for the range, no order array); the
    segment bounds are the counting sort's of the same ratings in another order, for every range."""
    from recsys_flowadam.models import fused_cpu

    if not fused_cpu.available():
        pytest.skip("numba is not installed")
    from recsys_flowadam.models.fused_kernels import user_segments

    rng = np.random.default_rng(5)
    for n, n_users in ((0, 4), (1, 4), (9, 3), (200, 17), (1000, 60)):
        grouped = np.sort(rng.integers(0, n_users, n))
        shuffled = grouped[::-1].copy()  # (descending: not grouped, whenever two users differ)
        for u_lo, u_hi in ((0, -1), (0, n_users // 2), (n_users // 2, -1), (1, 1), (3, 2), (n_users, -1)):
            start, order, offset = user_segments(grouped, n_users, u_lo, u_hi)
            ref_start, ref_order, ref_offset = user_segments(shuffled, n_users, u_lo, u_hi)
            hi = n_users if u_hi < 0 else u_hi
            assert offset == int((grouped < u_lo).sum()) and len(order) == 0
            assert ref_offset == -1 or n == 0 or grouped[0] == grouped[-1]
            assert np.array_equal(start, ref_start), (n, u_lo, u_hi)
            for u in range(u_lo, hi):  # user u's segment holds its ratings and no other
                assert np.all(grouped[offset + start[u]:offset + start[u + 1]] == u)
                assert start[u + 1] - start[u] == int((grouped == u).sum())
            assert start[n_users] == int(((grouped >= u_lo) & (grouped < hi)).sum())
    with pytest.raises(IndexError):  # out of range, grouped or not, is refused
        user_segments(np.array([0, 1, 4]), 4)
    with pytest.raises(IndexError):
        user_segments(np.array([-1, 0, 1]), 4)


def test_fused_kernel_keeps_a_nan_and_falls_back_without_numba(monkeypatch):
    from recsys_flowadam.models import fused_cpu

    spec, coords, params = _problem("biased-mf", None)
    obj = Objective(reg=0.07, bias_reg=0.02, offset=0.37)
    if fused_cpu.available():
        bad = {k: p.clone() for k, p in params.items()}
        bad["user_factors"][0, 0] = float("nan")
        loss, _ = MiniBatchPath(coords, obj).loss_and_grad(bad, coords)
        assert torch.isnan(loss)  # the trainer's non-finite check still sees it
    want_loss, want = MiniBatchPath(coords, obj, scatter="segment").loss_and_grad(params, coords)
    monkeypatch.setattr(fused_cpu, "_KERNELS", {})  # as without numba
    assert not fused_cpu.available()
    loss, grads = MiniBatchPath(coords, obj).loss_and_grad(params, coords)
    assert float(loss) == float(want_loss) and all(torch.equal(grads[k], want[k]) for k in params)
    with pytest.raises(ValueError, match="numba"):
        MiniBatchPath(coords, obj, scatter="fused")


def test_fused_kernel_refuses_an_index_outside_the_tables():
    from recsys_flowadam.models import fused_cpu

    if not fused_cpu.available():
        pytest.skip("numba is not installed")
    spec, coords, params = _problem("biased-mf", None)
    bad = Coords(coords.users.clone(), coords.items, coords.values)
    bad.users[3] = spec.n_users  # one past the last user row
    with pytest.raises(IndexError, match="outside the factor tables"):
        MiniBatchPath(coords, Objective(reg=0.1)).loss_and_grad(params, bad)


def test_time_bins_do_not_count_as_grid_cells():
    """The time models' n_contexts are bias bins: their dense grid is users x items, as biased MF's."""
    from recsys_flowadam.models.representation import estimate_bytes, grid_cells

    plain, timed = ModelSpec("biased-mf", 40, 30, 5), ModelSpec("time-svdpp", 40, 30, 5, n_contexts=8)
    assert grid_cells(timed) == grid_cells(plain) == 1200
    assert estimate_bytes("dense", timed, 500) == estimate_bytes("dense", plain, 500)
    assert grid_cells(ModelSpec("cp", 40, 30, 5, n_contexts=8)) == 9600


@pytest.mark.parametrize("halves", [False, True])
def test_fused_kernel_on_ratings_grouped_by_user_matches_autograd(monkeypatch, halves):
    """Laid-out batches come grouped by user: the kernel reads their segments in place instead of
    sorting them (models.fused_kernels.user_segments); the numbers are the shuffled batch's."""
    from recsys_flowadam.models import fused_cpu

    if not fused_cpu.available():
        pytest.skip("numba is not installed")
    if halves:
        monkeypatch.setattr(fused_cpu, "PARALLEL_MIN_RATINGS", 0)
    spec, coords, params = _problem("biased-mf", None)
    obj = Objective(reg=0.05, bias_reg=0.01, offset=1.0)
    grouped = coords.select(torch.argsort(coords.users, stable=True))
    assert bool((grouped.users[1:] >= grouped.users[:-1]).all()) and not bool((coords.users[1:] >= coords.users[:-1]).all())
    path = MiniBatchPath(coords, obj, scatter="fused")
    ref_loss, ref_grads = AutogradPath(coords, obj).loss_and_grad(params, grouped)
    loss, grads = path.loss_and_grad(params, grouped)
    shuffled_loss, shuffled_grads = path.loss_and_grad(params, coords)
    assert abs(float(loss) - float(ref_loss)) <= 1e-10 * abs(float(ref_loss))
    assert float(loss) == pytest.approx(float(shuffled_loss), rel=1e-12)
    for name in params:
        assert _rel(grads[name], ref_grads[name]) <= 1e-10, name
        assert _rel(grads[name], shuffled_grads[name]) <= 1e-12, name


def test_prefetch_hints_compile_here_and_the_fallback_runs_without_them():
    pytest.importorskip("numba")
    import numba

    from recsys_flowadam.models import cpu_prefetch

    # with the numba this project is tested on, the hints are LLVM prefetches (not the silent fallback)
    assert cpu_prefetch.ACTIVE and cpu_prefetch.prefetch is not cpu_prefetch._no_hint

    def hinted_sum(hint):
        @numba.njit
        def run(a):
            total = 0.0
            for i in range(a.shape[0]):
                hint(a, min(i + 1, a.shape[0] - 1), 0)
                total += a[i].sum()
            return total

        return run

    a = np.arange(12.0).reshape(4, 3)
    for hint in (cpu_prefetch.prefetch, cpu_prefetch.prefetch_read, cpu_prefetch._no_hint):
        assert hinted_sum(hint)(a) == a.sum()  # a hint changes no number
    def whole_rows(row_hint):
        @numba.njit
        def hint(arr, row, col):
            row_hint(arr, row)
            row_hint(arr[:, :0], row)  # a row of no elements: nothing to ask for

        return hint

    for row_hint in (cpu_prefetch.prefetch_row, cpu_prefetch.prefetch_row_read):  # every line of a row
        assert hinted_sum(whole_rows(row_hint))(a) == a.sum()
