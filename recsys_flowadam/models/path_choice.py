"""What ``train`` runs with no flags: full batch (dense or CSR) or mini-batches, their size and
their learning-rate schedule.

Rule (:func:`choose_path`):

1. ``MINIBATCH_MIN_RATINGS`` training ratings or more, and a first-order optimizer: the automatic
   mini-batch path (:func:`auto_minibatch`), everything in passes over the data: batches of
   1/``BATCHES_PER_EPOCH`` of the ratings (within ``[MIN_AUTO_BATCH, MAX_AUTO_BATCH]``), the
   learning rate starting at ``AUTO_LR_SCALE`` x the configured one and halving every
   ``LR_HALF_LIFE_EPOCHS`` passes, ``AUTO_EPOCHS`` passes unless steps or epochs are given, and
   validation ``EVALS_PER_EPOCH`` times a pass on a fixed sample of ``EVAL_SAMPLE`` validation
   ratings (scoring all of them costs as much as 25 steps at 10M). A full-batch step is one pass
   over every rating and Adam needs about a hundred of them; the automatic path takes four.
   Unless given, the factors start at ``AUTO_INIT_STD`` (0.0025, not the paper's 0.1) and the Adam
   family's eps is :func:`auto_eps` (14 rating gradients on a factor of 0.01, not 1e-8): the directions the data
   supports then grow first, as under SGD, and a rank-50 model does not fit the noise.
2. Otherwise the full-batch representation of ``representation.choose_representation`` (dense
   grid or CSR, by density and the memory budget), so small data (ML-100K, Jester) keeps the
   shipped recipes' path and figures;
3. and mini-batches anyway when neither full-batch representation fits the memory budget.

L-BFGS stays full batch (its line search needs the same function at every evaluation).

On rule 1's path the training jobs hold out only ``EVAL_SAMPLE`` of a larger validation part and
train on the rest in the one run, instead of an early-stopped run and a refit
(``train.pipeline.fold_validation``).

The schedule, measured on ``bench/bench_scale.py``'s generated 10M problem (7.9M training ratings
after the validation 1/8; 62k x 10k; biased-mf rank 20, Adam, reg 0.05 frequency-weighted; one
torch thread, load average 6-9 from other jobs; validation RMSE on the fixed 100k sample):

=======================================  ==========  ==========  ==========  ==============
schedule (batch, start rate, half-life)  step 100    step 200    step 300    test at end
=======================================  ==========  ==========  ==========  ==============
100k, 0.01, 100 steps                    0.8920      0.8803 *    0.8635      0.8493 (500)
100k, 0.02, 100 steps                    0.8746      0.8273 *    0.7981      0.7916 (500)
100k, 0.04, 80 steps                     0.8552      0.7992      0.7898      0.7908 (300)
100k, 0.04, 120 steps                    0.8476      0.7985      0.7892      0.7900 (300)
100k, 0.04 held 120 steps, then 50       0.8458      0.8033      0.7882      0.7891 (300)
100k, 0.06 held 100 steps, then 50       0.8688      0.8044      0.7888      0.7896 (300)
79k, 0.04, 80 steps                      0.8702      0.8134      0.7963      0.7963 (320)
79k, 0.06, 60 steps                      0.8728      0.8222      0.8065      0.8063 (320)
79k, 0.08, 50 steps                      0.8785      0.8360      0.8223      0.8219 (320)
200k, 0.02, 60 steps                     0.8516 **   0.8115 **   --          0.8080 (250)
=======================================  ==========  ==========  ==========  ==============

(* at step 180; ** at steps 110 and 210.) The factors start small (``init_std`` 0.1) and leave the
biases-only plateau (about 0.88) only when the rate stays high long enough; a faster decay, or a
higher rate with a faster decay, stalls; smaller batches progress less per step. Hence batches of
1/80 (98k here), 2 x the default rate of 0.02 halving every 1.5 passes (120 steps), three passes:
with the defaults at the time (lr 0.02) and reg 0.05 that run ends at validation 0.7932 (test
0.7919 after the refit; Cornac MF 0.800), the validation RMSE at 0.8015 after 180 steps.

Later, at the default rank 50 and reg 0.03 with the paper's start (``init_std`` 0.1, eps 1e-8),
three passes ended at test 0.7872 against Cornac MF's 0.7729 (rank 20, SGD); more passes did not
help (Adam at rank 50 peaked at 0.783, with a faster-decaying rate or batches of 20k), while
Cornac's SGD at rank 50 reached 0.7749. The difference is the start: from factors of 0.01 with eps
at 14 rating gradients (``auto_eps``: 2.5e-6 at batches of 111k) the same schedule gives test
0.7769 after three passes and 0.7741 after four (dense Adam and FlowAdam E on the same
trajectory, test RMSE traced at every evaluation), so the path took four (five, then four from a
smaller start, since: below).

Then the batch: a step costs a fixed part (the optimizer's pass over every parameter, 2-3 ms of a
10 ms step at 10M, and the loop's own work) plus a part that grows with the batch. On a proxy
(Adam, all 9M training ratings of the 10M problem, 100k of its test ratings scored; then the
5M problem of seed 1, 4.5M ratings), test RMSE after four passes, by batches a pass:

=====================  ==========  ==========  =========================================
batches a pass         10M         5M, seed 1  steps at 10M
=====================  ==========  ==========  =========================================
80 (the earlier rule)  0.7728      0.7816      320
60                     0.7724      0.7816      240
50                     0.7728      0.7817      192
40                     0.7733      --          160 (five passes: 0.7722 in 200 steps)
=====================  ==========  ==========  =========================================

With 40, raising the rate (3 x lr: 0.7760), decaying faster (half-life 1.25 passes: 0.7753) or
slower (2 passes: 0.7733), or a larger eps (20 units: 0.7752) did not help.

The product itself (``bench/peers/ours.py``, Adam, each batch count a different random cut of the
batches) was less even than the proxy, test RMSE (fit seconds, one busy machine):

=========================  ==================  ==================
batches a pass x passes    10M                 5M, seed 1
=========================  ==================  ==================
80 x 4 (the earlier rule)  0.7741 (6.73)       0.7824 (3.94)
64 x 4                     --                  0.7823 (3.43)
60 x 4                     --                  0.7831 (4.00)
50 x 4                     0.7741 (4.99)       0.7831 (2.54)
50 x 5                     **0.7732** (6.19)   **0.7821** (3.44)
=========================  ==================  ==================

The cut of the batches alone moves four passes by up to 0.0008 at 5M, about the margin to Cornac's
RMSE + 0.002 there (0.7827); a fifth pass takes it to 0.7821 and 10M to 0.7732, in less time than
four passes of 1/80. Hence 1/50, five passes.

Then a smaller start. Factors of 0.0025 (eps kept at its value for 0.01: ``EPS_FACTOR``) leave the
start a little later but fit better, enough to drop the fifth pass. On the proxy (Adam, 99% of each
problem's training file as the product trains on, its test file scored at the end; ``seed``: the
training seed), test RMSE at the end:

==========================  ==========  =================  =================  =============
problem (training seed)     5 x 0.01    4 x 0.0025         4 x 0.001          5 x smaller
==========================  ==========  =================  =================  =============
10M (0)                     0.7722      0.7723             0.7724             --
10M (1)                     0.7720      0.7720             0.7721             --
7M, seed 3 (0)              0.7770      0.7766             --                 0.7759 (0.005)
7M, seed 3 (1)              0.7771      0.7767             0.7768             --
5M, seed 1 (0)              0.7818      0.7810             0.7812             0.7802 (0.005)
5M, seed 1 (1)              0.7840      0.7832             0.7834             --
5M, seed 1 (2)              0.7824      0.7816             0.7818             --
4M, seed 7 (0)              0.7829      0.7820             --                 0.7803 (0.0025)
12M, seed 9 (0)             0.7692      0.7693             --                 0.7682 (0.0025)
25M (0)                     0.7647      0.7650             --                 --
==========================  ==========  =================  =================  =============

Four passes from 0.01 ended at 0.7733 (10M), 0.7828 (5M) and 0.7778 (7M); from 0.005, at 0.7725,
0.7814 and 0.7769. Eps scaled down with the start (a quarter, for 0.0025) ended at 0.7902 (5M):
eps is tied to ``EPS_FACTOR``, not to the start. Hence factors of 0.0025, four passes: a fifth
fewer steps than five passes from 0.01, at the same RMSE or better.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from recsys_flowadam.models.factorization import ModelSpec
from recsys_flowadam.models.representation import choose_representation, default_budget, estimate_bytes, grid_cells

MINIBATCH_MIN_RATINGS = 3_000_000  # at and above: mini-batches (see the table above)
BATCHES_PER_EPOCH = 50  # the automatic batch: about 1/50 of the ratings ...
SMALL_BATCHES_PER_EPOCH = 80  # (lazy-adam's batches below rule 1's size: 1/80 of the ratings)
MIN_AUTO_BATCH, MAX_AUTO_BATCH = 20_000, 250_000  # ... within these bounds
FULL_BATCH_ONLY = ("lbfgs",)
AUTO_LR_SCALE = 2.0  # the schedule starts at this multiple of the configured rate ...
LR_HALF_LIFE_EPOCHS = 1.5  # ... and halves every this many passes over the data ...
AUTO_EPOCHS = 4  # ... for this many passes (the rate ends at about a sixth of its start)
EVALS_PER_EPOCH = 2  # validations per pass on the automatic path, as on small data (four: 4-5% of a 10M fit) ...
EVAL_SAMPLE = 100_000  # ... each on a fixed sample of this many validation ratings
DEFAULT_INIT_STD = 0.1  # an unset init_std: the paper's N(0, 0.1^2) ...
AUTO_INIT_STD = 0.0025  # ... and on the automatic mini-batch path, small factors (a quarter of Cornac's start) ...
AUTO_EPS_UNITS = 14.0  # ... with the adaptive optimizers' eps this many rating gradients ...
EPS_FACTOR = 0.01  # ... on a factor of this size (auto_eps; not the start's: see the module docstring)


@dataclass(frozen=True)
class PathChoice:
    """How a run computes its gradients: ``representation`` (dense / sparse / minibatch), the
    mini-batch size (None: full batch) and why (one line, printed by ``train``)."""

    representation: str
    batch_size: int | None
    reason: str
    lr_half_life_steps: int | None = None  # mini-batches: the learning rate halves every this many steps
    max_steps: int | None = None  # the run's length when neither steps nor epochs are given (None: the default)
    eval_every: int | None = None  # steps between evaluations unless the config sets it (None: the default)
    eval_sample: int | None = None  # validation ratings scored at each evaluation (None: all of them)
    lr_scale: float = 1.0  # mini-batches: the schedule starts at this multiple of the configured rate ...
    lr_hold_steps: int = 0  # ... and holds it this many steps before it starts halving
    init_std: float = DEFAULT_INIT_STD  # the factors' initial std where the config leaves it unset
    eps: float | None = None  # the adaptive optimizers' eps where their options leave it unset (None: theirs),
    # in rating gradients on a factor of EPS_FACTOR (auto_eps; the trainer scales it to a larger given init_std)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def auto_batch_size(n_ratings: int) -> int:
    """About ``n / BATCHES_PER_EPOCH`` ratings, within ``[MIN_AUTO_BATCH, MAX_AUTO_BATCH]`` (and ``n``)."""
    return min(n_ratings, max(MIN_AUTO_BATCH, min(MAX_AUTO_BATCH, round(n_ratings / BATCHES_PER_EPOCH))))


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def auto_eps(batch_size: int, rating_std: float) -> float:
    """Adam's eps for the automatic mini-batch path: ``AUTO_EPS_UNITS`` times one rating's gradient on
    a factor of ``EPS_FACTOR``, ``2 * rating_std * EPS_FACTOR / batch_size`` (a residual of about the
    ratings' std times a factor of that size, in the batch mean).

    Why: Adam divides each coordinate's step by ``sqrt(v) + eps``. With the default 1e-8 every
    direction of the factors moves at the same pace from the first step, the weak ones as fast as
    the strong, and a rank-50 model fits noise (rank 50 on ``bench_scale``'s 10M problem: 0.783 at
    best, against 0.774 at rank 20). Below ``eps`` a coordinate moves like SGD, at ``lr / eps``
    times its gradient, so from small factors the directions the data supports grow first and
    fastest, as under SGD (Cornac's SGD at rank 50: 0.7749), and reach Adam's pace once their
    gradients pass ``eps``. The unit follows the batch: a touched row's gradient is a few ratings'
    share of the batch mean. Measured on that problem (rank 50, init 0.01, lazy Adam): 1 unit
    0.786 (rising after pass 4), 3 units 0.785, 10 units 0.7707 after 10 passes (batches of 20k);
    14 units at the automatic batch 0.7741 after 4 passes (dense Adam and FlowAdam E alike; five
    passes of 1/50 since: 0.7732; four from 0.0025 since: 0.7732). ``EPS_FACTOR`` is that start's
    factor size: the start has been
    made smaller since (``AUTO_INIT_STD``), and eps kept (see the module docstring). The trainer
    scales it to a given ``init_std`` above ``EPS_FACTOR``."""
    return AUTO_EPS_UNITS * 2.0 * max(rating_std, 1e-12) * EPS_FACTOR / batch_size


def auto_minibatch(n_ratings: int, device: torch.device, why: str, rating_std: float = 1.0) -> PathChoice:
    """The automatic mini-batch path for ``n_ratings`` training ratings of standard deviation
    ``rating_std``: the batch, the learning-rate schedule, the run's length, the validation
    cadence (all in passes over the data: see the module docstring) and the start
    (``AUTO_INIT_STD``, :func:`auto_eps`); ``why`` opens the printed reason."""
    size = auto_batch_size(n_ratings)
    per_epoch = math.ceil(n_ratings / size)
    half_life = max(1, round(LR_HALF_LIFE_EPOCHS * per_epoch))
    every = max(1, round(per_epoch / EVALS_PER_EPOCH))
    eps = float(f"{auto_eps(size, rating_std):.3g}")
    threads = ", one torch thread" if device.type == "cpu" else ""
    reason = (f"{why}: mini-batches of {size:,} ({per_epoch} a pass{threads}); the learning rate starts at "
              f"{AUTO_LR_SCALE:g} x lr and halves every {half_life} steps, for {AUTO_EPOCHS * per_epoch} steps "
              f"({AUTO_EPOCHS} passes) unless steps or epochs are given; validation every {every} steps on "
              f"{EVAL_SAMPLE:,} fixed validation ratings; factors start at std {AUTO_INIT_STD:g} and the Adam "
              f"family's eps is {eps:.3g} unless given, so the directions the data supports grow first")
    return PathChoice("minibatch", size, reason, lr_half_life_steps=half_life, max_steps=AUTO_EPOCHS * per_epoch,
                      eval_every=every, eval_sample=EVAL_SAMPLE, lr_scale=AUTO_LR_SCALE, init_std=AUTO_INIT_STD,
                      eps=eps)


def small_minibatch(n_ratings: int, why: str) -> PathChoice:
    """Mini-batches for data below rule 1's size, for an optimizer that steps only on them
    (lazy-adam): ``SMALL_BATCHES_PER_EPOCH`` batches a pass at the configured rate, no schedule (early
    stopping ends the run), validation twice a pass. The large-data schedule (batches of at
    least ``MIN_AUTO_BATCH``, four passes) would leave ML-100K with a dozen steps."""
    size = max(1, round(n_ratings / SMALL_BATCHES_PER_EPOCH))
    per_epoch = math.ceil(n_ratings / size)
    every = max(1, per_epoch // 2)
    return PathChoice("minibatch", size, f"{why}: mini-batches of {size:,} ({per_epoch} a pass) at the configured "
                                         f"rate; validation every {every} steps (twice a pass)", eval_every=every)


def takes_auto_minibatch(n_ratings: int, optimizer: str) -> bool:
    """Whether :func:`choose_path` sends ``n_ratings`` training ratings to mini-batches by their count
    alone (rule 1), whatever the memory budget."""
    return optimizer.lower() not in FULL_BATCH_ONLY and n_ratings >= MINIBATCH_MIN_RATINGS


def choose_path(
    spec: ModelSpec,
    n_ratings: int,
    device: torch.device,
    *,
    optimizer: str = "adam",
    budget_bytes: int | None = None,
    element_size: int = 4,
    duplicates: bool | Callable[[], bool] = False,
    rating_std: float = 1.0,
) -> PathChoice:
    """The path ``auto`` resolves to for ``n_ratings`` training ratings (rule in the module docstring)."""
    minibatch_ok = optimizer.lower() not in FULL_BATCH_ONLY
    if takes_auto_minibatch(n_ratings, optimizer):
        return auto_minibatch(n_ratings, device, f"{n_ratings:,} training ratings (>= {MINIBATCH_MIN_RATINGS:,}): "
                                                 "mini-batches reach a good RMSE in far less time than full batches",
                              rating_std)
    budget = default_budget(device) if budget_bytes is None else budget_bytes
    rep = choose_representation(spec, n_ratings, device, budget_bytes=budget, element_size=element_size,
                                duplicates=duplicates)
    cells = grid_cells(spec)
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
    return auto_minibatch(n_ratings, device, f"{sizes}: no full-batch representation fits the memory budget "
                                             f"({_gib(budget)})", rating_std)
