"""Tests that pin what mutation testing found unpinned (issue 16).

Each test here fails on one-line bugs that every other test let through. First the six that
were seeded by hand: FlowAdam's plateau boundary, the dopri5 tableau (a node and an embedded
weight), the frequency weights the trainer builds, the Jester Dataset 2 "not rated" sentinel,
and validation during training honouring ``clip_predictions``. Then the survivors of a mutmut
run (``bench/mutation.sh``, see README "Development"): the trigger thresholds and their
disabled state, dopri5's error norm, starting step, step budget and failure messages,
validation of cp models in their contexts, and the early-stopping record and its agreement.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from recsys_flowadam.data import DataError, load_dataset
from recsys_flowadam.data.ratings import Ratings, RatingScale
from recsys_flowadam.optim import FlowAdam, ode
from recsys_flowadam.optim.flowadam import PLATEAU, STIFF, trigger_code
from recsys_flowadam.train import TrainConfig, evaluate_predictor, train_model

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


# ---------------------------------------- FlowAdam: the trigger rule, its statistics, injection


def _code(n: float, c: float, n_bar: float, c_bar: float, switch: float, curvature: float) -> int:
    t = lambda x: torch.tensor(x, dtype=F64)  # noqa: E731
    return int(trigger_code(t(n), t(c), t(n_bar), t(c_bar), switch, curvature))


def test_trigger_conditions_are_strict_inequalities():
    # On the boundary neither condition holds: plateau is n < s * n_bar, stiff is c > k * c_bar.
    assert _code(0.5, 1.0, 1.0, 1.0, switch=0.5, curvature=1.0) == 0
    assert _code(0.5 - 1e-12, 1.0, 1.0, 1.0, switch=0.5, curvature=1.0) == PLATEAU
    assert _code(1.0, 3.0 + 1e-12, 1.0, 1.0, switch=0.5, curvature=3.0) == STIFF
    # An exactly zero gradient with switch_sensitivity=0 is no plateau (0 < 0 is false).
    assert _code(0.0, 0.0, 0.0, 0.0, switch=0.0, curvature=3.0) == 0


def test_trigger_thresholds_scale_with_the_averages():
    # The thresholds are products s * n_bar and k * c_bar (averages away from 1 tell them apart
    # from s / n_bar); both bits can hold at once.
    assert _code(0.9, 1.0, 2.0, 4.0, switch=0.5, curvature=1.0) == PLATEAU  # 0.9 < 1.0; 1.0 > 4.0 fails
    assert _code(0.3, 1.0, 2.0, 4.0, switch=0.1, curvature=1.0) == 0  # 0.3 < 0.2 fails
    assert _code(2.0, 1.5, 2.0, 2.0, switch=0.5, curvature=1.0) == 0  # 1.5 > 2.0 fails
    assert _code(2.0, 1.5, 2.0, 0.5, switch=0.5, curvature=2.0) == STIFF  # 1.5 > 1.0
    assert _code(0.1, 9.0, 2.0, 2.0, switch=0.5, curvature=2.0) == PLATEAU | STIFF
    code = trigger_code(*(torch.tensor(x, dtype=F64) for x in (0.1, 9.0, 2.0, 2.0)), 0.5, 2.0)
    assert code.dim() == 0 and not torch.is_floating_point(code) and code.dtype != torch.bool


def test_zero_gradient_with_switch_zero_never_takes_the_ode_branch():
    # switch_sensitivity=0 with a finite curvature_sensitivity still evaluates the trigger rule
    # (only switch=0 together with curvature=inf skips it), so the boundary decides here.
    x = torch.ones(3, dtype=F64, requires_grad=True)
    opt = FlowAdam([x], lr=0.1, switch_sensitivity=0.0, curvature_sensitivity=3.0, warmup_steps=0,
                   ode_method="euler")

    def closure():
        x.grad = torch.zeros_like(x)  # a flat loss: the gradient is exactly zero everywhere
        return torch.zeros((), dtype=F64)

    for _ in range(5):
        opt.step(closure)
    d = opt.diagnostics()
    assert (d["steps"], d["ode_triggers"], d["plateau_triggers"], d["stiff_triggers"]) == (5, 0, 0, 0)
    assert d["grad_evals"] == 5  # one closure call per step: no ODE stages were evaluated
    assert torch.equal(x.detach(), torch.ones(3, dtype=F64))  # Adam with g = 0 does not move


def test_inject_momentum_names_an_unknown_injection():
    from recsys_flowadam.optim.flowadam import inject_momentum

    m, v = [torch.ones(2, dtype=F64)], [torch.ones(2, dtype=F64)]
    with pytest.raises(ValueError, match=r"injection must be one of \(.*'soft'.*\), got 'soft-ish'"):
        inject_momentum(m, v, 0.5, "soft-ish")
    assert m[0].tolist() == [1.0, 1.0]


def _fixed_gradients(opt_kwargs, grads):
    """FlowAdam on one parameter whose gradient is ``grads[k]`` at step k; its diagnostics."""
    x = torch.zeros(2, dtype=F64, requires_grad=True)
    opt = FlowAdam([x], lr=0.01, ode_method="euler", injection="none", **opt_kwargs)
    current = [None]

    def closure():
        x.grad = current[0].clone()
        return torch.zeros((), dtype=F64)

    for g in grads:
        current[0] = torch.tensor(g, dtype=F64)
        opt.step(closure)
    return opt.diagnostics()


def test_a_plateau_only_configuration_still_fires():
    # curvature_sensitivity=inf disables the stiff test only: a norm drop below
    # switch * n_bar must still take the ODE branch (the triggers are off only when both are).
    grads = [[1.0, 0.0]] * 3 + [[0.1, 0.0]]
    d = _fixed_gradients(dict(switch_sensitivity=0.9, curvature_sensitivity=math.inf, warmup_steps=0), grads)
    assert (d["ode_triggers"], d["plateau_triggers"], d["stiff_triggers"]) == (1, 1, 0)


def test_disabled_triggers_never_read_the_device(monkeypatch):
    # switch_sensitivity=0 and curvature_sensitivity=inf: plain AdamW, no trigger decision and
    # so no host synchronisation (.item()) at any step.
    calls = [0]
    original = torch.Tensor.item

    def counting_item(self):
        calls[0] += 1
        return original(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    d = _fixed_gradients(dict(switch_sensitivity=0.0, curvature_sensitivity=math.inf, warmup_steps=0),
                         [[1.0, 0.0], [0.1, 5.0]] * 3)
    assert calls[0] == 0 and d["steps"] == 6 and d["ode_triggers"] == 0


def test_gradient_statistics_of_half_precision_gradients_are_in_the_stat_dtype():
    from recsys_flowadam.optim.flowadam import gradient_statistics

    g = [torch.tensor([3.0, 4.0], dtype=torch.bfloat16), torch.tensor([12.0], dtype=torch.bfloat16)]
    prev = [torch.zeros(2, dtype=torch.bfloat16), torch.tensor([2.0], dtype=torch.bfloat16)]
    n, c = gradient_statistics(g, prev, torch.device("cpu"), torch.float32)
    assert (n.dtype, c.dtype) == (torch.float32, torch.float32) and n.dim() == c.dim() == 0
    assert float(n) == 13.0 and float(c) == pytest.approx(math.sqrt(25.0 + 100.0), rel=1e-6)  # |g - prev|
    assert all(torch.equal(p, q) for p, q in zip(prev, g))  # g_prev <- g


# ------------------------------------- dopri5: tableau, error norm, step control, failures


def _as_fraction(x: float) -> Fraction:
    return Fraction(x).limit_denominator(10**7)


def test_dopri5_tableau_is_consistent():
    c, a, b, b_low = ode._DP_C, ode._DP_A, ode._DP_B, ode._DP_B_LOW
    assert len(c) == len(a) == len(b) == len(b_low) == 7
    assert c[0] == 0.0 and a[0] == ()
    for i in range(1, 7):
        assert len(a[i]) == i
        assert sum(a[i]) == pytest.approx(c[i], abs=1e-14), f"row {i} of A does not sum to C[{i}]"
    assert sum(b) == pytest.approx(1.0, abs=1e-14)
    assert sum(b_low) == pytest.approx(1.0, abs=1e-14)
    assert tuple(a[6]) + (0.0,) == tuple(b)  # FSAL: the last stage is f at the new state
    assert ode._DP_E == tuple(x - y for x, y in zip(b, b_low))


@pytest.mark.parametrize("which, order", [("_DP_B", 5), ("_DP_B_LOW", 4)])
def test_dopri5_weights_meet_the_quadrature_order_conditions(which, order):
    # sum_i w_i c_i^k = 1/(k+1) for k < order: exact for polynomial-in-t fields of degree < order.
    c = [_as_fraction(x) for x in ode._DP_C]
    w = [_as_fraction(x) for x in getattr(ode, which)]
    for k in range(order):
        assert sum(wi * ci**k for wi, ci in zip(w, c)) == Fraction(1, k + 1), f"{which}, k={k}"
    if which == "_DP_B_LOW":  # the embedded solution is of order 4 exactly, not 5
        assert sum(wi * ci**4 for wi, ci in zip(w, c)) != Fraction(1, 5)


def test_combine_with_only_zero_coefficients_copies_the_state():
    # _combine(y, h, a, ks) is y + h * sum a_j ks_j, skipping zero coefficients; with none left,
    # a fresh copy of y (or zeros shaped like the stages when y is None).
    y, k = (torch.tensor([1.0, 2.0], dtype=F64),), (torch.tensor([5.0, 7.0], dtype=F64),)
    out = ode._combine(y, 0.5, (0.0,), (k,))
    assert out[0].tolist() == [1.0, 2.0] and out[0] is not y[0]
    assert ode._combine(None, 0.5, (0.0,), (k,))[0].tolist() == [0.0, 0.0]
    assert ode._combine(y, 0.5, (0.0, 2.0), (k, k))[0].tolist() == [6.0, 9.0]
    assert ode._combine(None, 0.5, (2.0,), (k,))[0].tolist() == [5.0, 7.0]


def _scalar_field(g):
    """dy/dt = g(t) as odeint's tuple-of-tensors field; records the times it is evaluated at."""
    times: list[float] = []

    def f(t, y):
        times.append(t)
        return (torch.full_like(y[0], g(t)),)

    return f, times


def _dopri5_from_zero(f, t1: float, tol: float):
    """dopri5 from y(0) = 0 (a float64 scalar state) to ``t1`` at rtol = atol = ``tol``."""
    return ode.odeint(f, (torch.zeros((), dtype=F64),), t1, method="dopri5", rtol=tol, atol=tol)


@pytest.mark.parametrize("degree", [1, 2, 3, 4])
def test_dopri5_integrates_polynomials_in_t_exactly(degree):
    # The fifth-order weights integrate t^k, k <= 4, without error on every step, whatever the
    # step sizes; a wrong node C[i] or weight B[i] breaks this at once.
    f, times = _scalar_field(lambda t: (degree + 1) * t**degree)
    res = _dopri5_from_zero(f, 2.0, tol=1e-6)
    assert float(res.y[0]) == pytest.approx(2.0 ** (degree + 1), rel=1e-13)
    assert min(times) == 0.0 and max(times) <= 2.0


def test_dopri5_error_estimate_vanishes_on_cubics():
    # Both weight sets integrate t^3 exactly, so the embedded error estimate is zero and every
    # step is accepted and ten times the one before (the growth cap), up to the last one, which
    # is cut to end at t1. A wrong B_LOW weight makes the estimate non-zero and the steps shrink.
    f, times = _scalar_field(lambda t: 4 * t**3)
    res = _dopri5_from_zero(f, 1.0, tol=1e-8)
    assert float(res.y[0]) == pytest.approx(1.0, rel=1e-13)
    assert res.n_rejected == 0 and res.n_evals == len(times) == 2 + 6 * res.n_steps
    # times: f(0), the initial-step probe, then 6 stages per step, the last at t + h (C[6] = 1)
    ends = [0.0] + times[7::6]
    steps = [b - a for a, b in zip(ends, ends[1:])]
    assert len(steps) == res.n_steps >= 3 and ends[-1] == 1.0
    for h, h_next in zip(steps[:-2], steps[1:-1]):
        assert h_next == pytest.approx(10 * h, rel=1e-9)


def test_dopri5_on_cos_t_is_accurate_and_takes_few_steps():
    # y' = cos t, y(0) = 0 over [0, 10]: y(10) = sin 10. A wrong embedded weight leaves an O(h)
    # error estimate, and the step control shrinks h until max_steps runs out.
    f, _ = _scalar_field(math.cos)
    res = _dopri5_from_zero(f, 10.0, tol=1e-8)
    assert float(res.y[0]) == pytest.approx(math.sin(10.0), abs=1e-7)
    assert res.n_evals == 2 + 6 * (res.n_steps + res.n_rejected)
    # The standard controller (accept at ratio <= 1, h *= clip(0.9 ratio^(-1/5), 0.2, 10)) takes
    # 42 steps and rejects 5 here; accepting larger errors or another exponent changes both.
    assert (res.n_steps, res.n_rejected) == (42, 5)


def test_dopri5_on_a_zero_field_grows_the_step_tenfold():
    # f = 0 (a flat loss: every clipped gradient is zero): the error estimate is exactly 0, so each
    # step is ten times the last, from Hairer's 1e-6 guess, and nothing moves.
    times: list[float] = []

    def zero(t, y):
        times.append(t)
        return tuple(torch.zeros_like(x) for x in y)

    y0 = (torch.ones(3, dtype=F64),)
    res = ode.odeint(zero, y0, 1.0, method="dopri5")
    assert torch.equal(res.y[0], y0[0]) and (res.n_steps, res.n_rejected) == (7, 0)
    assert times[7::6] == pytest.approx([1e-6, 1.1e-5, 1.11e-4, 1.111e-3, 1.1111e-2, 0.111111, 1.0], rel=1e-12)


def test_dopri5_failures_say_what_went_wrong():
    def nan_after_half(t, y):  # the solve reaches t = 0.1111 before a stage sees a NaN
        return (torch.full_like(y[0], math.nan if t > 0.5 else 1.0),)

    y0 = (torch.zeros((), dtype=F64),)
    with pytest.raises(ode.ODEFailure, match=r"dopri5: non-finite error estimate at t=0\.1111"):
        ode.odeint(nan_after_half, y0, 1.0, method="dopri5")

    def huge(t, y):  # y overflows to inf while the error estimate stays 0 (relative to inf)
        return (torch.full_like(y[0], 1e308),)

    with pytest.raises(ode.ODEFailure, match=r"dopri5: non-finite state at t=1\.0"):
        ode.odeint(huge, (torch.full((), 1e308, dtype=F64),), 1.0, method="dopri5")


def _decay_problem(*shapes):
    """dy/dt = -y from y = 1 in tensors of the given shapes; records the evaluation times."""
    times: list[float] = []

    def f(t, y):
        times.append(t)
        return tuple(-x for x in y)

    return f, tuple(torch.ones(s, dtype=F64) for s in shapes), times


def test_dopri5_error_norm_is_a_root_mean_square_per_tensor():
    # The same scalar ODE held once, or copied into 1000 or 2 x 3 elements: an RMS norm (per
    # tensor, the maximum over tensors) sees the same error, so the steps and results agree (up to
    # the rounding of the norms).
    runs = []
    for shapes in [((),), ((1000,),), ((2, 3), ())]:
        f, y0, times = _decay_problem(*shapes)
        res = ode.odeint(f, y0, 3.0, method="dopri5", rtol=1e-7, atol=1e-7)
        runs.append((res.n_steps, res.n_rejected, times, [float(t.reshape(-1)[0]) for t in res.y]))
    (steps, rejected, times, (y,)), *others = runs
    assert steps > 3 and y == pytest.approx(math.exp(-3.0), abs=1e-6)
    for other_steps, other_rejected, other_times, ys in others:
        assert (other_steps, other_rejected) == (steps, rejected)
        assert other_times == pytest.approx(times, rel=1e-6) and ys == pytest.approx([y] * len(ys), rel=1e-9)


def test_dopri5_first_step_is_hairers_starting_guess():
    # y' = -y, y(0) = 1 at rtol = atol = 1e-6: scale = 2e-6, d0 = d1 = 5e5, h0 = 0.01, d2 = 5e5,
    # so the first step is (0.01 / 5e5) ** (1/5) (order 4 + 1; below 100 * h0); it is accepted.
    f, y0, times = _decay_problem(())
    res = ode.odeint(f, y0, 1.0, method="dopri5", rtol=1e-6, atol=1e-6)
    h = (0.01 / 5e5) ** (1 / 5)
    assert times[1] == pytest.approx(0.01, rel=1e-12)  # the probe at h0
    assert times[2] == pytest.approx(h / 5, rel=1e-9)  # the first stage of the first step: t + C[1] h
    assert times[7] == pytest.approx(h, rel=1e-9) and res.n_steps >= 2


def test_dopri5_max_steps_counts_accepted_and_rejected_steps():
    # y' = cos t on [0, 10] at 1e-8 takes some accepted and some rejected steps; max_steps bounds
    # their sum: exactly that many attempts are allowed, one fewer is a failure that says so.
    f, _ = _scalar_field(math.cos)
    full = _dopri5_from_zero(f, 10.0, tol=1e-8)
    attempts = full.n_steps + full.n_rejected
    assert full.n_rejected > 0
    y0 = (torch.zeros((), dtype=F64),)
    exact = ode.odeint(f, y0, 10.0, method="dopri5", rtol=1e-8, atol=1e-8, max_steps=attempts)
    assert float(exact.y[0]) == float(full.y[0])
    with pytest.raises(ode.ODEFailure, match=rf"dopri5: {attempts - 1} steps did not reach t=10\.0 \(stopped at t="):
        ode.odeint(f, y0, 10.0, method="dopri5", rtol=1e-8, atol=1e-8, max_steps=attempts - 1)


def test_dopri5_reports_a_step_size_underflow():
    # A field that flips sign at every evaluation (pure noise) never meets the tolerance: the step
    # shrinks until t + h == t at t = 1e6, which is reported at once, not after max_steps.
    calls = [0]

    def noise(t, y):
        calls[0] += 1
        return (torch.full_like(y[0], 1e10 if calls[0] % 2 else -1e10),)

    with pytest.raises(ode.ODEFailure, match=r"dopri5: step size underflow at t=1000000\.0"):
        ode.odeint(noise, (torch.zeros((), dtype=F64),), 1e6 + 1, t0=1e6, method="dopri5", rtol=1e-8, atol=1e-8)
    assert calls[0] < 100


# ------------------------------------------------- the frequency weights the trainer builds


def _ratings(users, items, values, n_users, n_items, scale=RatingScale(-10.0, 10.0), name="r",
             contexts=None, n_contexts=0) -> Ratings:
    return Ratings(name, np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64),
                   np.asarray(values, dtype=np.float32), np.array([f"u{k}" for k in range(n_users)], dtype=object),
                   np.array([f"i{k}" for k in range(n_items)], dtype=object), scale,
                   contexts=None if contexts is None else np.asarray(contexts, dtype=np.int64), n_contexts=n_contexts)


# 7 ratings: users 0..3 have 4, 2, 1, 0 of them, items 0..4 have 2, 1, 3, 1, 0, contexts 0..3 have 2, 4, 1, 0.
SKEWED = dict(users=[0, 0, 0, 0, 1, 1, 2], items=[0, 1, 2, 3, 2, 0, 2], values=[1.0, 2.0, 3.0, 0.5, -1.0, 2.5, 1.5],
              n_users=4, n_items=5, contexts=[0, 1, 1, 0, 2, 1, 1], n_contexts=4)
SHARES = {"user": [4, 2, 1, 0], "item": [2, 1, 3, 1, 0], "context": [2, 4, 1, 0]}


def _skewed_ratings(with_contexts: bool) -> Ratings:
    if with_contexts:
        return _ratings(**SKEWED)
    return _ratings(**{k: v for k, v in SKEWED.items() if k not in ("contexts", "n_contexts")})


@pytest.mark.parametrize("model", ["mf", "biased-mf", "cp"])
def test_trainer_frequency_weights_are_each_rows_share_of_the_ratings(model):
    from recsys_flowadam.models import Coords, Objective, init_params
    from recsys_flowadam.models.autograd_path import batch_loss

    train = _skewed_ratings(with_contexts=model == "cp")
    cfg = TrainConfig(model=model, rank=2, reg=0.3, bias_reg=0.2, reg_weighting="frequency", optimizer="adam",
                      lr=0.01, steps=1, eval_every=1, dtype="float64", seed=3, init_std=0.5)
    result = train_model(train, None, cfg)
    modes = ["user", "item", "context"] if model == "cp" else ["user", "item"]
    hand = {mode: torch.tensor(SHARES[mode], dtype=F64) / 7 for mode in modes}
    got = result.objective.weights
    assert sorted(got) == sorted(modes)
    for mode in modes:  # n_row / n exactly, one weight per row (rows without ratings weigh 0)
        assert got[mode].tolist() == hand[mode].tolist(), mode
        assert float(got[mode].sum()) == pytest.approx(1.0)
    # ... and the loss the trainer minimised at its first step is the objective with those weights.
    params = init_params(result.spec, init_std=0.5, generator=torch.Generator().manual_seed(3), dtype=F64)
    coords = Coords(torch.from_numpy(train.users), torch.from_numpy(train.items),
                    torch.from_numpy(train.values).double(),
                    None if train.contexts is None else torch.from_numpy(train.contexts))
    offset = result.objective.offset
    with torch.no_grad():
        expected = float(batch_loss(params, Objective(reg=0.3, bias_reg=0.2, offset=offset, weights=hand), coords))
        uniform = float(batch_loss(params, Objective(reg=0.3, bias_reg=0.2, offset=offset), coords))
    assert result.history[0]["train_loss"] == pytest.approx(expected, rel=1e-12)
    assert abs(expected - uniform) > 1e-3  # the weights matter in this check


def test_uniform_reg_weighting_builds_no_weights():
    cfg = TrainConfig(model="mf", rank=2, reg=0.3, reg_weighting="uniform", optimizer="adam", steps=1, dtype="float64")
    assert train_model(_skewed_ratings(with_contexts=False), None, cfg).objective.weights is None


# --------------------------------------------------- Jester Dataset 2: the 99 sentinel


def test_jester2_dat_refuses_the_not_rated_sentinel(tmp_path):
    # The official format: user<TAB><TAB>joke<TAB><TAB>rating, ratings in -10..10 with decimals.
    folder = tmp_path / "jester-2"
    folder.mkdir()
    good = "1\t\t5\t\t0.219\n1\t\t7\t\t-9.281\n2\t\t8\t\t10\n63978\t\t150\t\t-10.0\n"
    (folder / "jester_ratings.dat").write_text(good)
    r = load_dataset("jester-2", tmp_path, cache=False)
    assert r.n_ratings == 4 and sorted(r.values.tolist()) == pytest.approx([-10.0, -9.281, 0.219, 10.0])
    assert 99.0 not in r.values
    (folder / "jester_ratings.dat").write_text(good + "3\t\t9\t\t99\n4\t\t9\t\t1.5\n")
    with pytest.raises(DataError, match=r"jester_ratings\.dat:5: rating \S*99\.0\S* is not a rating"):
        load_dataset("jester-2", tmp_path, cache=False)
    (folder / "jester_ratings.dat").write_text("3\t\t9\t\t99.00\n" + good)
    with pytest.raises(DataError, match=r"jester_ratings\.dat:1: rating \S*99\.0\S* is not a rating"):
        load_dataset("jester-2", tmp_path, cache=False)


# ------------------------------------ validation during training honours clip_predictions


def _ratings_at_the_scale_ends(n_contexts: int = 0):
    """A 1..5 scale with every rating a 1 or a 5, so a model that is not yet fitted predicts
    well outside the scale and clipping changes the validation RMSE a lot (with ``n_contexts``,
    each rating also has a random context)."""
    rng = np.random.default_rng(0)
    n_users, n_items = 30, 20
    users, items = np.nonzero(rng.random((n_users, n_items)) < 0.5)
    values = np.where(rng.random(users.shape[0]) < 0.5, 1.0, 5.0)
    contexts = rng.integers(0, max(n_contexts, 1), users.shape[0]) if n_contexts else None
    perm = rng.permutation(users.shape[0])
    cut = int(0.8 * len(perm))

    def part(sel, name):
        return _ratings(users[sel], items[sel], values[sel], n_users, n_items, RatingScale(1.0, 5.0), name,
                        contexts=None if contexts is None else contexts[sel], n_contexts=n_contexts)

    return part(perm[:cut], "train"), part(perm[cut:], "val")


def _rmse(result, val: Ratings, *, clip: bool, contexts: bool = True) -> float:
    c = torch.from_numpy(val.contexts) if contexts and val.contexts is not None else None
    m = evaluate_predictor(result.predictor, torch.from_numpy(val.users), torch.from_numpy(val.items),
                           torch.from_numpy(val.values).double(), c, clip=clip)
    return m["rmse"]


@pytest.mark.parametrize("clip", [True, False])
def test_validation_during_training_honours_clip_predictions(clip):
    train, val = _ratings_at_the_scale_ends()
    cfg = TrainConfig(model="biased-mf", rank=4, init_std=1.5, optimizer="adam", lr=0.01, steps=4, eval_every=1,
                      patience=0, clip_predictions=clip, dtype="float64", seed=0)
    result = train_model(train, val, cfg)
    clipped, raw = _rmse(result, val, clip=True), _rmse(result, val, clip=False)
    assert raw - clipped > 0.5  # clipping matters on these ratings
    # The early-stopping figure is the RMSE of the restored best parameters, computed as asked.
    assert result.best_val_rmse == pytest.approx(clipped if clip else raw, rel=1e-12)
    assert min(h["val_rmse"] for h in result.history) == result.best_val_rmse


def test_validation_during_training_scores_each_rating_in_its_context():
    train, val = _ratings_at_the_scale_ends(n_contexts=3)
    cfg = TrainConfig(model="cp", rank=4, init_std=1.5, optimizer="adam", lr=0.01, steps=4, eval_every=1,
                      patience=0, clip_predictions=False, dtype="float64", seed=0)
    result = train_model(train, val, cfg)
    in_context, context_mean = _rmse(result, val, clip=False), _rmse(result, val, clip=False, contexts=False)
    assert abs(in_context - context_mean) > 0.1  # the context matters on these ratings
    assert result.best_val_rmse == pytest.approx(in_context, rel=1e-12)


# ------------------------------------------- the early-stopping record and its agreement


def _evaluator(monkeypatch, rmses, **config):
    """An Evaluator over one float64 parameter whose validation RMSEs are ``rmses`` in turn."""
    from recsys_flowadam.models import coords_from_ratings
    from recsys_flowadam.train import evaluator as ev

    values = iter(rmses)
    monkeypatch.setattr(ev, "evaluate_predictor", lambda *a, **k: {"rmse": next(values), "mae": 0.0})
    params = {"user_factors": torch.zeros(2, dtype=F64)}
    val = coords_from_ratings(_skewed_ratings(with_contexts=False), device="cpu", dtype=F64)
    return ev.Evaluator(None, params, val, TrainConfig(**config)), params


def test_an_improvement_must_beat_the_best_by_more_than_min_delta(monkeypatch):
    from recsys_flowadam.train.loop_state import LoopState

    # 0.75 is exactly best - min_delta (no improvement), 0.76 is better than the best by less
    # than min_delta (none either), 0.5 is one. All the numbers are exact in binary.
    e, params = _evaluator(monkeypatch, [1.0, 0.75, 0.76, 0.5], min_delta=0.25, patience=3, eval_every=1)
    st, record = LoopState(), []
    for step in range(1, 5):
        st.step = step
        params["user_factors"] += 1.0
        e.validate(st)
        record.append((st.best_val, st.best_step, st.bad_evals))
    assert record == [(1.0, 1, 0), (1.0, 1, 1), (1.0, 1, 2), (0.5, 4, 0)]


def test_the_best_snapshot_is_the_best_steps_parameters_in_buffers_made_once(monkeypatch):
    from recsys_flowadam.train.loop_state import LoopState

    e, params = _evaluator(monkeypatch, [1.0, 0.9, 0.95, 0.8, 0.85], eval_every=1)
    st, buffers = LoopState(), []
    for step in range(1, 5):
        st.step = step
        params["user_factors"] += 1.0
        e.validate(st)
        buffers.append(e.best["user_factors"])
    assert st.best_step == 4 and torch.equal(e.best["user_factors"], torch.full((2,), 4.0, dtype=F64))
    assert all(b is buffers[0] for b in buffers)  # copied into, not made anew
    assert e.best["user_factors"] is not params["user_factors"]
    params["user_factors"] += 1.0  # the snapshot is a copy: training on does not move it
    assert torch.equal(e.best["user_factors"], torch.full((2,), 4.0, dtype=F64))
    e.restore_snapshot({"user_factors": torch.full((2,), 2.0, dtype=F64)})  # a checkpoint's snapshot
    st.step = 5
    e.validate(st)  # 0.85: no improvement
    assert torch.equal(e.best["user_factors"], torch.full((2,), 2.0, dtype=F64))
    e.finish(st)
    assert torch.equal(params["user_factors"], torch.full((2,), 2.0, dtype=F64))


def test_the_evaluator_asks_its_agreement_with_the_loop_state(monkeypatch):
    from recsys_flowadam.train.evaluator import Evaluator, LocalStop
    from recsys_flowadam.train.loop_state import LoopState

    asked = []

    def agree(stop, state):
        asked.append((stop, state))
        return True

    e, _ = _evaluator(monkeypatch, [], patience=2)
    assert isinstance(e.agree, LocalStop)
    e.agree = agree
    st = LoopState(step=7, bad_evals=2)
    assert e.decide_stop(st) is True and asked == [(True, st)] and asked[0][1] is st
    assert Evaluator(None, e.params, e.val, TrainConfig(), agree=agree).agree is agree


def test_stop_agreement_broadcasts_on_the_device_in_a_process_group():
    from recsys_flowadam.train.evaluator import BroadcastStop, LocalStop, stop_agreement
    from recsys_flowadam.train.loop_state import LoopState

    class FakeGroup:
        def broadcast_ints(self, values, what, device):
            self.device = device
            return [0, 12]

    device = torch.device("cpu")
    assert isinstance(stop_agreement(None, device), LocalStop)
    group = FakeGroup()
    agreement = stop_agreement(group, device)
    assert isinstance(agreement, BroadcastStop) and agreement.dctx is group and agreement.device == device
    st = LoopState(step=20, best_step=3)
    assert agreement(False, st) is False and st.best_step == 12 and group.device == device


def test_a_restored_best_snapshot_comes_back_at_the_end(monkeypatch):
    from recsys_flowadam.train.loop_state import LoopState

    e, params = _evaluator(monkeypatch, [], patience=0)
    saved = {"user_factors": torch.tensor([1.5, -2.0], dtype=torch.float32)}  # as a checkpoint stores it
    e.restore_snapshot(saved)
    assert e.best["user_factors"].dtype == F64 and e.best["user_factors"].tolist() == [1.5, -2.0]
    params["user_factors"] += 9.0  # the run moves on, and never improves again
    e.finish(LoopState(step=30))
    assert params["user_factors"].tolist() == [1.5, -2.0]
    e.restore_snapshot(None)
    assert e.best is None
