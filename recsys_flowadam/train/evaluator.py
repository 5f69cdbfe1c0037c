"""Validation and early stopping: when to evaluate, which parameters were best, when to stop.

Every ``eval_every`` steps (and at the last step) the validation ratings are scored with the
artifact's prediction rule. ``eval_every`` unset means :data:`DEFAULT_EVAL_EVERY`, or the cadence
the automatic mini-batch path chose (``PathChoice.eval_every``, a fraction of an epoch). That path
also scores a fixed, seeded sample of the validation ratings (``PathChoice.eval_sample``): at 10M
ratings the whole validation part costs as much as 25 mini-batch steps, while comparing the same
100k ratings from one evaluation to the next is what early stopping needs (the noise of a fixed
sample is common to every evaluation; the full validation part is scored once, after training).
An RMSE below the best so far by more than ``min_delta`` records the step and snapshots the
parameters; otherwise the evaluation counts as bad, and ``patience`` bad evaluations in a row stop
the run (``patience=0``: never). At the end the best snapshot replaces the parameters.

Distributed, rank 0 alone evaluates and decides; :class:`BroadcastStop` hands its decision
(and its best step) to every rank at each evaluation, so all ranks stop at the same step.
"""

from __future__ import annotations

from typing import Protocol

import torch

from recsys_flowadam.models import Coords
from recsys_flowadam.train.config import TrainConfig
from recsys_flowadam.train.distributed import DistContext
from recsys_flowadam.train.loop_state import LoopState
from recsys_flowadam.train.metrics import Predictor, evaluate_predictor

DEFAULT_EVAL_EVERY = 10  # steps between evaluations when neither the config nor the path sets it


class StopAgreement(Protocol):
    """Turns this process's stop decision into the one every process acts on."""

    def __call__(self, stop: bool, state: LoopState) -> bool: ...


class LocalStop:
    """One process: its own decision."""

    def __call__(self, stop: bool, state: LoopState) -> bool:
        return stop


class BroadcastStop:
    """Rank 0's decision and best step, broadcast to every rank (one small collective)."""

    def __init__(self, dctx: DistContext, device: torch.device) -> None:
        self.dctx, self.device = dctx, device

    def __call__(self, stop: bool, state: LoopState) -> bool:
        flag, state.best_step = self.dctx.broadcast_ints(
            [stop, state.best_step], f"the early-stopping broadcast (step {state.step})", self.device)
        return bool(flag) or stop


def stop_agreement(dctx: DistContext | None, device: torch.device) -> StopAgreement:
    """:class:`LocalStop` alone, :class:`BroadcastStop` in a process group."""
    return LocalStop() if dctx is None else BroadcastStop(dctx, device)


class Evaluator:
    """Validation every ``eval_every`` steps, early stopping, the best-parameter snapshot.

    ``val``: the validation coordinates (None: no validation, hence no early stopping and
    the last step counts as best); ``evaluates``: whether this process scores them (rank 0).
    ``params`` are the live parameters ``predictor`` reads. ``every``: steps between evaluations
    when ``config.eval_every`` is unset (default :data:`DEFAULT_EVAL_EVERY`); ``sample``: score a
    fixed random subset of that many validation ratings (seeded by ``config.seed``), not all.
    """

    def __init__(self, predictor: Predictor, params: dict[str, torch.Tensor], val: Coords | None,
                 config: TrainConfig, *, evaluates: bool = True, agree: StopAgreement | None = None,
                 every: int | None = None, sample: int | None = None) -> None:
        self.predictor, self.params = predictor, params
        self.val = val if val is None or sample is None else validation_sample(val, sample, config.seed)
        self.has_val = val is not None
        self.evaluates = self.has_val and evaluates
        self.every = config.eval_every or every or DEFAULT_EVAL_EVERY
        self.patience, self.min_delta = config.patience, config.min_delta
        self.clip = config.clip_predictions
        self.agree = agree if agree is not None else LocalStop()
        self.best: dict[str, torch.Tensor] | None = None

    def due(self, step: int, last: bool) -> bool:
        return step % self.every == 0 or last

    def validate(self, state: LoopState) -> dict[str, float] | None:
        """Score the validation ratings and update the early-stopping record; None when this
        process does not evaluate."""
        if not self.evaluates:
            return None
        val = self.val
        assert val is not None
        m = evaluate_predictor(self.predictor, val.users, val.items, val.values, val.contexts, clip=self.clip)
        if m["rmse"] < state.best_val - self.min_delta:
            state.best_val, state.best_step, state.bad_evals = m["rmse"], state.step, 0
            self._snapshot()
        else:
            state.bad_evals += 1
        return m

    def _snapshot(self) -> None:
        """The parameters into the best-parameter snapshot: into its buffers once they exist (a fresh
        copy every improvement cost the model's size in new memory each time, which the machine
        first has to fault in: 0.1-0.2 s over a 10M-rating run)."""
        if self.best is None or self.best.keys() != self.params.keys() or any(
                b.shape != p.shape or b.dtype != p.dtype or b.device != p.device
                for b, p in zip(self.best.values(), (self.params[k] for k in self.best))):
            self.best = {k: p.detach().clone() for k, p in self.params.items()}
            return
        with torch.no_grad():
            for k, p in self.params.items():
                self.best[k].copy_(p)

    def patience_spent(self, state: LoopState) -> bool:
        """Enough bad evaluations in a row to stop (also true when resuming at the stopping step)."""
        return bool(self.has_val and self.patience and state.bad_evals >= self.patience)

    def decide_stop(self, state: LoopState) -> bool:
        """After an evaluation: whether every process stops now."""
        return self.agree(self.patience_spent(state), state)

    def restore_snapshot(self, best: dict[str, torch.Tensor] | None) -> None:
        """Take a checkpoint's best parameters (on the CPU as stored) onto the parameters' device."""
        self.best = None if best is None else {  # copies: later snapshots are written into them
            k: best[k].to(device=p.device, dtype=p.dtype, copy=True) for k, p in self.params.items()}

    def finish(self, state: LoopState) -> None:
        """Put the best parameters back; without validation the last step is the best."""
        if self.best is not None:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(self.best[k])
        if not self.has_val:
            state.best_step = state.step

    def best_val_rmse(self, state: LoopState) -> float | None:
        return state.best_val if self.has_val else None


def validation_sample(val: Coords, size: int, seed: int) -> Coords:
    """``size`` of the validation ratings drawn without replacement (CPU generator ``seed + 2``,
    the draw kept in rating order); all of them when there are no more than ``size``."""
    if len(val) <= size:
        return val
    keep = torch.randperm(len(val), generator=torch.Generator().manual_seed(seed + 2))[:size].sort().values
    return val.select(keep.to(val.users.device))
