"""An Adam step that a gradient kernel may take itself, row by row, as each row's gradient is done.

Why: on the CPU mini-batch path the optimizer's pass reads every parameter, gradient and moment
once more after the gradient kernel wrote them. The kernel walks the users one by one and holds
each user's row and gradient in cache when it is done with them: updating the row there saves
writing the gradient, reading it back and reading the row again (the user factors are 86% of
the 10M problem's parameters; 21 -> 16 ms a step on one thread at batches of 178k). Where it
splits a batch in two halves, it also takes the item rows' step as it sums the halves' item
gradients, instead of writing the sum for the optimizer's pass.

The optimizer offers (``offering``) the step it is about to take, per parameter: its moments and
the step's scalars. A kernel that can take it for a parameter does so, records the step's
statistics in the offer (``taken``) and leaves that parameter without a gradient; the optimizer
then only advances that parameter's step count. Whatever is not taken gets its gradient and the
optimizer's ordinary step. Offers are made only where the trainer allows them (one process: a
process group must reduce the gradients before any update).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

__all__ = ["AdamRowStep", "RowStepOffer", "current", "offering"]


@dataclass
class AdamRowStep:
    """Adam's step for one parameter: ``exp_avg``/``exp_avg_sq`` (updated in place by whoever takes
    it) and ``scalars`` = (beta1, beta2, lr / bias_correction1, sqrt(bias_correction2), eps, decay),
    decay being AdamW's ``1 - lr * weight_decay`` (1: none). ``sums``: the taker also returns
    (g.g, m.m, g.m), m before the step, in ``taken``."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    scalars: tuple[float, float, float, float, float, float]
    sums: bool = False
    taken: np.ndarray | None = None  # set when taken: the sums (zeros unless asked)


@dataclass
class RowStepOffer:
    """This step's offers, by parameter (identity)."""

    steps: dict[int, AdamRowStep] = field(default_factory=dict)

    def add(self, param: torch.Tensor, step: AdamRowStep) -> None:
        self.steps[id(param)] = step

    def get(self, param: torch.Tensor) -> AdamRowStep | None:
        return self.steps.get(id(param))

    def taken(self, param: torch.Tensor) -> bool:
        step = self.get(param)
        return step is not None and step.taken is not None


# per thread and context: trainings in two threads never see each other's offers
_CURRENT: ContextVar[RowStepOffer | None] = ContextVar("recsys_flowadam_row_step_offer", default=None)


def current() -> RowStepOffer | None:
    """The offer of the step in progress (None: none)."""
    return _CURRENT.get()


@contextmanager
def offering(offer: RowStepOffer | None) -> Iterator[None]:
    """Make ``offer`` the current one while the block (the optimizer's closure call) runs."""
    token = _CURRENT.set(offer)
    try:
        yield
    finally:
        _CURRENT.reset(token)
