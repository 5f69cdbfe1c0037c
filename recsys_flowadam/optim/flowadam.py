"""FlowAdam: Adam that switches to a clipped gradient flow (an ODE solve) on plateaus and stiff
regions, then injects the flow's displacement into Adam's first moment.

Layout follows ``torch/optim/adam.py``: a thin :class:`FlowAdam` optimizer keeps per-parameter
state and calls pure update functions (:func:`gradient_statistics`, :func:`update_ema`,
:func:`trigger_code`, :func:`inject_momentum`, torch's functional ``adam``). The algorithm,
per ``step(closure)``:

1. Evaluate the closure: loss and gradient g. n = ||g||, c = ||g - g_prev|| (global 2-norms
   over all parameters that have a gradient; g_prev is zero at the first step).
2. n_bar <- beta_s * n_bar + (1 - beta_s) * n, c_bar likewise (both start at the first values).
3. plateau = n < switch_sensitivity * n_bar; stiff = c > curvature_sensitivity * c_bar.
   The ODE branch is taken when (plateau or stiff) and the step's 1-based index is greater
   than ``warmup_steps`` (so with the default 10 the 11th step is the first that may trigger).
4. ODE branch: integrate d(theta)/dt = -clip(grad L(theta), -ode_clip, ode_clip) from 0 to
   T = lr * ode_t_scale, re-evaluating the closure at every stage (the gradient of step 1 is
   reused as the first stage). Then, per parameter with first moment m,
   v = -(theta_T - theta_0) / lr and, for ``injection="soft"``,
   s = min(1, 5 ||m|| / (||v|| + 1e-8)), m <- (1 - gamma) m + gamma s v;
   ``"hard"``: m <- v; ``"none"``: m untouched. Second moment and Adam's step count are
   untouched, no Adam update. Non-finite values or a failed solve: parameters restored and an
   Adam step with g taken instead (a *fallback*).
5. Adam branch: bias-corrected Adam, torch's own functional implementation (fused kernel where
   the device supports it, else torch's default), so the numbers are torch.optim.Adam's; on the
   CPU from ``fused_adam.MIN_ELEMENTS`` parameters, the compiled two-thread pass of
   :mod:`~recsys_flowadam.optim.fused_adam` (the same update to float rounding), which for
   preset E also reads the step's trigger statistics, instead of a pass of their own. Where the
   trainer allows it (``fuse_row_steps``: laid-out CPU mini-batches in one process), an Adam step
   of preset E is offered to the gradient kernel, which takes it on the user rows as their
   gradients are done, and on the item rows of a batch split in halves as it sums them
   (``recsys_flowadam.row_step``; the decision is known a step ahead).

Weight decay is decoupled (AdamW style: theta <- theta * (1 - lr * weight_decay)). It is applied
on every step, on the ODE branch after the flow, so that it does not vanish when the ODE
branch fires often (preset "B"); the injected velocity v is the flow's displacement only.

Param groups may set their own ``lr``, ``betas``, ``eps``, ``weight_decay``, ``ode_t_scale`` and
``momentum_blend_gamma``. The trigger and the solve are global (one decision and one ODE over
all parameters), so the other options must be the same in every group. With groups whose
T_g = lr_g * ode_t_scale_g differ, the ODE runs to T = max T_g and group g's field is scaled by
T_g / T, i.e. each group follows the clipped flow up to its own T_g (identical to the plain
rule when there is one group).

Host synchronisation: during warm-up none; afterwards one ``.item()`` per step (the trigger
decision), skipped when the triggers are disabled (``switch_sensitivity=0`` and
``curvature_sensitivity=inf``). ODE steps synchronise more (dopri5's step control, the
finiteness check); they are dominated by their closure calls anyway. The "noise" rule of preset
"E" reads its decision a step late, on CUDA from pinned memory, so it never waits for the step
in flight; its one-stage Euler flow does not synchronise at all.

After an ODE step ``p.grad`` holds the gradient of the last stage evaluated, not of theta_T.

Preset "E" (everyday; what ``train`` and ``make_optimizer("flowadam", ...)`` use unless told
otherwise) replaces steps 1-4: its statistics are (||g||, ||g - m||) with m Adam's first moment
(no g_prev buffer), its trigger rule (``trigger="noise"``) compares them with their running
fluctuation so that mini-batch noise alone rarely fires it, its decision applies to the next
step, and its ODE branch is one Euler stage from the gradient already computed
(``ode_method="euler"``, ``ode_steps=1``: no extra gradient evaluation). The rule and its
reasons: :mod:`recsys_flowadam.optim.everyday`. Presets "A" and "B" keep the rule above
(``trigger="ema"``) and dopri5; "B" is the paper's and this class's default.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch.optim import Optimizer
from torch.optim.adam import adam as _functional_adam

from recsys_flowadam.optim import fused_adam
from recsys_flowadam.row_step import RowStepOffer, offering
from recsys_flowadam.optim.everyday import (
    NoiseAwareStats,
    TriggerMailbox,
    departure_parts,
    euler_flow_step,
    gradient_departure,
    variance_beta,
)
from recsys_flowadam.optim.injection import INJECTIONS, inject_momentum
from recsys_flowadam.optim.ode import METHODS, ODEFailure, odeint

__all__ = [
    "FlowAdam",
    "PRESETS",
    "PRESET_RULES",
    "TRIGGERS",
    "INJECTIONS",
    "gradient_statistics",
    "update_ema",
    "trigger_code",
    "inject_momentum",
]

# mode -> (switch_sensitivity, curvature_sensitivity, ode_t_scale). Early releases of the
# authors' code had B = (0.5, 2.0, 1.0); the current one (used here) has (0.90, 0.1, 0.5).
# "E" is this package's everyday preset (see optim.everyday).
PRESETS: dict[str, tuple[float, float, float]] = {
    "A": (0.40, 3.0, 2.0),
    "B": (0.90, 0.1, 0.5),
    "E": (0.50, 2.0, 0.5),
}
# mode -> (trigger rule, ode_method, warmup_steps): the preset's choice where the argument is None.
PRESET_RULES: dict[str, tuple[str, str, int]] = {
    "A": ("ema", "dopri5", 10),
    "B": ("ema", "dopri5", 10),
    "E": ("noise", "euler", 20),
}
TRIGGERS = ("ema", "noise")
PLATEAU, STIFF = 1, 2  # bits of the trigger code

_GLOBAL_KEYS = (
    "mode",
    "switch_sensitivity",
    "curvature_sensitivity",
    "ode_method",
    "ode_steps",
    "ode_tol",
    "ode_clip",
    "injection",
    "warmup_steps",
    "stat_beta",
    "trigger",
    "noise_z",
)
_COUNTERS = ("steps", "ode_triggers", "plateau_triggers", "stiff_triggers", "ode_evals", "grad_evals", "fallbacks")

Closure = Callable[[], Any]


# ---------------------------------------------------------------------------- pure functions


def gradient_statistics(
    grads: Sequence[torch.Tensor], g_prevs: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (||g||, ||g - g_prev||) as 0-dim tensors on ``device`` and set g_prev <- g in place.

    g_prev is reused as the scratch buffer for g_prev - g, so no gradient-sized temporary is
    allocated: four foreach passes in all.
    """
    grads, g_prevs = list(grads), list(g_prevs)
    norms_g = torch._foreach_norm(grads)
    torch._foreach_sub_(g_prevs, grads)
    norms_d = torch._foreach_norm(g_prevs)
    torch._foreach_copy_(g_prevs, grads)
    both = torch.stack([x.to(device=device, dtype=dtype) for x in (*norms_g, *norms_d)]).view(2, -1)
    nc = torch.linalg.vector_norm(both, dim=1)
    return nc[0], nc[1]


def update_ema(avg: torch.Tensor | None, value: torch.Tensor, beta: float) -> torch.Tensor:
    """avg <- beta * avg + (1 - beta) * value (a new tensor); the first value starts the average."""
    if avg is None:
        return value.clone()
    return avg * beta + value * (1.0 - beta)


def trigger_code(
    n: torch.Tensor, c: torch.Tensor, n_bar: torch.Tensor, c_bar: torch.Tensor, switch: float, curvature: float
) -> torch.Tensor:
    """0-dim int tensor: PLATEAU bit if n < switch * n_bar, STIFF bit if c > curvature * c_bar.

    ``curvature = inf`` never fires (inf * c_bar is inf, or nan when c_bar is 0).
    """
    plateau = (n < switch * n_bar).to(torch.int32)
    stiff = (c > curvature * c_bar).to(torch.int32)
    return plateau * PLATEAU + stiff * STIFF


# ------------------------------------------------------------------------------ validation


def _check_number(name: str, value: Any, *, low: float = 0.0, low_open: bool = False, high: float = math.inf, high_open: bool = False, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if value < low or (low_open and value == low) or value > high or (high_open and value == high):
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}")
    return value


def _check_group(group: dict[str, Any]) -> None:
    _check_number("lr", group["lr"], low=0.0, low_open=True)
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair of numbers, got {betas!r}")
    _check_number("betas[0]", betas[0], high=1.0, high_open=True)
    _check_number("betas[1]", betas[1], high=1.0, high_open=True)
    _check_number("eps", group["eps"])
    _check_number("weight_decay", group["weight_decay"])
    _check_number("ode_t_scale", group["ode_t_scale"], low_open=True)
    _check_number("momentum_blend_gamma", group["momentum_blend_gamma"], high=1.0)


def _fused_ok(params: Iterable[torch.Tensor]) -> bool:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    return all(p.device.type in devices and torch.is_floating_point(p) for p in params)


def _resolve_options(
    *, mode: Any, switch_sensitivity: Any, curvature_sensitivity: Any, ode_t_scale: Any, ode_method: Any,
    ode_steps: Any, ode_tol: Any, ode_clip: Any, injection: Any, warmup_steps: Any, stat_beta: Any,
    trigger: Any, noise_z: Any,
) -> dict[str, Any]:
    """The global options with the preset's values where None was given, validated."""
    if not isinstance(mode, str) or mode.upper() not in PRESETS:
        raise ValueError(f"mode must be one of {tuple(PRESETS)}, got {mode!r}")
    mode = mode.upper()
    p_switch, p_curv, p_scale = PRESETS[mode]
    p_trigger, p_method, p_warmup = PRESET_RULES[mode]
    switch_sensitivity = p_switch if switch_sensitivity is None else switch_sensitivity
    curvature_sensitivity = p_curv if curvature_sensitivity is None else curvature_sensitivity
    ode_t_scale = p_scale if ode_t_scale is None else ode_t_scale
    ode_method = p_method if ode_method is None else ode_method
    warmup_steps = p_warmup if warmup_steps is None else warmup_steps
    trigger = p_trigger if trigger is None else trigger
    _check_number("switch_sensitivity", switch_sensitivity, allow_inf=True)
    _check_number("curvature_sensitivity", curvature_sensitivity, allow_inf=True)
    if ode_method not in METHODS:
        raise ValueError(f"ode_method must be one of {METHODS}, got {ode_method!r}")
    if isinstance(ode_steps, bool) or not isinstance(ode_steps, int) or ode_steps < 1:
        raise ValueError(f"ode_steps must be a positive integer, got {ode_steps!r}")
    _check_number("ode_tol", ode_tol, low_open=True)
    _check_number("ode_clip", ode_clip, low_open=True, allow_inf=True)
    if injection not in INJECTIONS:
        raise ValueError(f"injection must be one of {INJECTIONS}, got {injection!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
    _check_number("stat_beta", stat_beta, high=1.0, high_open=True)
    if trigger not in TRIGGERS:
        raise ValueError(f"trigger must be one of {TRIGGERS}, got {trigger!r}")
    _check_number("noise_z", noise_z)
    return dict(
        ode_t_scale=ode_t_scale,
        mode=mode,
        switch_sensitivity=float(switch_sensitivity),
        curvature_sensitivity=float(curvature_sensitivity),
        ode_method=ode_method,
        ode_steps=ode_steps,
        ode_tol=float(ode_tol),
        ode_clip=float(ode_clip),
        injection=injection,
        warmup_steps=warmup_steps,
        stat_beta=float(stat_beta),
        trigger=trigger,
        noise_z=float(noise_z),
    )


# ------------------------------------------------------------------------------- optimizer


class FlowAdam(Optimizer):
    """Adam with an ODE (clipped gradient flow) branch on plateaus and stiff regions.

    See the module docstring for the exact rule. ``mode`` picks the preset
    (switch_sensitivity, curvature_sensitivity, ode_t_scale): "A" = (0.40, 3.0, 2.0) for
    stochastic network training, "B" = (0.90, 0.1, 0.5), the paper's and this class's default,
    "E" = (0.50, 2.0, 0.5), the everyday preset at Adam's cost; an explicit value overrides its
    preset entry. The preset also chooses, where the argument is None, the trigger rule
    (``trigger``: "ema" for A and B, "noise" for E), ``ode_method`` (dopri5 for A and B, euler
    for E) and ``warmup_steps`` (10 for A and B, 20 for E). ``noise_z``: the "noise" rule's margin
    in running standard deviations. ``switch_sensitivity=0`` and ``curvature_sensitivity=inf``
    disable the ODE branch (plain AdamW). ``ode_method``: "dopri5" (adaptive,
    rtol = atol = ``ode_tol``) or fixed-step "euler", "heun", "rk4" with ``ode_steps`` steps.
    ``step(closure)`` requires a closure that zeroes the gradients, computes the loss, sets
    ``.grad`` and returns the loss; it is called again at every ODE stage with the parameters
    moved in place (never with preset E's one-stage Euler flow).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        mode: str = "B",
        switch_sensitivity: float | None = None,
        curvature_sensitivity: float | None = None,
        ode_t_scale: float | None = None,
        ode_method: str | None = None,
        ode_steps: int = 1,
        ode_tol: float = 1e-4,
        ode_clip: float = 1.0,
        momentum_blend_gamma: float = 0.5,
        injection: str = "soft",
        warmup_steps: int | None = None,
        stat_beta: float = 0.9,
        trigger: str | None = None,
        noise_z: float = 3.0,
    ) -> None:
        if isinstance(lr, torch.Tensor):
            raise ValueError("lr must be a Python float (FlowAdam needs lr on the host for the ODE horizon)")
        options = _resolve_options(
            mode=mode, switch_sensitivity=switch_sensitivity, curvature_sensitivity=curvature_sensitivity,
            ode_t_scale=ode_t_scale, ode_method=ode_method, ode_steps=ode_steps, ode_tol=ode_tol,
            ode_clip=ode_clip, injection=injection, warmup_steps=warmup_steps, stat_beta=stat_beta,
            trigger=trigger, noise_z=noise_z,
        )
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas,
            eps=eps,
            weight_decay=weight_decay,
            momentum_blend_gamma=momentum_blend_gamma,
            **options,
        )
        self._flow: dict[str, Any] = {k: 0 for k in _COUNTERS}
        self._flow.update(n_bar=None, c_bar=None)
        self._noise = NoiseAwareStats()  # the "noise" rule's statistics
        self._mailbox = TriggerMailbox()  # its decision for the next step
        super().__init__(params, defaults)

    # -- groups and state ---------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; per-group keys are validated, global keys must match the defaults."""
        for key in _GLOBAL_KEYS:
            if key in param_group and param_group[key] != self.defaults[key]:
                raise ValueError(
                    f"{key} is global to FlowAdam (one trigger and one ODE for all parameters); "
                    f"a param group cannot set it to {param_group[key]!r} (optimizer has {self.defaults[key]!r})"
                )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if isinstance(group["lr"], torch.Tensor):
            raise ValueError("lr must be a Python float")
        _check_group(group)
        for p in group["params"]:
            if not torch.is_floating_point(p):
                raise ValueError(f"FlowAdam needs real floating-point parameters, got dtype {p.dtype}")
        group["fused"] = _fused_ok(group["params"])

    def diagnostics(self) -> dict[str, int]:
        """Counters since construction: steps, ode_triggers (steps that took the ODE branch,
        fallbacks included), plateau_triggers / stiff_triggers (each condition counted apart;
        both may hold in one step), ode_evals (closure calls inside ODE solves), grad_evals
        (every closure call) and fallbacks (failed solves replaced by an Adam step)."""
        return {k: int(self._flow[k]) for k in _COUNTERS}

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus a "flowadam" entry: the counters, the EMA statistics and the
        "noise" rule's statistics and pending decision."""
        sd = super().state_dict()
        flow: dict[str, Any] = self.diagnostics()
        for key in ("n_bar", "c_bar"):
            value = self._flow[key]
            flow[key] = None if value is None else value.detach().clone()
        flow["noise"] = {**self._noise.state(), "pending": self._mailbox.peek()}
        sd["flowadam"] = flow
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict made by :meth:`state_dict` (g_prev is per-parameter state); one
        without the "noise" entry (older versions) starts those statistics afresh."""
        if "flowadam" not in state_dict:
            raise ValueError("not a FlowAdam state dict: the 'flowadam' entry is missing")
        state_dict = dict(state_dict)
        flow = dict(state_dict.pop("flowadam"))
        missing = [k for k in (*_COUNTERS, "n_bar", "c_bar") if k not in flow]
        if missing:
            raise ValueError(f"FlowAdam state dict: 'flowadam' lacks {missing}")
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["fused"] = _fused_ok(group["params"])
            for p in group["params"]:  # 'step' must sit on the parameter's device for fused Adam
                st = self.state.get(p)
                if st and "step" in st:
                    st["step"] = self._step_tensor(p, group, st["step"])
        self._flow = {k: int(flow[k]) for k in _COUNTERS}
        for key in ("n_bar", "c_bar"):
            value = flow[key]
            self._flow[key] = None if value is None else torch.as_tensor(value).detach().clone()
        noise = flow.get("noise") or {"mean": None, "sq": None, "count": 0, "pending": 0}
        self._noise = NoiseAwareStats()
        self._noise.load(noise)
        self._mailbox = TriggerMailbox()
        self._mailbox.put(int(noise["pending"]))

    @staticmethod
    def _step_tensor(p: torch.Tensor, group: dict[str, Any], value: torch.Tensor | float = 0.0) -> torch.Tensor:
        # Same placement as torch.optim.Adam: on the device for fused, a host scalar otherwise.
        if group["fused"]:
            return torch.as_tensor(value).to(dtype=torch.float32, device=p.device).clone()
        from torch.optim.optimizer import _get_scalar_dtype

        return torch.as_tensor(value).to(dtype=_get_scalar_dtype(), device="cpu").clone()

    def _param_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if "step" not in state:
            state["step"] = self._step_tensor(p, group)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if "g_prev" not in state and self.defaults["trigger"] == "ema":  # the "noise" rule needs none
            state["g_prev"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    # -- the step ---------------------------------------------------------------------

    def _call(self, closure: Closure) -> Any:
        with torch.enable_grad():
            loss = closure()
        self._flow["grad_evals"] += 1
        return loss

    @staticmethod
    def _grad_of(p: torch.Tensor) -> torch.Tensor | None:
        g = p.grad
        if g is not None and g.is_sparse:
            raise RuntimeError(
                "FlowAdam does not support sparse gradients (a parameter of shape "
                f"{tuple(p.shape)} got one); use dense gradients, e.g. nn.Embedding(sparse=False)"
            )
        return g

    def _entries(self) -> list:
        """Per group: (group, params, grads, states) for the parameters that have a gradient."""
        entries = []
        for group in self.param_groups:
            ps, gs, sts = [], [], []
            for p in group["params"]:
                g = self._grad_of(p)
                if g is None:
                    continue
                ps.append(p)
                gs.append(g)
                sts.append(self._param_state(p, group))
            if ps:
                entries.append((group, ps, gs, sts))
        return entries

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:  # type: ignore[override]
        """One FlowAdam step; returns the loss of the first closure evaluation."""
        if closure is None:
            raise ValueError(
                "FlowAdam.step needs a closure (it re-evaluates the loss and gradients at every "
                "ODE stage): opt.step(closure), where closure zeroes grads, computes the loss, "
                "sets .grad and returns the loss"
            )
        offer, code = self._row_step_offer()
        with offering(offer):
            loss = self._call(closure)
        self._flow["steps"] += 1
        if offer is not None:
            self._step_after_offer(offer)
            return loss
        entries = self._entries()
        if not entries:
            return loss
        all_grads = [g for e in entries for g in e[2]]
        if self.defaults["trigger"] == "noise":
            code = self._noise_take() if code is None else code
            if not code and self._compiled(entries):  # the statistics come from the Adam pass itself
                parts = [self._adam(group, ps, gs, sts, sums=True) for group, ps, gs, sts in entries]
                sums = np.concatenate([part.reshape(3, -1) for part in parts], axis=1).reshape(-1)
                self._noise_observe(gradient_departure(sums))
                return loss
            exp_avgs = [st["exp_avg"] for e in entries for st in e[3]]
            self._noise_observe(gradient_departure(departure_parts(all_grads, exp_avgs)))
            # This step's g for the solve's first stage and a fallback: the gradients themselves for
            # the one-stage Euler flow (no closure call), a copy before a solve re-evaluates them.
            g_prevs = [g.clone() for g in all_grads] if code and not self._solver_free() else all_grads
        else:
            first = entries[0][1][0]
            stat_dtype = first.dtype if first.dtype in (torch.float32, torch.float64) else torch.float32
            g_prevs = [st["g_prev"] for e in entries for st in e[3]]
            code = self._ema_decision(*gradient_statistics(all_grads, g_prevs, first.device, stat_dtype))
        if code:
            self._flow["ode_triggers"] += 1
            self._flow["plateau_triggers"] += bool(code & PLATEAU)
            self._flow["stiff_triggers"] += bool(code & STIFF)
            if self._flow_branch(closure, entries, g_prevs):
                return loss
            self._flow["fallbacks"] += 1
            # p.grad now holds a failed stage's gradient; g_prev holds this step's g.
            offset = 0
            fixed = []
            for group, ps, gs, sts in entries:
                fixed.append((group, ps, g_prevs[offset : offset + len(ps)], sts))
                offset += len(ps)
            entries = fixed
        for group, ps, gs, sts in entries:
            self._adam(group, ps, gs, sts)
        return loss

    def _ema_decision(self, n: torch.Tensor, c: torch.Tensor) -> int:
        """Presets A/B: the EMAs take (n, c), then this step's trigger code (one ``.item()``)."""
        opts = self.param_groups[0]
        beta_s = opts["stat_beta"]
        self._flow["n_bar"] = update_ema(self._as_stat(self._flow["n_bar"], n), n, beta_s)
        self._flow["c_bar"] = update_ema(self._as_stat(self._flow["c_bar"], c), c, beta_s)
        switch, curvature = opts["switch_sensitivity"], opts["curvature_sensitivity"]
        can_trigger = switch > 0.0 or not math.isinf(curvature)
        if self._flow["steps"] > opts["warmup_steps"] and can_trigger:
            return int(trigger_code(n, c, self._flow["n_bar"], self._flow["c_bar"], switch, curvature).item())
        return 0

    def _noise_take(self, coming: bool = False) -> int:
        """The "noise" rule's decision for this step: the code posted at the previous one (see
        ``optim.everyday``); 0 during warm-up. ``coming``: asked before the step is counted."""
        steps = self._flow["steps"] + (1 if coming else 0)
        return self._mailbox.take() if steps > self.defaults["warmup_steps"] else 0

    fuse_row_steps = False  # set by the trainer where the gradient kernel may take the step (row_step)

    def _row_step_offer(self) -> tuple[RowStepOffer | None, int | None]:
        """``(offer, code)``: preset E's step offered to the gradient kernel (``row_step``) when it is
        allowed, the model qualifies (``fused_adam.offerable``) and the step is an Adam step (the
        decision, posted at the previous step, is known before the gradient); ``code``: that decision
        when it was read here (None: not read yet)."""
        if not (self.fuse_row_steps and self._solver_free()):
            return None, None
        params = [p for g in self.param_groups for p in g["params"]]
        if not fused_adam.offerable(params):
            return None, None
        code = self._noise_take(coming=True)
        if code:
            return None, code
        return fused_adam.make_offer(self.param_groups, self._param_state, lambda group: True, sums=True), code

    def _step_after_offer(self, offer: RowStepOffer) -> None:
        """After an offered step: the taken parameters' step counts advance; the rest take the
        compiled pass, which also reads their statistics; x from all of them feeds the rule."""
        sums = np.zeros(3)
        stepped = False
        for group in self.param_groups:
            rest, taken_sums, taken = fused_adam.settle_offer(offer, group, self.state)
            sums += taken_sums
            stepped |= taken
            if rest:
                grads = [self._grad_of(p) for p in rest]
                sts = [self._param_state(p, group) for p in rest]
                fused_adam.check_offered_rest(rest, grads)
                sums += self._adam(group, rest, grads, sts, sums=True).reshape(3, -1).sum(axis=1)
                stepped = True
        if stepped:  # (no gradient anywhere: no step, and no statistics, as without an offer)
            self._noise_observe(gradient_departure(sums))

    def _noise_observe(self, x: Any) -> None:
        """x = (n, c) of this step yields the code for the next step, then joins the statistics."""
        opts = self.defaults
        switch, curvature = opts["switch_sensitivity"], opts["curvature_sensitivity"]
        beta, beta_var = opts["stat_beta"], variance_beta(opts["stat_beta"])
        if self._flow["steps"] >= opts["warmup_steps"] and (switch > 0.0 or not math.isinf(curvature)):
            self._mailbox.post(self._noise.code(x, switch, curvature, opts["noise_z"], beta_var))
        self._noise.update(x, beta, beta_var)

    def _solver_free(self) -> bool:
        """The "noise" rule with one Euler step: the ODE branch needs no solver and no closure call."""
        opts = self.defaults
        return opts["trigger"] == "noise" and opts["ode_method"] == "euler" and opts["ode_steps"] == 1

    def _flow_branch(self, closure: Closure, entries: list, g0: list[torch.Tensor]) -> bool:
        """The ODE branch: a solve (re-evaluating the closure), or preset E's solver-free Euler stage."""
        opts = self.defaults
        if not self._solver_free():
            return self._ode_step(closure, entries, g0=g0)
        for group, ps, gs, sts in entries:
            euler_flow_step(ps, gs, [st["exp_avg"] for st in sts], lr=group["lr"], t_scale=group["ode_t_scale"],
                            clip=opts["ode_clip"], gamma=group["momentum_blend_gamma"],
                            injection=opts["injection"], weight_decay=group["weight_decay"])
        return True

    @staticmethod
    def _as_stat(avg: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        return None if avg is None else avg.to(device=like.device, dtype=like.dtype)

    @staticmethod
    def _compiled(entries: list) -> bool:
        """Whether Adam's step runs as ``optim.fused_adam``'s compiled pass (large CPU models)."""
        params = [p for e in entries for p in e[1]]
        return fused_adam.large_enough(params) and all(
            fused_adam.supports([*ps, *gs, *(st[k] for st in sts for k in ("exp_avg", "exp_avg_sq"))])
            for group, ps, gs, sts in entries)

    def _adam(self, group: dict[str, Any], ps: list, gs: list, sts: list, sums: bool = False) -> np.ndarray | None:
        """Adam's step on one group: the compiled pass on large CPU models (with ``sums``, also the
        trigger statistics of ``everyday.departure_parts``, per tensor, in its layout), else
        torch's functional Adam (fused kernel where the device has it)."""
        beta1, beta2 = group["betas"]
        if sums or self._compiled([(group, ps, gs, sts)]):
            return fused_adam.adam_step(ps, gs, [st["exp_avg"] for st in sts], [st["exp_avg_sq"] for st in sts],
                                        [st["step"] for st in sts], lr=group["lr"], beta1=beta1, beta2=beta2,
                                        eps=group["eps"], weight_decay=group["weight_decay"], decoupled=True,
                                        sums=sums)
        fused = bool(group["fused"])
        _functional_adam(
            ps,
            gs,
            [st["exp_avg"] for st in sts],
            [st["exp_avg_sq"] for st in sts],
            [],
            [st["step"] for st in sts],
            foreach=None,
            fused=fused or None,
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
        return None

    def _ode_step(self, closure: Closure, entries: list, g0: list[torch.Tensor]) -> bool:
        """ODE branch; True on success, False (parameters restored) when the solve failed."""
        opts = self.param_groups[0]
        params = [p for e in entries for p in e[1]]
        horizons = [group["lr"] * group["ode_t_scale"] for group, *_ in entries]
        t_end = max(horizons)
        # Field factor per parameter: -T_g / T (exactly -1 for a single group).
        factors = [-(h / t_end) for (group, ps, *_), h in zip(entries, horizons) for _ in ps]
        clip = opts["ode_clip"]

        def field(grads: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
            out = torch._foreach_clamp_min(grads, -clip)
            torch._foreach_clamp_max_(out, clip)
            torch._foreach_mul_(out, factors)
            return tuple(out)

        def f(t: float, y: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            torch._foreach_copy_(params, list(y))
            self._call(closure)
            self._flow["ode_evals"] += 1
            grads = []
            for p in params:
                g = self._grad_of(p)
                grads.append(torch.zeros_like(p) if g is None else g)
            return field(grads)

        theta0 = tuple(p.detach().clone() for p in params)
        try:
            result = odeint(
                f,
                theta0,
                t_end,
                method=opts["ode_method"],
                f0=field(list(g0)),
                steps=opts["ode_steps"],
                rtol=opts["ode_tol"],
                atol=opts["ode_tol"],
            )
        except ODEFailure:
            torch._foreach_copy_(params, list(theta0))
            return False
        except BaseException:
            torch._foreach_copy_(params, list(theta0))  # never leave parameters mid-flow
            raise
        torch._foreach_copy_(params, list(result.y))
        offset = 0
        for group, ps, gs, sts in entries:
            k = len(ps)
            v = torch._foreach_sub(list(theta0[offset : offset + k]), list(result.y[offset : offset + k]))
            torch._foreach_div_(v, group["lr"])
            inject_momentum([st["exp_avg"] for st in sts], v, group["momentum_blend_gamma"], opts["injection"])
            if group["weight_decay"] != 0.0:
                torch._foreach_mul_(ps, 1.0 - group["lr"] * group["weight_decay"])
            offset += k
        return True
