"""The ODE integrators on a clipped linear flow (the kind of field FlowAdam integrates)."""

from __future__ import annotations

import math

import pytest
import torch

from recsys_flowadam.optim.ode import ODEFailure, odeint

torch.set_default_dtype(torch.float32)


def _problem(seed: int = 0):
    """dy/dt = -clip(A y + b, -1, 1) on a tuple state of two tensors (shapes (3,) and (2, 2)).

    The clip is active on some coordinates at the start and releases during the solve, so the
    field is piecewise linear, as FlowAdam's is.
    """
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(7, 7, generator=gen, dtype=torch.float64)
    a = a @ a.T / 7 + torch.eye(7, dtype=torch.float64)
    b = torch.randn(7, generator=gen, dtype=torch.float64)
    y0 = (torch.tensor([2.0, -1.5, 0.3], dtype=torch.float64), torch.tensor([[0.5, -0.2], [1.0, 0.1]], dtype=torch.float64))
    calls = []

    def f(t, y):
        calls.append(t)
        flat = torch.cat([y[0], y[1].reshape(-1)])
        d = -(a @ flat + b).clamp(-1.0, 1.0)
        return d[:3].clone(), d[3:].reshape(2, 2).clone()

    return f, y0, calls


def _dist(y, z) -> float:
    return max(float((u - v).abs().max()) for u, v in zip(y, z))


def _reference(t1: float):
    f, y0, _ = _problem()
    return odeint(f, y0, t1, method="rk4", steps=4000).y


@pytest.mark.parametrize("method, order", [("euler", 1), ("heun", 2), ("rk4", 4)])
def test_fixed_step_methods_converge_to_the_fine_step_reference(method, order):
    t1 = 1.0
    ref = _reference(t1)
    errors = []
    for steps in (8, 16, 32):
        f, y0, calls = _problem()
        res = odeint(f, y0, t1, method=method, steps=steps)
        errors.append(_dist(res.y, ref))
        per_step = {"euler": 1, "heun": 2, "rk4": 4}[method]
        assert res.n_evals == len(calls) == per_step * steps  # no f0 given: every stage is evaluated
        assert res.y[1].shape == (2, 2)  # the tuple structure is kept
    assert errors[-1] < {"euler": 2e-2, "heun": 2e-3, "rk4": 1e-4}[method]
    # Error falls with the step count (the clip kinks keep the rate at or below the order).
    assert errors[0] > errors[1] > errors[2]
    if order == 1:
        assert 1.6 < errors[1] / errors[2] < 2.5


def test_supplied_initial_derivative_is_reused_not_evaluated():
    f, y0, calls = _problem()
    f0 = f(0.0, y0)
    calls.clear()
    for method, per_step in (("euler", 1), ("heun", 2), ("rk4", 4)):
        calls.clear()
        res = odeint(f, y0, 0.5, method=method, steps=3, f0=f0)
        assert res.n_evals == len(calls) == per_step * 3 - 1
        assert 0.0 not in calls
    # Same numbers as when f0 is evaluated by the integrator.
    a = odeint(f, y0, 0.5, method="rk4", steps=3, f0=f0).y
    b = odeint(f, y0, 0.5, method="rk4", steps=3).y
    assert _dist(a, b) == 0.0


def test_dopri5_accuracy_and_evaluation_count():
    t1 = 1.0
    ref = _reference(t1)
    f, y0, calls = _problem()
    f0 = f(0.0, y0)
    calls.clear()
    res = odeint(f, y0, t1, method="dopri5", f0=f0, rtol=1e-6, atol=1e-6)
    assert _dist(res.y, ref) < 1e-4
    # One initial-step probe, then 6 new stages per attempted step (stage 1 is FSAL / f0).
    assert res.n_evals == len(calls) == 1 + 6 * (res.n_steps + res.n_rejected)
    assert res.n_steps > 1
    # Tighter tolerance -> more steps.
    f2, y02, _ = _problem()
    loose = odeint(f2, y02, t1, method="dopri5", rtol=1e-3, atol=1e-3)
    assert loose.n_steps < res.n_steps
    assert loose.n_evals == 1 + 1 + 6 * (loose.n_steps + loose.n_rejected)  # f0 evaluated here


def test_dopri5_short_horizon_takes_one_step_of_seven_evaluations():
    # FlowAdam's horizon is T = lr * t_scale (0.005 for the paper's preset B at lr 0.01).
    f, y0, calls = _problem()
    f0 = f(0.0, y0)
    calls.clear()
    res = odeint(f, y0, 0.005, method="dopri5", f0=f0, rtol=1e-4, atol=1e-4)
    assert (res.n_steps, res.n_rejected, res.n_evals, len(calls)) == (1, 0, 7, 7)
    assert max(calls) == pytest.approx(0.005)
    ref = odeint(f, y0, 0.005, method="rk4", steps=200).y
    assert _dist(res.y, ref) < 1e-9


@pytest.mark.parametrize("method", ["dopri5", "euler", "heun", "rk4"])
def test_non_finite_field_raises_ode_failure(method):
    f, y0, _ = _problem()
    count = [0]

    def bad(t, y):
        count[0] += 1
        out = f(t, y)
        if count[0] >= 2:
            return tuple(torch.full_like(o, math.nan) for o in out)
        return out

    with pytest.raises(ODEFailure):
        odeint(bad, y0, 1.0, method=method, steps=4)


def test_invalid_arguments():
    f, y0, _ = _problem()
    with pytest.raises(ValueError, match="method"):
        odeint(f, y0, 1.0, method="rk45")
    with pytest.raises(ValueError, match="steps"):
        odeint(f, y0, 1.0, method="euler", steps=0)
    with pytest.raises(ValueError, match="t1"):
        odeint(f, y0, 0.0)
