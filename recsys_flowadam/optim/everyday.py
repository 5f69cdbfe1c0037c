"""FlowAdam's everyday preset "E": a trigger that mini-batch noise does not set off, and an
ODE branch that costs no gradient evaluation.

Preset E = switch 0.5, curvature 2.0, ode_t_scale 0.5, ``trigger="noise"`` (z = ``noise_z`` = 3),
``ode_method="euler"`` with one step, warm-up 20 steps; the other knobs as FlowAdam's defaults.

**The statistics.** Each step gives x = (n, c) = (||g||, ||g - m||), m being Adam's first
moment before this step (an EMA of the recent gradients; zero at the first step): c is how far
the gradient departs from where it has been heading. It jumps in a stiff region (the gradient
turns against its average) as presets A/B's ||g - g_prev|| does, but needs no copy of the
previous gradient: ||g - m||^2 = ||g||^2 + ||m||^2 - 2 g.m, three reductions per parameter
tensor (dot products on the CPU), no buffer, nothing gradient-sized written. The 3 numbers per
parameter tensor are combined on the host in numpy float64 when the parameters are on the CPU
(a dozen torch operations on 2-element tensors would cost more than the rest of the
optimizer's work on a small model), and as float64 tensors on an accelerator, where they never
wait for the device. Same code, either kind of array.

**The trigger rule ("noise").** For each of n and c keep its EMA mu (factor ``beta`` =
``stat_beta``, started at the first value) and the EMA of the squared one-step residual
r = x - mu_prev over a horizon five times longer (factor ``beta_var`` = 1 - (1 - beta) / 5),
bias-corrected like Adam's moments: var = EMA(r^2) / (1 - beta_var^k) after k residuals.
With sd = sqrt(var), a step is

* a plateau when n < switch * mu_n - z * sd_n (the norm fell below a fraction of its recent
  level by more than z times its usual step-to-step fluctuation);
* stiff when c > curvature * mu_c + z * sd_c (the departure grew past a multiple of its usual
  size, again by more than z fluctuations).

mu and sd are taken *before* x joins them, so r / sd is a one-step-ahead prediction error in
units of its own running RMS. Under pure noise (stationary n and c) the margin grows with the
noise it measures, whatever the batch size: in the tests, Gaussian gradient noise fires on at
most 0.2% of steps and heavy-tailed noise (Student t, 3 degrees of freedom) on about 1%, its
outliers, where preset B fires on more than 80% of steps of the same noise (its stiff test,
c > 0.1 * EMA(c), holds whenever c is about its average). A real event exceeds the margin: a
collapse of the gradient norm or a jump of the gradient fires on the next step; in full-batch
training sd is small (the statistics move smoothly) and the rule is close to plain thresholds;
a burst of triggers inflates sd, which damps the next ones.

**The decision is one step late.** The code computed at step t decides step t + 1. The rule
describes a regime (smoothed statistics), not one gradient, so the lag costs little, and it
takes the host synchronisation out of the step: on CUDA the code is copied to pinned host
memory without waiting and read at the next step, by which time it is long computed.

**The ODE branch.** One explicit Euler stage from the gradient already computed for this
step: v = t_scale * clip(g, -ode_clip, ode_clip), theta <- theta - lr * v (the flow's
displacement over T = lr * t_scale), v blended into Adam's first moment by the injection rule,
decoupled weight decay applied; Adam's second moment and step count untouched. This is the
``ode_method="euler", ode_steps=1`` solve of :mod:`~recsys_flowadam.optim.flowadam` (to
rounding), done without a solver, a parameter copy or a finiteness check.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

from recsys_flowadam.optim.fused_stats import three_sums_kernel
from recsys_flowadam.optim.injection import inject_momentum

__all__ = ["NoiseAwareStats", "TriggerMailbox", "departure_parts", "euler_flow_step", "gradient_departure",
           "variance_beta"]

PLATEAU, STIFF = 1, 2  # bits of the trigger code (as in flowadam)
# From this many parameters the statistics' sums come from one compiled pass (optim.fused_stats):
# there it saves milliseconds a step (2.0 against 3.9 ms at 3.6M); below, the BLAS dot products
# cost microseconds and keep every earlier run's trigger decisions bit for bit (the compiled pass
# sums in float64, BLAS in float32: the statistics differ in the fifth digit).
FUSED_STATS_MIN_ELEMENTS = 1_000_000
VAR_HORIZON = 5.0  # the residual variance averages over 5x the horizon of the mean
Stat = Union[np.ndarray, torch.Tensor]  # the statistics' arrays: numpy on the CPU, tensors elsewhere


def departure_parts(grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor]) -> Stat:
    """Per parameter tensor ||g_i||^2, then ||m_i||^2, then g_i . m_i: 3k values, as a float64
    numpy array when the gradients are on the CPU, else a float64 tensor on the first gradient's
    device. Nothing gradient-sized is written: on the CPU, from ``FUSED_STATS_MIN_ELEMENTS``
    parameters, one compiled pass per tensor pair (``optim.fused_stats``, numba), else 3k BLAS dot
    products (about twice as fast there as torch's foreach norm); elsewhere one foreach norm and k
    dot products."""
    grads, exp_avgs = list(grads), list(exp_avgs)
    flat = [(g.reshape(-1), m.reshape(-1)) for g, m in zip(grads, exp_avgs)]
    device = grads[0].device
    if device.type == "cpu" and all(g.dtype in (torch.float32, torch.float64) for g in grads):
        kernel = three_sums_kernel() if sum(g.numel() for g, _ in flat) >= FUSED_STATS_MIN_ELEMENTS else None
        if kernel is not None:  # one pass over each tensor pair instead of three dot products
            sums = np.array([kernel(g.detach().numpy(), m.detach().numpy()) for g, m in flat], dtype=np.float64)
            return np.concatenate([sums[:, 0], sums[:, 1], sums[:, 2]])
        squares = [torch.dot(g, g) for g, _ in flat] + [torch.dot(m, m) for _, m in flat]
    else:
        norms = torch._foreach_norm(grads + exp_avgs)
        squares = torch._foreach_mul(norms, norms)
    parts = [*squares, *(torch.dot(g, m) for g, m in flat)]
    if len({(p.device, p.dtype) for p in parts}) > 1:  # mixed parameter dtypes or devices
        parts = [p.to(device=device, dtype=torch.float64) for p in parts]
    stacked = torch.stack(parts)
    if device.type == "cpu":
        return stacked.numpy().astype(np.float64)
    return stacked.to(torch.float64)


def gradient_departure(parts: Stat) -> Stat:
    """x = (||g||, ||g - m||) from :func:`departure_parts`, as the same kind of array (numpy on the
    CPU, a device tensor elsewhere). ||g - m||^2 = ||g||^2 + ||m||^2 - 2 g.m, clamped at 0."""
    k = len(parts) // 3
    n2, m2, dot = parts[:k].sum(), parts[k : 2 * k].sum(), parts[2 * k :].sum()
    c2 = n2 + m2 - 2.0 * dot
    c2 = c2 * (c2 > 0)  # rounding can make it slightly negative when g is m
    pair = np.array([n2, c2]) if isinstance(parts, np.ndarray) else torch.stack([n2, c2])
    return pair**0.5


def variance_beta(beta: float) -> float:
    """EMA factor of the residual variance: 1 - (1 - beta) / 5 (0.98 for beta = 0.9)."""
    return 1.0 - (1.0 - beta) / VAR_HORIZON


def _as_kind(value: Stat, like: Stat) -> Stat:
    """``value`` as the kind of array ``like`` is (numpy float64, or a tensor on like's device)."""
    if isinstance(like, np.ndarray):
        return value if isinstance(value, np.ndarray) else value.detach().to("cpu", torch.float64).numpy().copy()
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    return value.to(device=like.device, dtype=like.dtype)


class NoiseAwareStats:
    """Running mean and residual variance of x = (||g||, ||g - m||); see the module doc.

    ``mean`` and ``sq`` are 2-vectors of the kind x is (None before the first step): numpy
    float64 arrays on the CPU, where a handful of torch operations on 2-element tensors would cost
    more than the rest of the step, and float64 tensors on an accelerator, where they run without
    a host synchronisation. The arithmetic is the same code for both. ``count`` is the number of
    residuals in ``sq``, on the host, for the bias correction.
    """

    def __init__(self) -> None:
        self.mean: Stat | None = None
        self.sq: Stat | None = None
        self.count = 0
        self._consts: dict[tuple, tuple[Stat, Stat, Stat]] = {}

    def _constants(self, x: Stat, switch: float, curvature: float) -> tuple[Stat, Stat, Stat]:
        """(sensitivities, signs, code bits) as x's kind of array."""
        numpy = isinstance(x, np.ndarray)
        key = (numpy, None if numpy else x.device, switch, curvature)
        if key not in self._consts:
            if numpy:
                made = (np.array([switch, curvature]), np.array([-1.0, 1.0]), np.array([PLATEAU, STIFF]))
            else:
                made = (torch.tensor([switch, curvature], device=x.device, dtype=x.dtype),
                        torch.tensor([-1.0, 1.0], device=x.device, dtype=x.dtype),
                        torch.tensor([PLATEAU, STIFF], device=x.device))
            self._consts = {key: made}
        return self._consts[key]

    def _align(self, x: Stat) -> None:
        """The statistics as x's kind of array (they may come from a state dict or another device)."""
        if self.mean is not None:
            self.mean, self.sq = _as_kind(self.mean, x), _as_kind(self.sq, x)

    def code(self, x: Stat, switch: float, curvature: float, z: float, beta_var: float) -> Stat:
        """The PLATEAU / STIFF bits of x against the statistics so far (0 before the first step)."""
        if self.mean is None:
            return np.int64(0) if isinstance(x, np.ndarray) else torch.zeros((), dtype=torch.int64, device=x.device)
        self._align(x)
        sens, sign, bits = self._constants(x, switch, curvature)
        excess = (x - self.mean * sens) * sign  # how far beyond the threshold; positive: it fires
        scale = z * z / (1.0 - beta_var**self.count) if self.count else 0.0
        margin = (self.sq * scale) ** 0.5  # z running standard deviations
        return ((excess > margin) * bits).sum()

    def update(self, x: Stat, beta: float, beta_var: float) -> None:
        """Let x join the mean and, as a residual against the previous mean, the variance."""
        if self.mean is None:
            self.mean, self.sq = x * 1.0, x * 0.0
            return
        self._align(x)
        resid = x - self.mean
        self.sq = self.sq * beta_var + resid * resid * (1.0 - beta_var)
        self.mean = self.mean * beta + x * (1.0 - beta)
        self.count += 1

    def state(self) -> dict:
        """Checkpointable copy: mean and sq as CPU tensors (or None), and count."""
        copy = (lambda t: None if t is None else torch.as_tensor(_as_kind(t, np.zeros(0))).clone())
        return {"mean": copy(self.mean), "sq": copy(self.sq), "count": int(self.count)}

    def load(self, state: dict) -> None:
        """Inverse of :meth:`state`; the statistics take x's kind at the next step."""
        copy = (lambda t: None if t is None else torch.as_tensor(t).detach().to(torch.float64).clone())
        self.mean, self.sq, self.count = copy(state["mean"]), copy(state["sq"]), int(state["count"])


class TriggerMailbox:
    """Holds one step's trigger code until the next step reads it.

    On CUDA, :meth:`post` starts the copy to pinned host memory and records an event;
    :meth:`take` waits only for that event (the previous step's statistics), not for the work
    queued since. A code computed on the host (numpy) is kept as an int; one on another device
    stays a tensor, read with ``.item()`` a step later.
    """

    def __init__(self) -> None:
        self._code: torch.Tensor | int | None = None
        self._host: torch.Tensor | None = None
        self._event = None

    def post(self, code: Stat | int) -> None:
        if not isinstance(code, torch.Tensor):
            self._code = int(code)
        elif code.device.type == "cuda":
            if self._host is None:
                self._host = torch.empty((), dtype=code.dtype, pin_memory=True)
            self._host.copy_(code, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            self._code = self._host
        else:
            self._code = code

    def peek(self) -> int:
        """The code waiting to be read (0: none), without taking it."""
        if self._code is None:
            return 0
        if self._event is not None:
            self._event.synchronize()
        return self._code if isinstance(self._code, int) else int(self._code.item())

    def take(self) -> int:
        """The waiting code (0: none), which is then gone."""
        value = self.peek()
        self._code, self._event = None, None
        return value

    def put(self, value: int) -> None:
        """Set the waiting code from a host integer (loading a state dict)."""
        self._code, self._event = (int(value) if value else None), None


def euler_flow_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    *,
    lr: float,
    t_scale: float,
    clip: float,
    gamma: float,
    injection: str,
    weight_decay: float,
) -> None:
    """One Euler stage of the clipped gradient flow from ``grads``, in place; see the module doc."""
    params, grads, exp_avgs = list(params), list(grads), list(exp_avgs)
    velocity = torch._foreach_clamp_min(grads, -clip)
    torch._foreach_clamp_max_(velocity, clip)
    torch._foreach_mul_(velocity, t_scale)
    torch._foreach_add_(params, velocity, alpha=-lr)
    inject_momentum(exp_avgs, velocity, gamma, injection)  # may overwrite velocity
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
