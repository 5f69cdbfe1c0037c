"""The compiled Adam pass (``optim.fused_adam``): torch's Adam / AdamW to rounding, torch's own
step wherever it does not apply, numbers independent of the thread count, and FlowAdam E's
statistics read in the same pass."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys_flowadam import kernel_pool
from recsys_flowadam.optim import FlowAdam, everyday, fused_adam, make_optimizer

pytestmark = pytest.mark.skipif(fused_adam.kernels() is None, reason="numba is not installed")


def _params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_() for shape in ((37, 5), (11,), (3, 4))]


def _run(opt, params, steps=25, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
    return [p.detach().clone() for p in params]


def _counting(monkeypatch):
    calls = []
    real = fused_adam.adam_step
    monkeypatch.setattr(fused_adam, "adam_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name, cls, weight_decay", [("adam", torch.optim.Adam, 0.0), ("adam", torch.optim.Adam, 0.01),
                                                     ("adamw", torch.optim.AdamW, 0.05)])
def test_compiled_pass_is_torchs_adam_to_rounding(monkeypatch, name, cls, weight_decay, dtype):
    monkeypatch.setattr(fused_adam, "MIN_ELEMENTS", 1)
    calls = _counting(monkeypatch)
    ours, ref = _params(dtype), _params(dtype)
    opt = make_optimizer(name, ours, 0.01, weight_decay=weight_decay, fused=True)
    got = _run(opt, ours)
    want = _run(cls(ref, lr=0.01, weight_decay=weight_decay, fused=True), ref)
    assert len(calls) == 25  # every step took the compiled pass
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)
    assert all(float(opt.state[p]["step"]) == 25.0 for p in ours)


def test_state_dicts_pass_between_the_compiled_pass_and_torch(monkeypatch):
    monkeypatch.setattr(fused_adam, "MIN_ELEMENTS", 1)
    ours, ref = _params(), _params()
    a = make_optimizer("adam", ours, 0.01, fused=True)
    b = torch.optim.Adam(ref, lr=0.01, fused=True)
    _run(a, ours, steps=10)
    _run(b, ref, steps=10)
    a2 = torch.optim.Adam(ours, lr=0.01, fused=True)  # ours' state, continued by torch
    a2.load_state_dict(a.state_dict())
    b2 = make_optimizer("adam", ref, 0.01, fused=True)  # torch's state, continued by ours
    b2.load_state_dict(b.state_dict())
    for g, w in zip(_run(a2, ours, steps=10, seed=2), _run(b2, ref, steps=10, seed=2)):
        torch.testing.assert_close(g, w, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("options", [{"fused": False}, {"fused": True, "amsgrad": True}, {"fused": True, "small": True},
                                     {"fused": True, "no_numba": True}])
def test_everything_else_is_torchs_own_step_bit_for_bit(monkeypatch, options):
    options = dict(options)
    if not options.pop("small", False):
        monkeypatch.setattr(fused_adam, "MIN_ELEMENTS", 1)
    if options.pop("no_numba", False):
        monkeypatch.setattr(fused_adam, "_KERNELS", False)
    calls = _counting(monkeypatch)
    ours, ref = _params(), _params()
    got = _run(make_optimizer("adam", ours, 0.01, **options), ours)
    want = _run(torch.optim.Adam(ref, lr=0.01, **options), ref)
    assert not calls
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_the_numbers_do_not_depend_on_the_thread_count(monkeypatch):
    monkeypatch.setattr(fused_adam, "MIN_ELEMENTS", 1)
    runs = []
    for threads in (1, 2):
        monkeypatch.setattr(kernel_pool, "KERNEL_THREADS", threads)
        params = _params()
        runs.append(_run(make_optimizer("adamw", params, 0.01, weight_decay=0.1, fused=True), params))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("sizes", [[1], [2], [7], [10, 1], [1, 10], [5, 5], [3, 0, 9, 4], [1000, 1, 1]])
def test_the_halves_cover_every_element_once(sizes):
    first, second = fused_adam._halves(sizes)
    covered = [np.zeros(n, dtype=int) for n in sizes]
    for t, lo, hi in first + second:
        assert 0 <= lo < hi <= sizes[t]
        covered[t][lo:hi] += 1
    assert all((c == 1).all() for c in covered)
    n_first = sum(hi - lo for _, lo, hi in first)
    assert n_first == sum(sizes) // 2


def test_the_sums_are_departure_parts_of_the_gradient_and_the_moment_before_the_step(monkeypatch):
    params = _params(torch.float64)
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    ms = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    vs = [torch.rand(p.shape, generator=gen, dtype=p.dtype) for p in params]
    want = everyday.departure_parts(grads, ms)
    steps = [torch.tensor(3.0) for _ in params]
    got = fused_adam.adam_step(params, grads, ms, vs, steps, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8,
                               weight_decay=0.0, decoupled=True, sums=True)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert all(float(s) == 4.0 for s in steps)


def _plateau_run(compiled: bool, monkeypatch):
    """FlowAdam E down a slope onto a plateau (softplus, float64): its plateau trigger fires."""
    monkeypatch.setattr(fused_adam, "MIN_ELEMENTS", 1 if compiled else 10**12)
    x = torch.full((10,), 3.0, dtype=torch.float64, requires_grad=True)
    opt = FlowAdam([x], lr=0.05, mode="E")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.softplus(50 * (x - 1)).sum() / 50
        loss.backward()
        return loss

    for _ in range(120):
        opt.step(closure)
    return x.detach().clone(), opt.diagnostics()


def test_flowadam_e_takes_the_same_steps_and_decisions_with_the_compiled_pass(monkeypatch):
    calls = _counting(monkeypatch)
    x_torch, diag_torch = _plateau_run(False, monkeypatch)
    assert not calls
    x_ours, diag_ours = _plateau_run(True, monkeypatch)
    assert calls  # the compiled pass ran (with the statistics), and the ODE branch fired too
    assert diag_ours == diag_torch and diag_ours["plateau_triggers"] > 0
    torch.testing.assert_close(x_ours, x_torch, rtol=1e-10, atol=1e-12)
    assert math.isfinite(float(x_ours.sum()))


# ------------------------------------------------ the step taken by the gradient kernel (row_step)


def _mf_setup(dtype, seed=0, n_users=300, n_items=40, rank=6, n=3000, biases=True):
    from recsys_flowadam.models import Coords, Objective

    gen = torch.Generator().manual_seed(seed)
    users = torch.randint(0, n_users, (n,), generator=gen)
    items = torch.randint(0, n_items, (n,), generator=gen)
    values = torch.randint(1, 6, (n,), generator=gen).to(dtype)
    params = {"user_factors": 0.1 * torch.randn(n_users, rank, generator=gen, dtype=dtype),
              "item_factors": 0.1 * torch.randn(n_items, rank, generator=gen, dtype=dtype)}
    if biases:
        params |= {"user_bias": torch.zeros(n_users, dtype=dtype), "item_bias": torch.zeros(n_items, dtype=dtype)}
    return Coords(users, items, values), Objective(reg=0.05, bias_reg=0.01, offset=3.0), params


def _run_minibatches(name, fuse, dtype, monkeypatch, grouped=True, halves=False, steps=15, biases=True, **kwargs):
    from recsys_flowadam.models import fused_cpu

    if not fused_cpu.available():
        pytest.skip("numba is not installed")
    monkeypatch.setattr(fused_adam, "MIN_ELEMENTS", 1)
    monkeypatch.setattr(fused_cpu, "PARALLEL_MIN_RATINGS", 0 if halves else 10**9)
    coords, obj, params = _mf_setup(dtype, biases=biases)
    params = {k: p.requires_grad_() for k, p in params.items()}
    opt = make_optimizer(name, params.values(), 0.02, **kwargs)
    opt.fuse_row_steps = fuse
    gen = torch.Generator().manual_seed(1)
    no_grad_after = []
    for _ in range(steps):
        idx = torch.randperm(len(coords), generator=gen)[:700]
        if grouped:  # as laid-out batches come: grouped by user
            idx = idx[torch.argsort(coords.users[idx], stable=True)]
        batch = coords.select(idx)

        def closure():
            loss, grads = fused_cpu.loss_and_grad(params, batch, obj)
            for k, p in params.items():
                p.grad = grads.get(k)
            return loss

        opt.step(closure)
        no_grad_after.append((params["user_factors"].grad is None, params["item_factors"].grad is None))
    return {k: p.detach().clone() for k, p in params.items()}, opt, no_grad_after


def _moments(opt):
    return [(float(st["step"]), st["exp_avg"].clone(), st["exp_avg_sq"].clone()) for st in opt.state.values()]


FIRING = {"warmup_steps": 2, "switch_sensitivity": 1.0}  # preset E made to fire on these batches


@pytest.mark.parametrize("grouped, halves", [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name, kwargs", [("adam", {"fused": True}), ("adamw", {"fused": True, "weight_decay": 0.1}),
                                          ("flowadam", {}), ("flowadam", {"weight_decay": 0.05}),
                                          ("flowadam", FIRING)])
def test_the_kernel_takes_adams_step_on_the_rows_with_the_same_numbers(monkeypatch, name, kwargs, dtype,
                                                                       grouped, halves):
    steps = 150 if kwargs is FIRING else 15
    fused, opt_f, taken = _run_minibatches(name, True, dtype, monkeypatch, grouped, halves, steps=steps, **kwargs)
    plain, opt_p, not_taken = _run_minibatches(name, False, dtype, monkeypatch, grouped, halves, steps=steps,
                                               **kwargs)
    fired = opt_f.diagnostics()["ode_triggers"] if name == "flowadam" else 0
    if kwargs is FIRING:
        assert fired > 0  # the ODE branch's steps keep their gradients: the kernel takes none of them
    users_taken = [u for u, _ in taken]
    items_taken = [i for _, i in taken]
    assert sum(users_taken) == steps - fired and not any(u or i for u, i in not_taken)
    # the items' step is taken where the batch is split in halves, as their gradients are summed
    assert items_taken == (users_taken if halves else [False] * steps)
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    if kwargs is FIRING and dtype == torch.float32 and halves:
        tol = 1e-4  # the items' step taken in the kernel rounds differently; 150 steps with ODE stages carry it
    for k in plain:
        torch.testing.assert_close(fused[k], plain[k], rtol=tol, atol=tol)
    for p_f, p_p in zip(opt_f.param_groups[0]["params"], opt_p.param_groups[0]["params"]):
        assert float(opt_f.state[p_f]["step"]) == float(opt_p.state[p_p]["step"]) == steps - fired
        torch.testing.assert_close(opt_f.state[p_f]["exp_avg_sq"], opt_p.state[p_p]["exp_avg_sq"], rtol=tol, atol=tol)
    if name == "flowadam":
        assert opt_f.diagnostics() == opt_p.diagnostics()
        assert opt_f._noise.state()["count"] == opt_p._noise.state()["count"]
        np.testing.assert_allclose(opt_f._noise.mean, opt_p._noise.mean, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["adam", "flowadam"])
def test_the_rows_step_of_mf_without_biases_and_on_one_or_two_threads(monkeypatch, name, dtype):
    """mf (no biases): the kernel takes the rows' steps with the optimizer's numbers; and the
    numbers of a run whose halves take them do not depend on the kernels' thread count."""
    from recsys_flowadam import kernel_pool

    kwargs = {"fused": True} if name == "adam" else {}
    fused, opt_f, taken = _run_minibatches(name, True, dtype, monkeypatch, halves=True, biases=False, **kwargs)
    plain, _, _ = _run_minibatches(name, False, dtype, monkeypatch, halves=True, biases=False, **kwargs)
    assert set(fused) == {"user_factors", "item_factors"} and all(u and i for u, i in taken)
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    for k in plain:
        torch.testing.assert_close(fused[k], plain[k], rtol=tol, atol=tol)
    monkeypatch.setattr(kernel_pool, "KERNEL_THREADS", 1)
    one, opt_one, _ = _run_minibatches(name, True, dtype, monkeypatch, halves=True, **kwargs)
    monkeypatch.setattr(kernel_pool, "KERNEL_THREADS", 2)
    two, opt_two, _ = _run_minibatches(name, True, dtype, monkeypatch, halves=True, **kwargs)
    assert all(torch.equal(one[k], two[k]) for k in one)
    for (s1, m1, v1), (s2, m2, v2) in zip(_moments(opt_one), _moments(opt_two)):
        assert s1 == s2 and torch.equal(m1, m2) and torch.equal(v1, v2)
    if name == "flowadam":
        np.testing.assert_array_equal(opt_one._noise.mean, opt_two._noise.mean)


def test_no_offer_where_it_cannot_be_taken_as_offered(monkeypatch):
    """Adam's L2 weight decay (in the gradient) is not offered; a step the kernel cannot take (time
    models' extra terms) leaves every gradient to the optimizer."""
    from recsys_flowadam.row_step import AdamRowStep, RowStepOffer, offering

    params, opt, taken = _run_minibatches("adam", True, torch.float64, monkeypatch, fused=True, weight_decay=0.1)
    assert not any(u or i for u, i in taken)
    from recsys_flowadam.models import fused_cpu

    coords, obj, params = _mf_setup(torch.float64)
    offer = RowStepOffer()
    for p in params.values():
        offer.add(p, AdamRowStep(torch.zeros_like(p), torch.zeros_like(p), (0.9, 0.999, 0.01, 0.1, 1e-8, 1.0)))
    with offering(offer):
        _, grads = fused_cpu.loss_and_grad(params, coords, obj, extra=torch.zeros(len(coords), dtype=torch.float64))
    assert set(grads) == set(params) and not offer.taken(params["user_factors"])
    with offering(offer):
        _, grads = fused_cpu.loss_and_grad(params, coords, obj)
    assert set(grads) == {"item_factors", "item_bias"} and offer.taken(params["user_factors"])
    assert not offer.taken(params["item_factors"])  # a whole batch: its item gradients need no sum
    monkeypatch.setattr(fused_cpu, "PARALLEL_MIN_RATINGS", 0)  # split in halves: every step is taken
    offer = RowStepOffer()
    for p in params.values():
        offer.add(p, AdamRowStep(torch.zeros_like(p), torch.zeros_like(p), (0.9, 0.999, 0.01, 0.1, 1e-8, 1.0)))
    with offering(offer):
        _, grads = fused_cpu.loss_and_grad(params, coords, obj)
    assert grads == {} and all(offer.taken(p) for p in params.values())



def test_a_differentiable_step_keeps_its_graph_and_a_scaled_step_its_inf_check(monkeypatch):
    """Both are torch's step: the differentiable one records the update in autograd; under AMP's
    GradScaler a step whose gradients hold an inf is skipped."""
    monkeypatch.setattr(fused_adam, "MIN_ELEMENTS", 1)
    x = torch.ones(4, requires_grad=True)
    leaf = x.clone()
    opt = make_optimizer("adam", [leaf], 0.1, differentiable=True)
    leaf.grad = torch.ones(4)
    opt.step()
    assert leaf.grad_fn is not None  # the step is part of the graph, as torch's is
    p = torch.ones(4, requires_grad=True)
    opt = make_optimizer("adam", [p], 0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu")
    loss = (p * torch.tensor([1.0, 1.0, float("inf"), 1.0])).sum()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(p.detach(), torch.ones(4))  # skipped: an inf in the gradients
