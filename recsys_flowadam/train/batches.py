"""Batch sources and gradient reductions: what each closure call computes its gradient on,
and how that gradient reaches ``.grad``.

Two choices, both made once before the loop starts:

- the data (:func:`place_training_data`): :class:`LocalData`, all training ratings in this
  process, whose gradient is written straight into ``.grad``; or :class:`ShardData`, this
  rank's shard of a seeded balanced partition (see ``distributed``), whose path computes the
  data term only and whose every closure call all-reduces [gradients, loss] (rank 0 adds the
  L2 penalty once);
- the batches (:func:`make_batch_source`): :class:`FullBatch`, every step sees all the data;
  or mini-batches, reshuffled every epoch by the shuffle generator (a CPU generator seeded
  ``seed + 1``). :class:`LocalMiniBatches` permutes the ratings; :class:`ShardMiniBatches`
  has every rank draw the same permutation of ``range(largest shard)`` and keep the positions
  inside its own shard, so ``batch_size`` is the global batch and each rank takes its share;
  :class:`SlottedMiniBatches` (lazy-adam, and MF / biased MF on the CPU in one process) cuts the
  batches once and reorders them every epoch.

:class:`GradientClosure` is the optimizer's closure: the loss and gradient of the current
batch, reduced by the data's rule. Nothing in the loop asks whether it runs distributed.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch

from recsys_flowadam import row_step
from recsys_flowadam.models import Coords, Objective
from recsys_flowadam.train.config import TrainConfig
from recsys_flowadam.train.distributed import DistContext, reduce_closure_result
from recsys_flowadam.train.loop_state import LoopState


@dataclass(frozen=True)
class Batch:
    """One closure's data: ``coords`` (None: the path's own, i.e. the full batch) and this
    process's ``share`` of the global count of ratings in the step (weights the all-reduce);
    ``index``: the batch's number in a laid-out source (:class:`SlottedMiniBatches`)."""

    coords: Coords | None
    share: float
    index: int | None = None


class BatchSource(Protocol):
    """Hands the loop each step's batch and keeps ``state.epoch``/``state.batch_pos``."""

    n_batches: int
    shuffle_state: torch.Tensor  # the shuffle generator at the start of the current epoch

    def next(self, state: LoopState) -> Batch: ...

    def restore(self, state: LoopState, shuffle_state: torch.Tensor) -> None: ...

    def epoch_label(self, state: LoopState) -> float: ...

    def epochs_done(self, state: LoopState) -> float: ...


class DataPlacement(ABC):
    """The ratings this process computes gradients on, and how a gradient is reduced.

    ``coords``/``path_objective``: what the gradient path is built from; ``n_global``: the
    training ratings of all processes; ``largest``: the largest process's count (sizes the
    representation, so every rank picks the same); ``extra``: what the result records.
    """

    coords: Coords
    path_objective: Objective
    n_global: int
    largest: int
    world_size: int
    is_main: bool
    extra: dict[str, Any]

    @property
    def full_share(self) -> float:
        """This process's share of a full batch."""
        return len(self.coords) / self.n_global

    @abstractmethod
    def reduce(self, params: dict[str, torch.Tensor], loss: torch.Tensor, grads: dict[str, torch.Tensor],
               share: float) -> torch.Tensor:
        """Set ``p.grad`` from this process's ``grads`` (a mean over its ``share`` of the batch);
        return the loss of the whole batch."""

    @abstractmethod
    def mini_batches(self, batch_size: int, gen: torch.Generator, device: torch.device) -> BatchSource:
        """Mini-batches of ``batch_size`` ratings (over all processes) shuffled by ``gen``."""


class LocalData(DataPlacement):
    """All training ratings in this process; the gradient goes straight into ``.grad``."""

    def __init__(self, coords: Coords, objective: Objective) -> None:
        self.coords, self.path_objective = coords, objective
        self.n_global = self.largest = len(coords)
        self.world_size, self.is_main, self.extra = 1, True, {}

    def reduce(self, params: dict[str, torch.Tensor], loss: torch.Tensor, grads: dict[str, torch.Tensor],
               share: float) -> torch.Tensor:
        """``grads`` into ``.grad``; the loss as it is (``share`` is 1 here). A parameter without a
        gradient had its step taken by the gradient kernel (``row_step``): its ``.grad`` is None."""
        offer = row_step.current()
        for k, p in params.items():
            p.grad = None if k not in grads and offer is not None and offer.taken(p) else grads[k]
        return loss

    def mini_batches(self, batch_size: int, gen: torch.Generator, device: torch.device) -> BatchSource:
        return LocalMiniBatches(self.coords, min(batch_size, len(self.coords)), gen, device)


class ShardData(DataPlacement):
    """This rank's shard of the training ratings; every closure call all-reduces."""

    def __init__(self, coords: Coords, objective: Objective, dctx: DistContext, seed: int,
                 device: torch.device) -> None:
        self.shard_sizes = dctx.shard_sizes(len(coords))
        if min(self.shard_sizes) == 0:
            raise ValueError(f"{len(coords)} training ratings cannot be split over {dctx.world_size} ranks")
        self.dctx = dctx
        self.n_global, self.largest = len(coords), max(self.shard_sizes)
        self.world_size, self.is_main, self.extra = dctx.world_size, dctx.is_main, {"world_size": dctx.world_size}
        self.coords = coords.select(dctx.partition(len(coords), seed).to(device))
        # the shard's path computes the data term only; rank 0 adds the penalty, once
        self.path_objective = replace(objective, reg=0.0, bias_reg=0.0, weights=None)
        self.penalty = objective if dctx.is_main else None

    def reduce(self, params: dict[str, torch.Tensor], loss: torch.Tensor, grads: dict[str, torch.Tensor],
               share: float) -> torch.Tensor:
        """Shard mean -> sum / n_global, + the penalty on rank 0, in one all-reduce."""
        return reduce_closure_result(self.dctx, params, loss, grads, share, self.penalty)

    def mini_batches(self, batch_size: int, gen: torch.Generator, device: torch.device) -> BatchSource:
        per_rank = max(1, min(math.ceil(batch_size / self.world_size), self.largest))
        return ShardMiniBatches(self.coords, self.shard_sizes, per_rank, gen, device)


def place_training_data(coords: Coords, objective: Objective, dctx: DistContext | None, seed: int,
                        device: torch.device) -> DataPlacement:
    """All of ``coords`` here, or this rank's shard of them when ``dctx`` is a process group."""
    if dctx is None:
        return LocalData(coords, objective)
    return ShardData(coords, objective, dctx, seed, device)


class GradientClosure:
    """The optimizer's closure: loss and gradients of ``batch`` on ``path``, reduced by ``data``.

    ``path``: the dense or sparse path (full batch: ``loss_and_grad(params)``) or the
    mini-batch path (``loss_and_grad(params, coords)``); the loop sets ``batch`` each step.
    """

    def __init__(self, path: Any, params: dict[str, torch.Tensor], data: DataPlacement) -> None:
        self.path, self.params, self.data = path, params, data
        self.batch = Batch(None, data.full_share)

    def __call__(self) -> torch.Tensor:
        coords = self.batch.coords
        if coords is None:
            loss, grads = self.path.loss_and_grad(self.params)
        elif len(coords):
            loss, grads = self.path.loss_and_grad(self.params, coords)
        else:  # this rank's shard ran out in the epoch's last batch
            loss = self.params["user_factors"].new_zeros(())
            grads = {k: torch.zeros_like(p) for k, p in self.params.items()}
        return self.data.reduce(self.params, loss, grads, self.batch.share)


class FullBatch:
    """Every step on all of the data; a step is an epoch."""

    n_batches = 1

    def __init__(self, share: float, shuffle_state: torch.Tensor) -> None:
        self._batch = Batch(None, share)
        self.shuffle_state = shuffle_state  # unused, but checkpointed like the mini-batch one

    def next(self, state: LoopState) -> Batch:
        state.epoch += 1
        return self._batch

    def restore(self, state: LoopState, shuffle_state: torch.Tensor) -> None:
        self.shuffle_state = shuffle_state

    def epoch_label(self, state: LoopState) -> float:
        return state.epoch

    def epochs_done(self, state: LoopState) -> float:
        return float(state.step)


def _permutation(n: int, gen: torch.Generator) -> torch.Tensor:
    """``randperm(n)`` on the CPU generator, as int32 when ``n`` allows: the same permutation
    and generator state as int64 (torch draws the same numbers), about 1.5-2x faster at 10M
    ratings (half the memory the shuffle walks through)."""
    return torch.randperm(n, generator=gen, dtype=torch.int32 if n < 2**31 else torch.int64)


class _MiniBatches(ABC):
    """Consecutive slices of a fresh permutation each epoch: everything a batch needs is
    prepared once per epoch (:meth:`_new_epoch`), so taking a batch is slicing only (no host
    work that grows with the batch, no host synchronisation)."""

    def __init__(self, coords: Coords, n: int, batch_size: int, gen: torch.Generator, device: torch.device) -> None:
        self.coords, self.batch_size, self.gen, self.device = coords, batch_size, gen, device
        self.n_batches = math.ceil(n / batch_size)
        self.shuffle_state = gen.get_state()

    @abstractmethod
    def _new_epoch(self) -> None:
        """Draw this epoch's order (one ``randperm`` call on the shuffle generator) and prepare it."""

    @abstractmethod
    def _take(self, index: int) -> Batch:
        """Batch number ``index`` of this epoch."""

    def next(self, state: LoopState) -> Batch:
        """The batch at ``state.batch_pos`` (a new order when an epoch starts); advances the position."""
        if state.batch_pos == 0:
            self.shuffle_state = self.gen.get_state()
            self._new_epoch()
        batch = self._take(state.batch_pos)
        state.batch_pos += 1
        if state.batch_pos == self.n_batches:
            state.batch_pos = 0
            state.epoch += 1
        return batch

    def restore(self, state: LoopState, shuffle_state: torch.Tensor) -> None:
        """Rewind the generator to the saved epoch's start; mid-epoch, redraw that epoch's order."""
        self.shuffle_state = shuffle_state
        self.gen.set_state(shuffle_state)
        if state.batch_pos > 0:
            self._new_epoch()

    def epoch_label(self, state: LoopState) -> float:
        return round(state.epoch + state.batch_pos / self.n_batches, 4)

    def epochs_done(self, state: LoopState) -> float:
        return state.epoch + state.batch_pos / self.n_batches


class LocalMiniBatches(_MiniBatches):
    """Mini-batches of all the ratings: a permutation of them, moved to the device once an epoch."""

    def __init__(self, coords: Coords, batch_size: int, gen: torch.Generator, device: torch.device) -> None:
        super().__init__(coords, len(coords), batch_size, gen, device)
        self._perm: torch.Tensor | None = None

    def _new_epoch(self) -> None:
        self._perm = _permutation(len(self.coords), self.gen).to(self.device)

    def _take(self, index: int) -> Batch:
        assert self._perm is not None
        lo = index * self.batch_size
        return Batch(self.coords.select(self._perm[lo:lo + self.batch_size]), 1.0)


class ShardMiniBatches(_MiniBatches):
    """This rank's share of global batches: positions of a permutation of ``range(largest
    shard)``, drawn alike on every rank (same generator state), that fall inside this shard.

    Once an epoch, on the host: this shard's positions in permutation order (moved to the
    device in one copy), where each batch's run of them starts, and each batch's global count
    (for its share); a batch is then a slice."""

    def __init__(self, coords: Coords, shard_sizes: list[int], batch_size: int, gen: torch.Generator,
                 device: torch.device) -> None:
        super().__init__(coords, max(shard_sizes), batch_size, gen, device)
        self.longest = max(shard_sizes)
        self._sizes = torch.tensor(shard_sizes)
        self._mine: torch.Tensor | None = None
        self._starts: list[int] = []
        self._shares: list[float] = []

    def _new_epoch(self) -> None:
        perm = _permutation(self.longest, self.gen).long()
        ends = torch.arange(1, self.n_batches + 1) * self.batch_size
        ends[-1] = self.longest
        keep = perm < len(self.coords)
        self._mine = perm[keep].to(self.device)
        # ratings of every rank (resp. this one) up to the end of each batch, by cumulative counts
        everyone = torch.cumsum((perm[:, None] < self._sizes[None, :]).sum(dim=1), dim=0)[ends - 1]
        mine = torch.cumsum(keep.long(), dim=0)[ends - 1]
        self._starts = [0] + mine.tolist()
        counts_all = torch.diff(everyone, prepend=everyone.new_zeros(1)).tolist()
        counts_mine = torch.diff(mine, prepend=mine.new_zeros(1)).tolist()
        self._shares = [m / a for m, a in zip(counts_mine, counts_all)]

    def _take(self, index: int) -> Batch:
        assert self._mine is not None
        positions = self._mine[self._starts[index]:self._starts[index + 1]]
        return Batch(self.coords.select(positions), self._shares[index])


def random_batch_labels(n: int, batch_size: int, gen: torch.Generator) -> np.ndarray:
    """Each of ``n`` ratings' batch: ``batch_size`` ratings per batch (the last one the rest), a
    uniformly random partition (up to the shuffle's index bias, below n / 2^32 per draw). Batch
    labels shuffled in place (``models.row_sparse_kernels.shuffle_labels``, seeded by a number
    drawn from ``gen``); a byte or two per rating, so the shuffle stays in cache: 0.04 s at 9M
    ratings against 0.25-0.45 s for ``randperm`` of all of them."""
    from recsys_flowadam.models.row_sparse import _kernels

    k = _kernels()
    assert k is not None
    n_batches = max(1, -(-n // batch_size))
    label_type = np.uint8 if n_batches <= 1 << 8 else np.uint16 if n_batches <= 1 << 16 else np.int64
    labels = np.repeat(np.arange(n_batches, dtype=label_type), batch_size)[:n]
    k.shuffle_labels(labels, int(torch.randint(0, 2**62, (1,), generator=gen)))
    return labels


class SlottedMiniBatches(_MiniBatches):
    """Batches cut once and laid out (``models.row_sparse.SlottedRatings``): the ratings are cut
    into batches by shuffled batch labels (:func:`random_batch_labels`, seeded from the shuffle
    generator) when the source is made, and laid out batch by batch, user by user inside a batch;
    every epoch visits the batches in a new order (one ``randperm`` of the batch count). A batch is
    its number (``Batch.index``: lazy Adam's step reads the layout itself) and, with ``as_coords``,
    also its slice of the layout as ``Coords`` (views, no copy: the CPU mini-batch paths of MF and
    biased MF).

    Why on the CPU: a fresh permutation per epoch (0.35 s at 9M ratings) and gathering each batch
    through it (5 ms a step at 111k) cost about a fifth of a 10M run; the batches' user order also
    turns the fused kernel's walk over them into a sequential read. Keeping the batches' members
    from pass to pass and only reordering them measured the same RMSE (lazy Adam, 10M ratings:
    0.7745 either way after 6 passes)."""

    def __init__(self, coords: Coords, batch_size: int, gen: torch.Generator, shape: tuple[int, int],
                 dtype: torch.dtype, as_coords: bool = False) -> None:
        from recsys_flowadam.models.row_sparse import SlottedRatings

        batch_size = min(batch_size, len(coords))
        labels = random_batch_labels(len(coords), batch_size, gen)
        self.slotted = SlottedRatings(coords, batch_size, None, shape, dtype, labels=labels)
        super().__init__(coords, len(coords), batch_size, gen, torch.device("cpu"))
        self._order = np.empty(0, dtype=np.int64)
        self._laid_out = (Coords(torch.from_numpy(self.slotted.users), torch.from_numpy(self.slotted.items),
                                 torch.from_numpy(self.slotted.values)) if as_coords else None)
        self._starts = self.slotted.starts.tolist()

    def _new_epoch(self) -> None:
        self._order = torch.randperm(self.n_batches, generator=self.gen).numpy()  # a CPU tensor: no device read

    def _take(self, index: int) -> Batch:
        b = int(self._order[index])
        if self._laid_out is None:
            return Batch(None, 1.0, b)
        lo, hi = self._starts[b], self._starts[b + 1]
        c = self._laid_out
        return Batch(Coords(c.users[lo:hi], c.items[lo:hi], c.values[lo:hi]), 1.0, b)


def make_batch_source(data: DataPlacement, minibatch: bool, batch_size: int | None, seed: int,
                      device: torch.device, layout: tuple[tuple[int, int], torch.dtype] | None = None,
                      as_coords: bool = False) -> BatchSource:
    """Full batch, or mini-batches of ``batch_size`` (global) ratings shuffled by generator ``seed + 1``;
    ``layout`` (the model's (users, items) and the parameters' dtype): batches laid out once
    (:class:`SlottedMiniBatches`, all the data in this process, on the CPU), handed out as
    ``Coords`` too with ``as_coords``."""
    gen = torch.Generator().manual_seed(seed + 1)
    if layout is not None:
        return SlottedMiniBatches(data.coords, batch_size or data.n_global, gen, *layout, as_coords=as_coords)
    if not minibatch:
        return FullBatch(data.full_share, gen.get_state())
    return data.mini_batches(batch_size or data.n_global, gen, device)


def step_limit(config: TrainConfig, n_batches: int, default_steps: int | None = None) -> int:
    """Steps allowed by ``steps`` and ``epochs`` (whichever ends first); neither: ``default_steps``
    when given (the automatic mini-batch path's horizon), else the default step count."""
    if config.steps is None and config.epochs is None:
        return TrainConfig.DEFAULT_STEPS if default_steps is None else default_steps
    return int(min(config.steps if config.steps is not None else math.inf,
                   config.epochs * n_batches if config.epochs is not None else math.inf))
