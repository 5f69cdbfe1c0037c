"""Adam's update of large CPU models in one compiled pass on the kernels' two threads (numba).

Why not torch's fused CPU Adam: in the mini-batch loop torch runs on one thread (its CPU threads
spin and collapse when the machine is busy), and there its fused kernel took 3 ms of a 10-11 ms
step on the 10M-rating problem's 3.6M parameters. The compiled pass splits the elements in two
halves and runs them on ``kernel_pool``'s threads, which wait instead of spinning: 2.2-2.5 against
3.0 ms. FlowAdam's preset E also reads its trigger statistics (``||g||^2``, ``||m||^2``, ``g.m``)
in the same pass instead of a pass of their own (2.4-2.6 ms against 3.0 + 2.0).

Used from ``MIN_ELEMENTS`` parameters on (below, torch's kernels cost microseconds and keep
earlier runs' numbers bit for bit), for float32 / float64 parameters on the CPU with dense,
contiguous gradients, no amsgrad, no maximize, and a float learning rate; with numba only. The
update is torch's Adam / AdamW (``decoupled``) to float rounding (tested against torch.optim.Adam):
the halves are fixed whatever the thread count, so the numbers do not depend on it.

Where the trainer sets ``fuse_row_steps`` (laid-out CPU mini-batches, one process), the step is
first offered to the gradient kernel (``recsys_flowadam.row_step``), which takes it on the user
rows while it computes them, and on the item rows as it sums the item gradients of a batch split
in halves; this pass then updates the rest.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import numpy as np
import torch

from recsys_flowadam.kernel_pool import in_two
from recsys_flowadam.row_step import AdamRowStep, RowStepOffer, offering

__all__ = ["MIN_ELEMENTS", "Adam", "AdamW", "adam_step", "check_offered_rest", "kernels", "make_offer", "offerable",
           "row_step", "settle_offer", "supports"]

MIN_ELEMENTS = 1_000_000
_KERNELS: Any = None


def kernels() -> Any:
    """The compiled kernels' module (``optim.adam_kernels``), or None without numba."""
    global _KERNELS
    if _KERNELS is None:
        try:
            from recsys_flowadam.optim import adam_kernels
        except ImportError:
            _KERNELS = False
            return None
        _KERNELS = adam_kernels
    return _KERNELS or None


def supports(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether :func:`adam_step` takes these parameters (with their gradients and moments given as
    the same list's later entries or not): CPU, one float32/float64 dtype, dense and contiguous,
    and numba present (the size is :func:`large_enough`'s question)."""
    if not tensors:
        return False
    dtype = tensors[0].dtype
    return (dtype in (torch.float32, torch.float64)
            and all(t.device.type == "cpu" and t.dtype == dtype and t.layout == torch.strided and t.is_contiguous()
                    for t in tensors)
            and kernels() is not None)


def large_enough(params: Sequence[torch.Tensor]) -> bool:
    return sum(p.numel() for p in params) >= MIN_ELEMENTS


def _halves(sizes: Sequence[int]) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """The elements of tensors of ``sizes``, as one sequence, cut in two halves: per half a list of
    ``(tensor, lo, hi)`` pieces."""
    total = sum(sizes)
    cut = total // 2
    first, second = [], []
    offset = 0
    for t, n in enumerate(sizes):
        lo, hi = offset, offset + n
        if n == 0:
            continue
        if lo < cut:
            first.append((t, 0, min(hi, cut) - lo))
        if hi > cut:
            second.append((t, max(lo, cut) - lo, n))
        offset = hi
    return first, second


def adam_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
              exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[torch.Tensor], *, lr: float, beta1: float,
              beta2: float, eps: float, weight_decay: float, decoupled: bool, sums: bool = False) -> np.ndarray | None:
    """One Adam (``decoupled``: AdamW) step on the tensors, in place; each ``steps`` entry (torch's
    per-parameter step count, a scalar tensor) is advanced first, as torch does. With ``sums``,
    returns ``[g_i.g_i..., m_i.m_i..., g_i.m_i...]`` (float64, m before the step): the layout of
    :func:`~recsys_flowadam.optim.everyday.departure_parts`."""
    k = kernels()
    flat = [(p.detach().view(-1).numpy(), g.detach().view(-1).numpy(), m.view(-1).numpy(), v.view(-1).numpy())
            for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs)]
    like = flat[0][0].dtype.type
    scalars = []
    for step in steps:
        step += 1
        n = float(step)
        step_size = lr / (1.0 - beta1**n)
        bc2_sqrt = (1.0 - beta2**n) ** 0.5
        decay = 1.0 - lr * weight_decay if decoupled else 1.0
        l2 = 0.0 if decoupled else weight_decay
        scalars.append(tuple(like(x) for x in (beta1, beta2, step_size, bc2_sqrt, eps, decay, l2)))

    def run(pieces: list[tuple[int, int, int]]) -> list[tuple[int, tuple[float, float, float]]]:
        return [(t, k.adam_range(*flat[t], lo, hi, *scalars[t], sums)) for t, lo, hi in pieces]

    first, second = _halves([len(f[0]) for f in flat])
    done_first, done_second = in_two(lambda: run(first), lambda: run(second))
    if not sums:
        return None
    out = np.zeros((3, len(flat)), dtype=np.float64)
    for t, part in done_first + done_second:  # the first half's piece of a tensor, then the second's
        out[:, t] += part
    return out.reshape(-1)


def _plain(opt: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    """Whether ``group`` asks for the plain step the compiled pass takes: the fused kernel, no
    amsgrad, maximize, capturable or differentiable step, a float rate, and no AMP gradient scaling
    (``GradScaler`` leaves unscaling and inf-skipping to a fused step: torch's does them)."""
    return (bool(group.get("fused")) and not (group["amsgrad"] or group["maximize"] or group["capturable"]
                                             or group["differentiable"])
            and not isinstance(group["lr"], torch.Tensor)
            and getattr(opt, "grad_scale", None) is None and getattr(opt, "found_inf", None) is None)


def _compiled_group(opt: torch.optim.Optimizer, group: dict[str, Any]) -> tuple | None:
    """``(params, grads, exp_avgs, exp_avg_sqs, steps)`` of ``group`` (torch's state, made as torch
    makes it) when the compiled pass takes it, else None (torch's step serves)."""
    if not _plain(opt, group):
        return None
    params = [p for p in group["params"] if p.grad is not None]
    if not params or not large_enough(params) or any(p.grad.is_sparse for p in params) or not supports(params):
        return None
    ps, gs, ms, vs, maxs, steps = [], [], [], [], [], []
    opt._init_group(group, ps, gs, ms, vs, maxs, steps)  # type: ignore[attr-defined]  (torch's own state layout)
    return (ps, gs, ms, vs, steps) if supports([*ps, *gs, *ms, *vs]) else None


def row_step(state: dict[str, Any], lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
             decoupled: bool, sums: bool = False) -> AdamRowStep | None:
    """The coming step of a parameter with Adam ``state`` as an offer a gradient kernel may take
    (``row_step``); None for Adam's L2 weight decay (added to the gradient: not offered)."""
    if weight_decay and not decoupled:
        return None
    n = float(state["step"]) + 1.0
    scalars = (beta1, beta2, lr / (1.0 - beta1**n), (1.0 - beta2**n) ** 0.5, eps,
               1.0 - lr * weight_decay if decoupled else 1.0)
    return AdamRowStep(state["exp_avg"], state["exp_avg_sq"], scalars, sums)


def make_offer(groups: Sequence[dict[str, Any]], state_of: Callable[[torch.Tensor, dict[str, Any]], dict[str, Any]],
               decoupled_of: Callable[[dict[str, Any]], bool], sums: bool = False) -> RowStepOffer:
    """The coming step of every parameter of ``groups`` that can be offered (:func:`row_step`), its
    state from ``state_of(param, group)`` (made there when missing)."""
    offer = RowStepOffer()
    for group in groups:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            step = row_step(state_of(p, group), float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"],
                            decoupled_of(group), sums)
            if step is not None:
                offer.add(p, step)
    return offer


def settle_offer(offer: RowStepOffer, group: dict[str, Any],
                 state: dict[torch.Tensor, Any]) -> tuple[list[torch.Tensor], np.ndarray, bool]:
    """After an offered step: advance the step count of ``group``'s parameters whose step the kernel
    took; returns ``(rest, sums, taken)``: the parameters with a gradient still to step, the taken
    steps' summed statistics and whether any was taken."""
    rest, sums, taken = [], np.zeros(3), False
    for p in group["params"]:
        if offer.taken(p):
            state[p]["step"] += 1
            sums += offer.get(p).taken
            taken = True
        elif p.grad is not None:
            rest.append(p)
    return rest, sums, taken


def check_offered_rest(rest: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """The parameters an offered step left to the optimizer must take the compiled pass."""
    if not supports([*rest, *grads]):
        raise RuntimeError("a gradient the compiled Adam pass cannot take (not dense, contiguous, on the CPU in the "
                           "parameters' dtype) in a step offered to the gradient kernel")


def offerable(params: Sequence[torch.Tensor]) -> bool:
    """Whether steps on these parameters may be offered: large CPU models the compiled pass takes."""
    return large_enough(params) and supports(params)


def _torch_state(opt: torch.optim.Optimizer, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
    """``p``'s Adam state, made as torch.optim.Adam makes it when missing."""
    state = opt.state[p]
    if len(state) == 0:
        state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if group["fused"]
                         else torch.tensor(0.0, dtype=torch.float32))
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


class _CompiledCpuStep:
    """``step`` for torch's Adam and AdamW: when every group asked for the fused kernel
    (``fused=True``) and qualifies (see the module doc), the compiled pass; else torch's own step."""

    fuse_row_steps = False  # set by the trainer where the gradient kernel may take the step (row_step)

    def _offer(self) -> RowStepOffer | None:
        """This step offered to the gradient kernel (``row_step``), when allowed and every group qualifies."""
        groups = self.param_groups  # type: ignore[attr-defined]
        if not self.fuse_row_steps or not all(_plain(self, g) for g in groups):  # type: ignore[arg-type]
            return None
        if not offerable([p for g in groups for p in g["params"]]):
            return None
        return make_offer(groups, lambda p, group: _torch_state(self, group, p),  # type: ignore[arg-type]
                          lambda group: bool(group["decoupled_weight_decay"]))

    def _step_after_offer(self, offer: RowStepOffer) -> None:
        """Advance the step counts of the parameters whose step the kernel took; the rest, the compiled pass."""
        for group in self.param_groups:  # type: ignore[attr-defined]
            rest, _, _ = settle_offer(offer, group, self.state)  # type: ignore[attr-defined]
            if not rest:
                continue
            states = [self.state[p] for p in rest]  # type: ignore[attr-defined]
            grads = [p.grad for p in rest]
            beta1, beta2 = group["betas"]
            check_offered_rest(rest, grads)
            adam_step(rest, grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                      [st["step"] for st in states], lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                      eps=group["eps"], weight_decay=group["weight_decay"],
                      decoupled=bool(group["decoupled_weight_decay"]))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        offer = self._offer() if closure is not None else None
        if closure is not None:
            with torch.enable_grad(), offering(offer):
                loss = closure()
        if offer is not None:
            self._step_after_offer(offer)
            return loss
        parts = [_compiled_group(self, group) for group in self.param_groups]  # type: ignore[attr-defined]
        if any(p is None for p in parts):
            # torch's step, as it is: unwrapped (this step already ran the optimizer's hooks), under
            # the grad mode torch's own wrapper would set
            with torch.set_grad_enabled(bool(self.defaults["differentiable"])):  # type: ignore[attr-defined]
                inspect.unwrap(torch.optim.Adam.step)(self)
            return loss
        for group, group_parts in zip(self.param_groups, parts):  # type: ignore[attr-defined]
            beta1, beta2 = group["betas"]
            adam_step(*group_parts, lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                      weight_decay=group["weight_decay"], decoupled=bool(group["decoupled_weight_decay"]))
        return loss


class Adam(_CompiledCpuStep, torch.optim.Adam):
    """``torch.optim.Adam``; with ``fused=True`` on a large CPU model, its step is the compiled pass."""


class AdamW(_CompiledCpuStep, torch.optim.AdamW):
    """``torch.optim.AdamW``; with ``fused=True`` on a large CPU model, its step is the compiled pass."""
