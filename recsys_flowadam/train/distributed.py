"""Data-parallel training across processes and machines with ``torch.distributed``.

Launched by ``torchrun`` (``torchrun --nproc_per_node=N -m recsys_flowadam train ...``), which
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; the same
variables set by hand (one process per rank) work too. Backend: gloo on the CPU, NCCL on CUDA
(each rank takes ``cuda:LOCAL_RANK``).

Scheme (every rank holds the full, identical parameters; only the ratings are split):

- a seeded, balanced partition of the training ratings: rank ``r`` keeps ratings
  ``perm[r::N]`` of a permutation drawn from the seed, so shard sizes differ by at most one;
- the objective is the mean loss over ALL training ratings plus the L2 penalty. Each rank
  computes its shard's data term scaled to ``sum(rho) / n_global`` (a shard path's mean times
  ``n_shard / n_global``), rank 0 alone adds the penalty, and ONE ``all_reduce(SUM)`` over a
  flat bucket of [every gradient, the loss] per closure call gives every rank the exact
  global loss and gradient;
- hence every rank's optimizer sees the identical gradient and takes the identical step, and
  FlowAdam's statistics and trigger decisions (and L-BFGS's line search) agree on all ranks;
- rank 0 evaluates, logs, writes checkpoints and the artifact, and broadcasts the early-stopping
  decision; the other ranks stay silent.

In the trainer this scheme is a choice of parts, not branches through the loop:
``batches.ShardData`` (the shard, and :func:`reduce_closure_result` as its gradient reduction),
``batches.ShardMiniBatches`` (each rank's share of a global mini-batch) and
``evaluator.BroadcastStop`` (rank 0's early-stopping decision on every rank).

Why an explicit all-reduce and not ``DistributedDataParallel``: DDP hooks autograd's backward
pass, but the full-batch paths write ``.grad`` analytically (matmuls / SpMM, no autograd graph),
so DDP would never fire; and FlowAdam (ODE stages) and L-BFGS (line search) re-evaluate the
closure at moved parameters several times inside one step, each evaluation needing its own
reduction, which DDP's once-per-backward bucketing does not model. One collective per closure
call is also the minimum any scheme needs.

A dead or stuck peer makes the collective fail (gloo notices a closed connection at once, and
every collective is bounded by the process-group timeout), raising :class:`PeerLostError`
with what to do next instead of hanging.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

DEFAULT_TIMEOUT_S = 300.0
PARTITION_SEED_OFFSET = 7919  # the partition's generator is independent of init (seed) and shuffling (seed + 1)
_ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class PeerLostError(RuntimeError):
    """A collective failed or timed out: another rank died, hung or cannot be reached."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    timeout_s: float

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """CUDA without an index -> ``cuda:LOCAL_RANK`` (one GPU per rank); anything else as is."""
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def partition(self, n: int, seed: int) -> torch.Tensor:
        """This rank's indices (sorted, CPU int64) of a seeded balanced partition of ``range(n)``."""
        return partition_indices(n, self.world_size, self.rank, seed)

    def shard_sizes(self, n: int) -> list[int]:
        """Every rank's shard size (known to all ranks without communication)."""
        return [len(range(r, n, self.world_size)) for r in range(self.world_size)]

    def all_reduce_sum(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """In-place SUM over ranks; a failing/timed-out peer raises :class:`PeerLostError`."""
        import torch.distributed as dist

        try:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        except RuntimeError as exc:  # DistBackendError, gloo "Connection closed by peer", timeouts
            raise self._lost(what, exc) from exc
        return tensor

    def broadcast_ints(self, values: list[int], what: str, device: torch.device) -> list[int]:
        """Rank 0's ``values`` on every rank (one small collective)."""
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int64, device=device)
        try:
            dist.broadcast(t, src=0)
        except RuntimeError as exc:
            raise self._lost(what, exc) from exc
        return [int(v) for v in t.tolist()]

    def _lost(self, what: str, exc: BaseException) -> PeerLostError:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        return PeerLostError(
            f"rank {self.rank}/{self.world_size}: {what} failed: another rank died, hung or became "
            f"unreachable (collective timeout {self.timeout_s:g} s; {first})")


def partition_indices(n: int, world_size: int, rank: int, seed: int) -> torch.Tensor:
    """Indices of ``range(n)`` held by ``rank``: ``perm[rank::world_size]`` of a permutation
    drawn from ``seed`` (so shards are a random, balanced split: sizes differ by at most one),
    sorted so the shard keeps the data's order (memory locality when building the paths)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of size {world_size}")
    gen = torch.Generator().manual_seed(seed + PARTITION_SEED_OFFSET)
    perm = torch.randperm(n, generator=gen)
    return perm[rank::world_size].sort().values


def current() -> DistContext | None:
    """The context of an initialised process group with more than one rank, else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                       backend=str(dist.get_backend()), timeout_s=_timeout_s)


_timeout_s = DEFAULT_TIMEOUT_S  # what init_from_env gave the process group


def launched_distributed() -> bool:
    """True when torchrun (or the user) set ``WORLD_SIZE`` > 1 for this process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init_from_env(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext | None:
    """Join the process group described by torchrun's environment; None when not launched so.

    ``device`` (the ``--device`` value) picks the backend: NCCL for CUDA, gloo otherwise.
    ``timeout_s`` bounds the rendezvous and every collective, so a dead peer is an error.
    """
    import torch.distributed as dist

    global _timeout_s
    if not launched_distributed():
        return None
    missing = [v for v in _ENV_VARS if v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE > 1 but {', '.join(missing)} not set: launch with torchrun "
                         "(or set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT for every process)")
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed")
    if timeout_s <= 0:
        raise ValueError(f"the distributed timeout must be > 0 seconds (got {timeout_s})")
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _timeout_s = float(timeout_s)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
        except RuntimeError as exc:
            raise PeerLostError(
                f"rank {os.environ['RANK']}/{os.environ['WORLD_SIZE']}: could not join the process group at "
                f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout_s:g} s ({exc})") from exc
    return current()


def shutdown() -> None:
    """Leave the process group (no-op when none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def reduce_closure_result(
    ctx: DistContext,
    params: dict[str, torch.Tensor],
    loss: torch.Tensor,
    grads: dict[str, torch.Tensor],
    weight: float,
    penalty: Any | None,
) -> torch.Tensor:
    """Global loss and gradients from one rank's shard, in ONE all-reduce; sets ``p.grad``.

    ``loss``/``grads``: the data term of this rank's shard (or batch) as a mean over it;
    ``weight``: its share of the global count (``n_shard / n``), turning the mean into
    ``sum / n``; ``penalty``: the :class:`~recsys_flowadam.models.Objective` whose L2 term this
    rank adds (rank 0), or None. Returns the global loss (identical on every rank).
    """
    names = list(params)
    with torch.no_grad():
        parts = []
        for k in names:
            g = grads[k] * weight
            if penalty is not None:
                pg = penalty.penalty_grad(k, params[k].detach())
                if not isinstance(pg, float):
                    g = g + pg
            parts.append(g.reshape(-1))
        total = loss.detach().reshape(1).to(parts[0].dtype) * weight
        if penalty is not None:
            total = total + penalty.penalty({k: p.detach() for k, p in params.items()}).reshape(1)
        parts.append(total)
        bucket = torch.cat(parts)
        ctx.all_reduce_sum(bucket, "the gradient all-reduce")
        offset = 0
        for k in names:
            p = params[k]
            p.grad = bucket[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        return bucket[offset]
