"""A mini-batch's loss and gradient in one compiled pass over its ratings (CPU, numba).

Why not torch ops: on the CPU the gather / product / row-sum / scatter chain of
:class:`~recsys_flowadam.models.minibatch.MiniBatchPath` writes and reads (m, rank)
intermediates several times and sorts the batch twice for its scatters; about 9 ms of a
100k-rating step at rank 20 on one thread. The kernel (``models.fused_kernels.data_term``)
walks the users in order (a counting sort, no comparison sort, none at all for batches laid out
user by user), touches each rating's rows once and writes every gradient whole. Batches of
``PARALLEL_MIN_RATINGS`` or more are split in two halves of the users at their median user,
computed at once on two threads (``kernel_pool.KERNEL_THREADS``; else one after the other, with
the same numbers): each half writes only its own users' rows, and the second half's item
gradients go to a buffer of their own, added after (no races); where the optimizer offered its
step (``row_step``), that sum is the items' Adam step, on both threads (about 0.5 ms of a 10M step
saved against writing the sum and stepping in a pass of the optimizer's). The users' L2 term rides along
that walk; the items' is written where the first half builds its scratch item rows. Indices are
checked inside the kernel.

For biased MF and MF (no context mode), MSE or Huber, float32 or float64; the same sums as the
other paths up to float rounding (tested against autograd to 1e-5). :func:`available` says
whether numba imports; without it the torch path is used.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from recsys_flowadam.models.coords import Coords
from recsys_flowadam.models.factorization import Objective
from recsys_flowadam.kernel_pool import in_two
from recsys_flowadam.row_step import AdamRowStep
from recsys_flowadam.row_step import current as current_offer

_KERNELS: dict[str, Any] | None = None
PARALLEL_MIN_RATINGS = 20_000  # smaller batches stay whole: the hand-off would cost what a half saves
USER_ROWS = ("user_factors", "user_bias")  # the two sides' rows whose offered step the kernels may take
ITEM_ROWS = ("item_factors", "item_bias")


def available() -> bool:
    """Whether the compiled kernels can be used (numba imports)."""
    return _kernels() is not None


def _kernels() -> dict[str, Any] | None:
    """The compiled kernels (``models.fused_kernels``; numba compiles them on first use and caches
    them on disk); None without numba."""
    global _KERNELS
    if _KERNELS is None:
        try:
            from recsys_flowadam.models import fused_kernels
        except ImportError:  # no numba: the torch path serves instead
            _KERNELS = {}
            return None
        _KERNELS = {"data_term": fused_kernels.data_term, "row_dots": fused_kernels.row_dots,
                    "summed_adam_range": fused_kernels.summed_adam_range, "median_user": fused_kernels.median_user}
    return _KERNELS or None


def supports(params: dict[str, torch.Tensor], objective: Objective, device: torch.device) -> bool:
    """Whether the fused kernels compute this model's gradient: CPU, no context mode or implicit
    factors, float32/float64 parameters, and numba present."""
    names = set(params)
    return (device.type == "cpu" and names <= {"user_factors", "item_factors", "user_bias", "item_bias"}
            and params["user_factors"].dtype in (torch.float32, torch.float64)
            and objective.loss in ("mse", "huber") and available())


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def loss_and_grad(params: dict[str, torch.Tensor], batch: Coords, objective: Objective,
                  extra: torch.Tensor | None = None, with_g: bool = False):
    """``(loss, grads)`` of the batch mean plus the L2 term of ``params``, as ``MiniBatchPath``
    returns them (fresh gradient tensors: an optimizer may hold one closure call's while it makes
    the next). Where the optimizer offered its step (``row_step``) and the kernel took it on the
    user factors and biases (and, on batches split in halves, on the item factors and biases, as
    it sums the halves' item gradients), ``grads`` has no entry for them: their step is done. ``extra``: a
    per-rating addition to the prediction; ``with_g``: also return each rating's ``psi(r) / m``
    (``(loss, grads, g)``), from which the gradient of such an addition follows."""
    k = _kernels()
    assert k is not None
    users = _np(batch.users)
    split_in_two = len(users) >= PARALLEL_MIN_RATINGS
    user_steps = _row_steps(params, extra is None and not with_g, USER_ROWS)
    item_steps = _row_steps(params, user_steps is not None and split_in_two, ITEM_ROWS)
    stepped_here = {**(user_steps or {}), **(item_steps or {})}
    # the kernel writes every gradient whole, the L2 terms included (the items' in the first half)
    grads = {name: torch.empty(p.shape, dtype=p.dtype) for name, p in params.items()
             if name not in stepped_here}  # (no gradient where the kernel takes Adam's step)
    U, V = _np(params["user_factors"].contiguous()), _np(params["item_factors"].contiguous())
    has_bias = "user_bias" in params
    empty = np.empty(0, dtype=U.dtype)
    bu = _np(params["user_bias"]) if has_bias else empty
    bi = _np(params["item_bias"]) if has_bias else empty
    dbu = _np(grads["user_bias"]) if has_bias and user_steps is None else empty
    if not has_bias:
        dbi = empty
    else:  # (a buffer of its own where the items' step is taken here)
        dbi = np.empty_like(bi) if "item_bias" in stepped_here else _np(grads["item_bias"])
    items = _np(batch.items)
    values = _np(batch.values.to(params["user_factors"].dtype))
    like = U.dtype.type  # the per-rating arithmetic stays in the parameters' dtype
    extra_np = empty if extra is None else _np(extra.to(params["user_factors"].dtype).contiguous())
    g = torch.empty(len(users), dtype=params["user_factors"].dtype) if with_g else None
    w_user_np = _weights(objective, "user_factors", U.dtype)  # the kernel weighs b_u's L2 term alike
    w_item_np, w_item_bias_np = (_weights(objective, name, U.dtype) for name in ("item_factors", "item_bias"))
    dU = empty.reshape(0, 0) if user_steps is not None else _np(grads["user_factors"])
    dV = np.empty(V.shape, dtype=V.dtype) if item_steps is not None else _np(grads["item_factors"])
    moments = _row_step_arrays(user_steps, has_bias, empty)

    def users_in(lo: int, hi: int, dV_part: np.ndarray, dbi_part: np.ndarray, item_l2: bool) -> tuple[float, ...]:
        return k["data_term"](
            users, items, values, U, V, bu, bi, like(objective.offset), objective.loss == "huber",
            like(objective.huber_delta), like(2.0 / max(len(users), 1)), dU, dV_part, dbu, dbi_part, extra_np,
            empty if g is None else _np(g), w_user_np, float(objective.reg), float(objective.bias_reg), lo, hi,
            *moments, item_l2, w_item_np, w_item_bias_np)

    n_users = len(U)
    if not split_in_two:
        data, penalty, *sums = users_in(0, n_users, dV, dbi, True)
    else:
        # two halves of the users (at once when KERNEL_THREADS allows; the kernel releases the
        # GIL), split at the batch's median user; each half writes its own users' rows, the
        # second half's item gradients go to a buffer of their own, added after (or summed
        # inside the items' Adam step, where it is taken here)
        split = median_user(users, n_users)
        dV_second, dbi_second = np.empty_like(dV), np.empty_like(dbi)
        first, second = in_two(lambda: users_in(0, split, dV, dbi, True),
                               lambda: users_in(split, n_users, dV_second, dbi_second, False))
        data, penalty, *sums = (a + b for a, b in zip(first, second))
        if item_steps is not None:
            _take_item_steps(k, item_steps, V, bi, (dV, dV_second), (dbi, dbi_second))
        else:
            dV += dV_second
            dbi += dbi_second
    if user_steps is not None:  # taken: the rows' statistics, for whoever asked (FlowAdam's trigger)
        _mark_taken(user_steps, np.array(sums, dtype=np.float64))
    loss = torch.tensor(data + penalty, dtype=params["user_factors"].dtype)
    return (loss, grads, g) if with_g else (loss, grads)


def _weights(objective: Objective, name: str, dtype: np.dtype) -> np.ndarray:
    """``name``'s L2 row weights as the kernel takes them: in their own dtype where it is float32 or
    float64 (the kernel widens each to float64 exactly; no converted copy each step), else as
    float64; empty (uniform 1) in ``dtype``, the parameters', so that the kernel has one
    signature per parameter dtype."""
    w = objective.row_weights(name)
    if w is None:
        return np.empty(0, dtype=dtype)
    return _np((w if w.dtype in (torch.float32, torch.float64) else w.to(torch.float64)).contiguous())


def _row_steps(params: dict[str, torch.Tensor], allowed: bool,
               rows: tuple[str, str]) -> dict[str, AdamRowStep] | None:
    """The offered Adam steps (``row_step``) this kernel takes on one side's ``rows`` (factors,
    biases): on the factors (and the biases, with the same scalars), when both are offered; None:
    none taken, gradients as usual."""
    offer = current_offer()
    if offer is None or not allowed:
        return None
    names = [name for name in rows if name in params]
    steps = {name: offer.get(params[name]) for name in names}
    if (any(st is None or st.taken is not None for st in steps.values())  # a step is taken once
            or len({st.scalars for st in steps.values()}) != 1):
        return None
    for name, st in steps.items():
        p = params[name]
        if not (st.exp_avg.dtype == st.exp_avg_sq.dtype == p.dtype and st.exp_avg.shape == p.shape
                and st.exp_avg.is_contiguous() and st.exp_avg_sq.is_contiguous() and p.is_contiguous()
                and st.exp_avg.device.type == "cpu"):
            return None
    return steps


def _mark_taken(steps: dict[str, AdamRowStep], sums: np.ndarray) -> None:
    """Record the steps as taken, with the side's statistics (on the factors; the biases' count there)."""
    for name, st in steps.items():
        st.taken = sums if name.endswith("_factors") else np.zeros(3)


def _take_item_steps(kernels: dict[str, Any], steps: dict[str, AdamRowStep], V: np.ndarray, bi: np.ndarray,
                     dV: tuple[np.ndarray, np.ndarray], dbi: tuple[np.ndarray, np.ndarray]) -> None:
    """Adam's offered step on the item factors (and biases), their gradient the sum of the two
    halves' parts (``dV``, ``dbi``); each half of the factors' elements on one of the kernels'
    threads, the biases with the first (fixed halves: the numbers do not depend on the threads)."""
    run = kernels["summed_adam_range"]
    sv = steps["item_factors"]
    sb = steps.get("item_bias")
    adam = np.array(sv.scalars, dtype=np.float64)
    flat = (V.reshape(-1), dV[0].reshape(-1), dV[1].reshape(-1), _np(sv.exp_avg).reshape(-1),
            _np(sv.exp_avg_sq).reshape(-1))
    half = V.size // 2

    def first() -> np.ndarray:
        out = np.array(run(*flat, 0, half, adam))
        if sb is not None:
            out += run(bi, dbi[0], dbi[1], _np(sb.exp_avg), _np(sb.exp_avg_sq), 0, len(bi), adam)
        return out

    a, b = in_two(first, lambda: np.array(run(*flat, half, V.size, adam)))
    _mark_taken(steps, a + b)


def _row_step_arrays(steps: dict[str, AdamRowStep] | None, has_bias: bool, empty: np.ndarray) -> tuple:
    """``(mU, vU, mbu, vbu, adam)`` of ``data_term``: empty arrays when no step is taken."""
    if steps is None:
        return empty.reshape(0, 0), empty.reshape(0, 0), empty, empty, np.empty(0, dtype=np.float64)
    su = steps["user_factors"]
    sb = steps.get("user_bias") if has_bias else None
    return (_np(su.exp_avg), _np(su.exp_avg_sq), empty if sb is None else _np(sb.exp_avg),
            empty if sb is None else _np(sb.exp_avg_sq), np.array(su.scalars, dtype=np.float64))


def row_dots(P: torch.Tensor, Q: torch.Tensor, rows_p: torch.Tensor, rows_q: torch.Tensor) -> torch.Tensor | None:
    """``(P[rows_p] * Q[rows_q]).sum(1)`` in one compiled pass, without the two (n, rank) gathers
    (validation of 100k ratings at rank 50: about 2 against 20 ms); None where it does not apply
    (not CPU, other dtypes, no numba): the caller gathers then."""
    if (P.device.type != "cpu" or Q.device != P.device or rows_p.device != P.device
            or rows_q.device != P.device or P.dtype not in (torch.float32, torch.float64) or Q.dtype != P.dtype
            or P.dim() != 2 or Q.dim() != 2 or P.shape[1] != Q.shape[1] or rows_p.dim() != 1
            or rows_p.shape != rows_q.shape or rows_p.dtype not in (torch.int32, torch.int64)
            or rows_q.dtype != rows_p.dtype):
        return None
    k = _kernels()  # (numba is imported only for CPU tensors)
    if k is None:
        return None
    n = rows_p.shape[0]
    out = np.empty(n, dtype=_np(P).dtype)
    args = (_np(P.contiguous()), _np(Q.contiguous()), _np(rows_p.contiguous()), _np(rows_q.contiguous()))
    if n < PARALLEL_MIN_RATINGS:
        k["row_dots"](*args, out)
    else:  # each half of the pairs on one of the kernels' threads (every element stands alone)
        half = n // 2
        in_two(lambda: k["row_dots"](*(a if j < 2 else a[:half] for j, a in enumerate(args)), out[:half]),
               lambda: k["row_dots"](*(a if j < 2 else a[half:] for j, a in enumerate(args)), out[half:]))
    return torch.from_numpy(out)


def median_user(users: np.ndarray, n_users: int) -> int:
    """The first user at or past whom half of the ratings lie (the split of :func:`loss_and_grad`):
    even halves whatever the batch's order. Batches laid out user by user (``SlottedMiniBatches``)
    hold it at their middle position: one compiled pass checks their order (numpy's check took 0.3 ms
    of a 178k-rating step) instead of a count of all the users."""
    k = _kernels()
    assert k is not None  # (the gradient kernel's split: numba is there)
    return int(k["median_user"](users, n_users))
