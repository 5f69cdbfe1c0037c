"""Mini-batch loss and gradient written out by hand (no autograd graph).

For a batch of ``m`` ratings with residuals ``r_k = pred_k - y_k``::

    L  = (1/m) sum_k rho(r_k) + penalty(params)          (the objective, see ``factorization``)
    g  = psi(r) / m                                      (per-rating data gradient)
    dU = P_U + scatter_add(users, g * V[items] [* W[contexts]])
    dV = P_V + scatter_add(items, g * U[users] [* W[contexts]])
    dW = P_W + scatter_add(contexts, g * U[users] * V[items])
    db_u = P_bu + scatter_add(users, g),  db_i = P_bi + scatter_add(items, g)

where ``P`` is the gradient of the whole L2 penalty (every row, as ``AutogradPath`` does for a
batch: each batch loss is an unbiased estimate of the full-batch objective), added into the
data gradient in one fused pass per tensor (``add_`` / ``addcmul_``). The
scatter-adds are ``models.scatter.scatter_rows``: a sort and one ``embedding_bag`` per factor
matrix on the CPU (about 3x faster there than ``index_add_``), ``index_add_`` on a GPU.

Everything stays on the parameters' device; nothing is read back to the host.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from contextlib import contextmanager
from typing import Iterator

import torch

from recsys_flowadam.models import fused_cpu
from recsys_flowadam.models.coords import Coords
from recsys_flowadam.models.factorization import Objective
from recsys_flowadam.models.scatter import SCATTER_METHODS, default_method, scatter_rows, sort_order


def add_penalty(objective: Objective, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                workspace: "Workspace | None" = None) -> torch.Tensor:
    """Add the L2 term's gradient into ``grads`` (in place, one fused pass per tensor) and
    return the term's value (the same sums as ``Objective.penalty``). A weighted factor matrix's
    row norms go through ``workspace`` (``p * p`` there, then one matrix-vector product): no
    fresh parameter-sized temporary per step (see :class:`Workspace`), and a BLAS row sum."""
    total = params["user_factors"].new_zeros(())
    for name, p in params.items():
        lam = objective.bias_reg if name.endswith("_bias") else objective.reg
        if not lam:
            continue
        p = p.detach()
        w = objective.row_weights(name)
        if w is None:
            grads[name].add_(p, alpha=2.0 * lam)
            total = total + lam * torch.dot(p.reshape(-1), p.reshape(-1))
            continue
        w = w.to(p.dtype)
        grads[name].addcmul_(w if p.dim() == 1 else w[:, None], p, value=2.0 * lam)
        total = total + lam * torch.dot(w, p * p if p.dim() == 1 else _row_squares(p, name, workspace))
    return total


def _row_squares(p: torch.Tensor, name: str, workspace: "Workspace | None") -> torch.Tensor:
    """``||p_r||^2`` of every row of a matrix (``p * p`` in the workspace when one is given)."""
    sq = torch.mul(p, p, out=workspace.get(f"sq.{name}", tuple(p.shape), p)) if workspace is not None else p * p
    return torch.mv(sq, p.new_ones(p.shape[1]))


class Workspace:
    """Scratch memory reused from batch to batch for the largest temporaries (the batch sorted by
    user, the gathered rows and their product). Fresh tensors of several MB every step cost more
    than the arithmetic on the CPU: the allocator hands the pages back to the system and takes
    them again (page faults, about half the step at 100k x rank 20)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A tensor of ``shape`` with ``like``'s dtype and device, in ``name``'s memory (grown as needed)."""
        n = 1
        for d in shape:
            n *= d
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != like.dtype or buf.device != like.device or buf.numel() < n:
            buf = self._buffers[name] = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(shape)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
RETAINED_BYTES = 256 << 20  # free memory the heap keeps at its top instead of handing back
MMAP_BYTES = 32 << 20  # allocations from here up are mapped afresh (glibc's largest setting)


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextmanager
def retained_heap() -> Iterator[None]:
    """Keep freed memory in the process while the block runs (glibc only; elsewhere a no-op).

    A mini-batch step frees and takes again a few MB (the gradients, sort results): with glibc's
    default thresholds these come from fresh pages every step (mapped, or the heap trimmed and
    grown again), about 1,700 page faults and a third of a 100k-rating step at rank 20. With the
    mapping threshold at its largest (32 MiB) and the trim threshold at 256 MiB they are reused.
    The thresholds stay so (memory freed later is kept up to 256 MiB); on leaving, the free
    memory is handed back once (``malloc_trim``). Peak memory is unchanged: only freed memory is kept."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, RETAINED_BYTES)
    try:
        yield
    finally:
        if libc is not None:
            libc.malloc_trim(0)


class MiniBatchPath:
    """Loss and gradients of a batch of ratings (or all of them) by gathers and scatter-adds.

    Same contract as :class:`~recsys_flowadam.models.autograd_path.AutogradPath`:
    ``loss_and_grad(params, batch)`` returns ``(loss, grads)``; ``batch=None`` means every
    training rating. ``scatter``: how rows are scatter-added (``models.scatter``), or ``"fused"``:
    the whole gradient in one compiled pass (``models.fused_cpu``; CPU, MF and biased MF). Default:
    fused where it applies and numba is installed, else by device.
    """

    name = "minibatch"

    def __init__(self, coords: Coords, objective: Objective, scatter: str | None = None):
        if scatter is not None and scatter not in (*SCATTER_METHODS, "fused"):
            raise ValueError(f"unknown scatter method {scatter!r}; choose one of {', '.join(SCATTER_METHODS)}, fused")
        self.coords = coords
        self.objective = objective
        self.fused = scatter in (None, "fused")  # when fused_cpu.supports the parameters
        if scatter == "fused" and not fused_cpu.available():
            raise ValueError("the fused mini-batch kernels need numba (pip install numba)")
        self.scatter = default_method(coords.values.device) if scatter in (None, "fused") else scatter
        self.workspace = Workspace()

    def loss_and_grad(self, params: dict[str, torch.Tensor], batch: Coords | None = None):
        """Return ``(loss, grads)`` with grads a dict like ``params`` (nothing is written to .grad),
        less the parameters whose offered step the fused kernel took (``fused_cpu.loss_and_grad``)."""
        batch = self.coords if batch is None else batch
        obj = self.objective
        if self.fused and fused_cpu.supports(params, obj, batch.values.device):
            with torch.no_grad():
                return fused_cpu.loss_and_grad(params, batch, obj)
        with torch.no_grad():
            if self.scatter == "segment":  # by user: U is read in order and dU needs no sort of its own
                batch = _select(batch, sort_order(batch.users), self.workspace)
            rows = _gathered_rows(params, batch, self.workspace)
            r = _residuals(params, batch, rows, obj.offset, self.workspace)
            m = len(batch)
            if obj.loss == "mse":
                data = torch.dot(r, r) / m
                g = r.mul_(2.0 / m)
            else:
                data = obj.rho(r).sum() / m
                g = obj.psi(r).div_(m)
            grads = self._data_grads(params, batch, rows, g)
            return data + add_penalty(obj, params, grads, self.workspace), {k: grads[k] for k in params}

    def _data_grads(self, params: dict[str, torch.Tensor], batch: Coords, rows: dict[str, torch.Tensor],
                    g: torch.Tensor) -> dict[str, torch.Tensor]:
        """The data term's gradient of every parameter (fresh tensors)."""
        U, V = params["user_factors"].detach(), params["item_factors"].detach()
        method = self.scatter
        by_user = method == "segment"  # loss_and_grad sorted the batch by user
        if "w" in rows:  # cp: each mode's rows are the product of the other two gathered rows
            u, v, w = rows["u"], rows["v"], rows["w"]
            n_ctx = len(params["context_factors"])
            grads = {"user_factors": scatter_rows(batch.users, len(U), v * w, None, g, method, index_sorted=by_user),
                     "item_factors": scatter_rows(batch.items, len(V), u * w, None, g, method),
                     "context_factors": scatter_rows(batch.contexts, n_ctx, u * v, None, g, method)}
        elif method == "segment":  # embedding_bag gathers the table rows itself
            grads = {"user_factors": scatter_rows(batch.users, len(U), V, batch.items, g, method, index_sorted=True),
                     "item_factors": scatter_rows(batch.items, len(V), U, batch.users, g, method)}
        else:
            grads = {"user_factors": scatter_rows(batch.users, len(U), rows["v"], None, g, method),
                     "item_factors": scatter_rows(batch.items, len(V), rows["u"], None, g, method)}
        if "user_bias" in params:
            grads["user_bias"] = torch.zeros_like(params["user_bias"]).index_add_(0, batch.users, g)
            grads["item_bias"] = torch.zeros_like(params["item_bias"]).index_add_(0, batch.items, g)
        return grads


def _select(batch: Coords, order: torch.Tensor, ws: Workspace) -> Coords:
    """``batch.select(order)`` written into the workspace."""
    def take(name: str, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.index_select(t, 0, order, out=ws.get(name, tuple(order.shape), t))

    return Coords(take("users", batch.users), take("items", batch.items), take("values", batch.values),
                  take("contexts", batch.contexts))


def _gathered_rows(params: dict[str, torch.Tensor], batch: Coords, ws: Workspace) -> dict[str, torch.Tensor]:
    """The factor rows each rating touches: ``u``, ``v`` and (cp) ``w``, shape (m, rank), in the workspace."""
    def gather(name: str, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        table = table.detach()
        return torch.index_select(table, 0, index, out=ws.get(name, (len(index), table.shape[1]), table))

    rows = {"u": gather("u", params["user_factors"], batch.users),
            "v": gather("v", params["item_factors"], batch.items)}
    if "context_factors" in params:
        rows["w"] = gather("w", params["context_factors"], batch.contexts)
    return rows


def _residuals(params: dict[str, torch.Tensor], batch: Coords, rows: dict[str, torch.Tensor],
               offset: float, ws: Workspace) -> torch.Tensor:
    """``pred - y`` for every rating of the batch (a fresh tensor)."""
    prod = torch.mul(rows["u"], rows["v"], out=ws.get("prod", tuple(rows["u"].shape), rows["u"]))
    if "w" in rows:
        prod.mul_(rows["w"])
    r = torch.mv(prod, prod.new_ones(prod.shape[1]))  # the row sums by BLAS: faster than sum(dim=1)
    if "user_bias" in params:
        r.add_(params["user_bias"].detach().index_select(0, batch.users))
        r.add_(params["item_bias"].detach().index_select(0, batch.items))
    return r.sub_(batch.values).add_(offset)
