"""What ``train`` runs with no flags: full batch (dense or CSR) or mini-batches, their size and
their learning-rate schedule.

Rule (:func:`choose_path`):

1. ``MINIBATCH_MIN_RATINGS`` training ratings or more, and a first-order optimizer: mini-batches
   of :func:`auto_batch_size` ratings (about 1% of them), the learning rate halving every
   ``LR_HALF_LIFE_STEPS`` steps, for ``AUTO_MAX_STEPS`` steps unless steps or epochs are given.
   A full-batch step is one pass over every rating and Adam needs about a hundred of them; a
   thousand mini-batch steps cost about ten passes.
2. Otherwise the full-batch representation of ``representation.choose_representation`` (dense
   grid or CSR, by density and the memory budget), so small data (ML-100K, Jester) keeps the
   shipped recipes' path and figures;
3. and mini-batches anyway when neither full-batch representation fits the memory budget.

L-BFGS stays full batch (its line search needs the same function at every evaluation).

Measured on the 2-core dev machine (one torch thread, load average about 5 from other jobs, so
CPU seconds), on ``bench/bench_scale.py``'s generated problems (80% train / 10% validation),
biased-mf rank 20, Adam lr 0.02, reg 0.05 frequency-weighted, early stopping (patience 10):

==========  =======================================  ================================================
train       full batch (CSR)                          automatic mini-batches (decaying rate)
==========  =======================================  ================================================
800k        val 0.8234 at step 110, 8 s (whole run)   20k x 480 steps: 0.8502 (too few steps to settle)
1.6M        val 0.8013 at step 110, 10 s (19 s run)   20k x 960 steps: 0.8036, 12 s
4M          val 0.7897 at step 100, 24 s (48 s run)   40k x 800 steps: 0.7892, 17 s
8M          val 0.7834 at step 100, 60 s (136 s run)  80k x 960 steps: 0.7817, 39 s
==========  =======================================  ================================================

At 8M a constant rate stalls at 0.7933 (the mini-batch noise floor); halving every epoch ends
at 0.8263 (too early), every two epochs over 8 epochs at 0.7855, every three (240 steps) over
12 at 0.7817. Hence mini-batches from 3M training ratings (between the tie at 1.6M and the clear
win at 4M).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from recsys_flowadam.models.factorization import ModelSpec
from recsys_flowadam.models.representation import choose_representation, default_budget, estimate_bytes

MINIBATCH_MIN_RATINGS = 3_000_000  # at and above: mini-batches (see the table above)
BATCHES_PER_EPOCH = 100  # the automatic batch: about 1% of the ratings ...
MIN_AUTO_BATCH, MAX_AUTO_BATCH = 20_000, 250_000  # ... within these bounds
FULL_BATCH_ONLY = ("lbfgs",)
LR_HALF_LIFE_STEPS = 240  # mini-batch noise: a constant rate stalls above the optimum (see above)
AUTO_MAX_STEPS = 4 * LR_HALF_LIFE_STEPS  # the rate is then 1/16 of its start


@dataclass(frozen=True)
class PathChoice:
    """How a run computes its gradients: ``representation`` (dense / sparse / minibatch), the
    mini-batch size (None: full batch) and why (one line, printed by ``train``)."""

    representation: str
    batch_size: int | None
    reason: str
    lr_half_life_steps: int | None = None  # mini-batches: the learning rate halves every this many steps
    max_steps: int | None = None  # the run's length when neither steps nor epochs are given (None: the default)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def auto_batch_size(n_ratings: int) -> int:
    """About ``n / BATCHES_PER_EPOCH`` ratings, within ``[MIN_AUTO_BATCH, MAX_AUTO_BATCH]`` (and ``n``)."""
    return min(n_ratings, max(MIN_AUTO_BATCH, min(MAX_AUTO_BATCH, round(n_ratings / BATCHES_PER_EPOCH))))


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def choose_path(
    spec: ModelSpec,
    n_ratings: int,
    device: torch.device,
    *,
    optimizer: str = "adam",
    budget_bytes: int | None = None,
    element_size: int = 4,
    duplicates: bool | Callable[[], bool] = False,
) -> PathChoice:
    """The path ``auto`` resolves to for ``n_ratings`` training ratings (rule in the module docstring)."""
    minibatch_ok = optimizer.lower() not in FULL_BATCH_ONLY
    if minibatch_ok and n_ratings >= MINIBATCH_MIN_RATINGS:
        size = auto_batch_size(n_ratings)
        return PathChoice("minibatch", size, f"{n_ratings:,} training ratings (>= {MINIBATCH_MIN_RATINGS:,}): "
                                             f"mini-batches of {size:,} reach a good RMSE in far less time than "
                                             f"full-batch steps; the rate halves every {LR_HALF_LIFE_STEPS} steps",
                          LR_HALF_LIFE_STEPS, AUTO_MAX_STEPS)
    budget = default_budget(device) if budget_bytes is None else budget_bytes
    rep = choose_representation(spec, n_ratings, device, budget_bytes=budget, element_size=element_size,
                                duplicates=duplicates)
    cells = spec.n_users * spec.n_items * max(spec.n_contexts, 1)
    sizes = f"{n_ratings:,} training ratings, {n_ratings / cells:.1%} of the grid"
    if rep == "dense":
        return PathChoice("dense", None, f"{sizes}: full batch on the dense grid "
                                         f"({_gib(estimate_bytes('dense', spec, n_ratings, element_size))})")
    if rep == "sparse":
        return PathChoice("sparse", None, f"{sizes}: full batch on CSR (the dense grid is too sparse to pay, "
                                          "holds a cell twice, or does not fit the memory budget)")
    if not minibatch_ok:
        raise ValueError(f"the training data fits neither the dense nor the sparse full-batch representation "
                         f"within the memory budget ({_gib(budget)}), and {optimizer} needs full batches: "
                         "give a larger --memory-budget or another optimizer")
    size = auto_batch_size(n_ratings)
    return PathChoice("minibatch", size, f"{sizes}: no full-batch representation fits the memory budget "
                                         f"({_gib(budget)}): mini-batches of {size:,}, the rate halving every "
                                         f"{LR_HALF_LIFE_STEPS} steps", LR_HALF_LIFE_STEPS, AUTO_MAX_STEPS)
