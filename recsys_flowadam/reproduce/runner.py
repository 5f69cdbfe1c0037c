"""One training run of one optimizer on one task: a fixed budget, a learning curve, the final scores.

Unlike the product trainer (``recsys_flowadam.train``) this loop never restores a "best"
checkpoint and never early-stops: the paper's experiments report the parameters after a
fixed number of full-batch steps, and the test curve it records must not feed back into
training. The loss and gradients come from the models package's dense path, the optimizers
from the registry, gradient evaluations are counted by ``count_closure``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from recsys_flowadam.models import Objective, init_params, make_path
from recsys_flowadam.optim import count_closure, make_optimizer
from recsys_flowadam.reproduce.tasks import Task


@dataclass(frozen=True)
class RunSpec:
    """What to run: optimizer, learning rate, explicit L2 weight in the objective, optimizer options, budget.

    The run stops after ``steps`` optimizer steps or once ``max_grad_evals`` gradient
    evaluations are spent, whichever comes first (None: no such limit).
    """

    optimizer: str
    lr: float
    reg: float
    kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int | None = 1000
    max_grad_evals: int | None = None


@dataclass
class RunResult:
    """Final scores, cost and the learning curve (test error against evaluations and time)."""

    scores: dict[str, float]
    steps: int
    grad_evals: int
    seconds: float
    diverged: bool
    curve: list[dict[str, float]]
    diagnostics: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, "steps": self.steps, "grad_evals": self.grad_evals,
                "seconds": round(self.seconds, 4), "diverged": self.diverged, "diagnostics": self.diagnostics}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _finite(params: dict[str, torch.Tensor]) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in params.values()]).all())


def _nan_scores(task: Task) -> dict[str, float]:
    out = {"test": math.nan}
    if task.score_val is not None:
        out["val"] = math.inf  # a diverged run never wins the tuning
    return out


def run_one(task: Task, run: RunSpec, seed: int, *, eval_every: int = 25) -> RunResult:
    """Train ``task`` from the seeded initialisation with ``run``; see the module docstring.

    Wall time counts optimizer steps only (the curve's evaluations are excluded). A run whose
    parameters become non-finite stops there and is marked ``diverged`` (test error NaN).
    """
    if run.steps is None and run.max_grad_evals is None:
        raise ValueError("a run needs steps or max_grad_evals")
    device = task.train.values.device
    objective = Objective(reg=run.reg, bias_reg=run.reg, loss=task.loss, huber_delta=task.huber_delta,
                          offset=task.offset)
    path = make_path("dense", task.spec, task.train, objective)
    gen = torch.Generator().manual_seed(int(seed))
    params = init_params(task.spec, init_std=task.init_std, generator=gen, device=device,
                         dtype=task.train.values.dtype)
    opt = make_optimizer(run.optimizer, params.values(), run.lr, **run.kwargs)

    def evaluate() -> torch.Tensor:
        loss, grads = path.loss_and_grad(params)
        for k, p in params.items():
            p.grad = grads[k]
        return loss

    closure = count_closure(evaluate)
    steps_limit = run.steps if run.steps is not None else math.inf
    evals_limit = run.max_grad_evals if run.max_grad_evals is not None else math.inf
    last = task.score_test(params)  # the scores of the current parameters: the run's result once it ends
    curve = [{"step": 0, "grad_evals": 0, "seconds": 0.0, **last}]
    seconds, step, diverged = 0.0, 0, False
    while step < steps_limit and closure.calls < evals_limit:
        before = closure.calls
        _sync(device)
        t0 = time.perf_counter()
        opt.step(closure)
        _sync(device)
        seconds += time.perf_counter() - t0
        step += 1
        done = step >= steps_limit or closure.calls >= evals_limit
        if closure.calls == before:  # L-BFGS declares convergence without evaluating: nothing more to do
            done = True
        if step % eval_every == 0 or done:
            if not _finite(params):
                diverged = True
                curve.append({"step": step, "grad_evals": closure.calls, "seconds": seconds, "test": math.nan})
                break
            last = task.score_test(params)
            curve.append({"step": step, "grad_evals": closure.calls, "seconds": seconds, **last})
        if done:
            break
    if diverged:
        scores = _nan_scores(task)
    else:
        scores = dict(last)
        if task.score_val is not None:
            scores.update(task.score_val(params))
    diag = getattr(opt, "diagnostics", None)
    diagnostics = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in diag().items()} if diag else {}
    return RunResult(scores, step, closure.calls, seconds, diverged, curve, diagnostics)
