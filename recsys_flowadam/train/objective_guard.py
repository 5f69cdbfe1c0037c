"""The lowest-objective parameters of a full-batch run without validation (a refit).

A refit runs blind for the first run's best step count. An optimizer that can take a
loss-raising step (FlowAdam's ODE branch on a plateau) may end it on one: one SVD++ fold went
from test RMSE 0.90 to 1.28 that way. The guard keeps, among the parameters at every
evaluation step and at the end, those of lowest training objective, and the run ends on them.
That uses the training data only, and costs a parameter copy per evaluation step plus one
objective evaluation at the end.

The objective of the parameters after step ``k`` is the loss the next step's first closure
call returns (the optimizers in this package and torch's all return that), so a snapshot taken
at an evaluation step is scored for free one step later. Mini-batch runs have no guard: a
batch's loss is too noisy to rank parameters by. The final evaluation counts in the run's
``grad_evals`` (not in an optimizer's own diagnostics); the snapshots are not checkpointed, so
the guard is refused with checkpoints and resume (a refit has neither).
"""

from __future__ import annotations

from typing import Callable

import torch


class ObjectiveGuard:
    """Keeps the lowest-objective snapshot of ``params`` among those offered."""

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        self.params = params
        self.best: dict[str, torch.Tensor] | None = None
        self.best_loss = float("inf")
        self.best_step: int | None = None
        self._pending: tuple[int, dict[str, torch.Tensor]] | None = None

    def _clone(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.params.items()}

    def offer(self, step: int) -> None:
        """The parameters after ``step``: kept until :meth:`score` learns their objective."""
        self._pending = (step, self._clone())

    def score(self, first_step: int, losses: list[float]) -> None:
        """Step losses ``first_step, first_step + 1, ...`` (each at the parameters before that step):
        the one at ``pending step + 1`` scores the pending snapshot."""
        if self._pending is None:
            return
        step, snapshot = self._pending
        k = step + 1 - first_step
        if 0 <= k < len(losses):
            if losses[k] < self.best_loss:
                self.best, self.best_loss, self.best_step = snapshot, losses[k], step
            self._pending = None

    def finish(self, step: int, objective: Callable[[], torch.Tensor]) -> dict[str, float | int] | None:
        """Score the final parameters (one objective evaluation) and put the lowest back; returns what
        was restored (``None`` when the final parameters are the lowest)."""
        if self.best is None:
            return None
        final = float(objective())
        if final <= self.best_loss:  # (a NaN final restores too)
            return None
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.best[k])
        return {"restored_step": int(self.best_step or 0), "objective": self.best_loss, "final_objective": final,
                "final_step": step}
