"""Explicit ODE integrators over tuples of tensors: adaptive ``dopri5``, fixed-step ``euler``,
``heun`` and ``rk4``.

The state is a tuple of tensors of any shapes (FlowAdam passes one tensor per parameter), so
nothing is flattened or concatenated on an evaluation; stages are combined with
``torch._foreach_*`` kernels. The derivative at the start, when the caller already has it,
is passed as ``f0`` and reused rather than evaluated again; every call of ``f`` is counted.

Why not torchdiffeq: it is not a dependency of this project, and FlowAdam needs only a
single-interval solve without dense output or adjoints, with the evaluation at ``t0`` supplied
by the caller. The dopri5 step-size control below follows the standard scheme (Hairer, Norsett
& Wanner, "Solving ODEs I", II.4; the same one torchdiffeq uses): a Hairer initial-step guess
(one extra evaluation), an RMS error norm taken per tensor with the maximum over tensors,
safety 0.9, growth limited to [0.2, 10].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

Tensors = tuple[torch.Tensor, ...]
RHS = Callable[[float, Tensors], Tensors]

METHODS = ("dopri5", "euler", "heun", "rk4")
FIXED_METHODS = ("euler", "heun", "rk4")


class ODEFailure(RuntimeError):
    """The integration produced non-finite values or could not reach the end time."""


@dataclass
class ODEResult:
    """Solution at ``t1`` and what it cost."""

    y: Tensors
    n_evals: int  # calls of f made by the integrator (a supplied f0 is not counted)
    n_steps: int  # accepted steps
    n_rejected: int  # rejected steps (dopri5 only)


# Dormand-Prince 5(4) tableau.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B_LOW = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_DP_E = tuple(b - bl for b, bl in zip(_DP_B, _DP_B_LOW))

_SAFETY, _IFACTOR, _DFACTOR = 0.9, 10.0, 0.2


def _combine(y: Tensors | None, h: float, coeffs: Sequence[float], ks: Sequence[Tensors]) -> Tensors:
    """y + h * sum_j coeffs[j] * ks[j] (y=None: just the sum), skipping zero coefficients."""
    out: list[torch.Tensor] | None = None
    for a, k in zip(coeffs, ks):
        if a == 0.0:
            continue
        if out is None:
            if y is None:
                out = torch._foreach_mul(list(k), h * a)
            else:
                out = torch._foreach_add(list(y), list(k), alpha=h * a)
        else:
            torch._foreach_add_(out, list(k), alpha=h * a)
    if out is None:
        return tuple(t.clone() if y is not None else torch.zeros_like(t) for t in (y if y is not None else ks[0]))
    return tuple(out)


def _all_finite(ts: Sequence[torch.Tensor]) -> bool:
    """One host synchronisation for the whole tuple."""
    if not ts:
        return True
    flags = torch.stack([t.isfinite().all().to(ts[0].device) for t in ts])
    return bool(flags.all().item())


def _rms_max(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """max over tensors of the RMS of each tensor (0-dim tensor on the first tensor's device)."""
    norms = torch._foreach_norm(list(ts))
    rms = [n.to(ts[0].device) / math.sqrt(max(t.numel(), 1)) for n, t in zip(norms, ts)]
    return torch.stack(rms).max()


def _fixed(f: RHS, y0: Tensors, t0: float, t1: float, f0: Tensors | None, method: str, steps: int) -> ODEResult:
    h = (t1 - t0) / steps
    y, t, n_evals = y0, t0, 0
    for i in range(steps):
        if i == 0 and f0 is not None:
            k1 = f0
        else:
            k1 = f(t, y)
            n_evals += 1
        if method == "euler":
            y = _combine(y, h, (1.0,), (k1,))
        elif method == "heun":  # explicit trapezoid rule
            k2 = f(t + h, _combine(y, h, (1.0,), (k1,)))
            y = _combine(y, h, (0.5, 0.5), (k1, k2))
            n_evals += 1
        else:  # classic fourth-order Runge-Kutta
            k2 = f(t + h / 2, _combine(y, h, (0.5,), (k1,)))
            k3 = f(t + h / 2, _combine(y, h, (0.5,), (k2,)))
            k4 = f(t + h, _combine(y, h, (1.0,), (k3,)))
            y = _combine(y, h, (1 / 6, 1 / 3, 1 / 3, 1 / 6), (k1, k2, k3, k4))
            n_evals += 3
        t = t0 + (i + 1) * h
    if not _all_finite(y):
        raise ODEFailure(f"{method}: non-finite state at t={t1}")
    return ODEResult(y=y, n_evals=n_evals, n_steps=steps, n_rejected=0)


def _error_ratio(err: Sequence[torch.Tensor], y0: Tensors, y1: Tensors, rtol: float, atol: float) -> float:
    """Mixed RMS norm of err / (atol + rtol * max(|y0|, |y1|)); one host synchronisation."""
    scale = torch._foreach_maximum(torch._foreach_abs(list(y0)), torch._foreach_abs(list(y1)))
    torch._foreach_mul_(scale, rtol)
    torch._foreach_add_(scale, atol)
    return float(_rms_max(torch._foreach_div(list(err), scale)).item())


def _initial_step(f: RHS, y0: Tensors, t0: float, t1: float, f0: Tensors, rtol: float, atol: float, order: int) -> tuple[float, int]:
    """Hairer's starting step guess; costs one evaluation of f.

    The probe point is kept inside [t0, t1] (torchdiffeq does not clamp it) so that f is never
    evaluated beyond the end of the interval.
    """
    scale = torch._foreach_abs(list(y0))
    torch._foreach_mul_(scale, rtol)
    torch._foreach_add_(scale, atol)
    d = torch.stack([_rms_max(torch._foreach_div(list(y0), scale)), _rms_max(torch._foreach_div(list(f0), scale))])
    d0, d1 = (float(x) for x in d.tolist())
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, t1 - t0)
    f1 = f(t0 + h0, _combine(y0, h0, (1.0,), (f0,)))
    diff = torch._foreach_sub(list(f1), list(f0))
    d2 = float(_rms_max(torch._foreach_div(diff, scale)).item()) / h0
    if not math.isfinite(d2):
        raise ODEFailure("dopri5: non-finite derivative during the initial step selection")
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    return min(100 * h0, h1), 1


def _dopri5(f: RHS, y0: Tensors, t0: float, t1: float, f0: Tensors | None, rtol: float, atol: float, max_steps: int) -> ODEResult:
    n_evals = 0
    if f0 is None:
        f0 = f(t0, y0)
        n_evals += 1
    h, extra = _initial_step(f, y0, t0, t1, f0, rtol, atol, order=4)
    n_evals += extra
    t, y, k1 = t0, y0, f0
    n_steps = n_rejected = 0
    while t < t1:
        if n_steps + n_rejected >= max_steps:
            raise ODEFailure(f"dopri5: {max_steps} steps did not reach t={t1} (stopped at t={t})")
        h = min(h, t1 - t)
        if t + h <= t:
            raise ODEFailure(f"dopri5: step size underflow at t={t}")
        ks = [k1]
        for i in range(1, 7):
            ks.append(f(t + _DP_C[i] * h, _combine(y, h, _DP_A[i], ks)))
        n_evals += 6
        y_new = _combine(y, h, _DP_B, ks[:6])  # b7 = 0; the 7th stage (FSAL) is f at y_new
        err = _combine(None, h, _DP_E, ks)
        ratio = _error_ratio(err, y, y_new, rtol, atol)
        if not math.isfinite(ratio):
            raise ODEFailure(f"dopri5: non-finite error estimate at t={t}")
        if ratio <= 1.0:
            t = t1 if t + h >= t1 else t + h
            y, k1 = y_new, ks[6]
            n_steps += 1
        else:
            n_rejected += 1
        factor = _IFACTOR if ratio == 0.0 else min(_IFACTOR, max(_DFACTOR, _SAFETY * ratio ** (-1 / 5)))
        h = h * factor
    if not _all_finite(y):
        raise ODEFailure(f"dopri5: non-finite state at t={t1}")
    return ODEResult(y=y, n_evals=n_evals, n_steps=n_steps, n_rejected=n_rejected)


def odeint(
    f: RHS,
    y0: Sequence[torch.Tensor],
    t1: float,
    *,
    t0: float = 0.0,
    method: str = "dopri5",
    f0: Sequence[torch.Tensor] | None = None,
    steps: int = 1,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    max_steps: int = 1000,
) -> ODEResult:
    """Integrate dy/dt = f(t, y) from t0 to t1 and return y(t1).

    ``f`` takes and returns tuples of tensors shaped like ``y0``; it must not modify its
    input. ``f0`` (optional) is f(t0, y0), already known to the caller. ``steps`` is the
    number of equal steps of the fixed-step methods; ``rtol``/``atol``/``max_steps`` control
    dopri5. Raises :class:`ODEFailure` on non-finite values or when dopri5 cannot finish.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not t1 > t0:
        raise ValueError(f"t1 must be greater than t0, got t0={t0}, t1={t1}")
    y0 = tuple(y0)
    f0 = tuple(f0) if f0 is not None else None
    if method == "dopri5":
        return _dopri5(f, y0, float(t0), float(t1), f0, rtol, atol, max_steps)
    return _fixed(f, y0, float(t0), float(t1), f0, method, steps)
