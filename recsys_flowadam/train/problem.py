"""What a run fits: the model spec, the objective, the training ratings on the device, and the
path its gradients take (dense, sparse or mini-batch, and the batch size: :func:`choose_run_path`).

The objective centres on the training mean when the model has biases (or ``center`` says
so); ``reg_weighting="frequency"`` weights each row's L2 penalty by its share of the ratings.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from recsys_flowadam.data.ratings import Ratings, RatingScale
from recsys_flowadam.models import (
    Coords,
    ModelSpec,
    Objective,
    PathChoice,
    choose_path,
    coords_from_ratings,
    has_duplicates,
)
from recsys_flowadam.models.kinds import TIME_MODELS
from recsys_flowadam.models.path_choice import auto_minibatch, small_minibatch, takes_auto_minibatch
from recsys_flowadam.optim.registry import LAZY_ADAM
from recsys_flowadam.models.time_axis import DEFAULT_TIME_BINS
from recsys_flowadam.models.timeaware import fit_axis, time_coords, time_penalty_weights, torch_axis
from recsys_flowadam.models.implicit import ImplicitFeedback
from recsys_flowadam.models.svdpp import EffectiveParams, implicit_of, implicit_row_weights
from recsys_flowadam.train.config import TrainConfig
from recsys_flowadam.train.metrics import Predictor


@dataclass
class Problem:
    """The model and objective, and the training ratings (all of them) as coordinates."""

    spec: ModelSpec
    objective: Objective
    coords: Coords
    global_mean: float
    scale: RatingScale
    seen_users: torch.Tensor  # bool masks: rows with a training rating (else cold at prediction)
    seen_items: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    rating_std: float  # of the training ratings: sets the default reg and the automatic path's eps
    implicit: ImplicitFeedback | None = None  # svdpp: N of the training ratings, built once

    def predictor(self, params: dict[str, torch.Tensor]) -> Predictor:
        """The prediction rule on ``params`` (live tensors: it follows their updates)."""
        if self.spec.has_implicit:  # the rule reads Z = U + N Y as the user factors
            params = EffectiveParams(params, self.implicit)
        return Predictor(params, self.objective.offset, self.global_mean, self.scale, self.seen_users,
                         self.seen_items, time=self.objective.time)

    def coords_of(self, ratings: Ratings | None) -> Coords | None:
        """Other ratings (validation) like the training ones: same device, dtype, contexts; None if empty."""
        if ratings is None or len(ratings) == 0:
            return None
        if self.objective.time is not None:  # time models: contexts are the timestamps
            return time_coords(ratings, device=self.device, dtype=self.dtype)
        return coords_from_ratings(ratings, device=self.device, dtype=self.dtype, use_contexts=self.spec.is_tensor)


def torch_dtype(config: TrainConfig) -> torch.dtype:
    return torch.float64 if config.dtype == "float64" else torch.float32


# Copies of the parameters a run holds at once: the parameters, their gradients, Adam's two
# moments, and FlowAdam's ODE state and best-parameter snapshot on top (an estimate, not a bound).
_PARAMETER_COPIES = 6
_MINIMUM_COPIES = 2  # parameters and gradients: what any optimizer holds; refused only past this


def check_memory(spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, naming the memory it would need, a model whose parameters cannot fit the device
    (``--rank 1000000000`` otherwise ends in an allocator traceback)."""
    rows = sum(shape[0] for name, shape in spec.shapes().items() if name.endswith("_factors"))  # SVD++'s Y too
    factors = sum(math.prod(shape) for shape in spec.shapes().values()) * dtype.itemsize
    need = factors * _PARAMETER_COPIES
    available = _device_memory(device)
    if available is not None and factors * _MINIMUM_COPIES > available:
        raise ValueError(f"rank {spec.rank} needs about {_gib(factors)} for the parameters alone ({rows:,} factor "
                         f"rows x rank {spec.rank:,} x {dtype.itemsize} bytes, and the biases) and about {_gib(need)} "
                         f"with gradients and optimizer state; {device} has {_gib(available)}: choose a smaller --rank")


def _device_memory(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes (None when unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**40:,.1f} TiB" if n_bytes >= 2**40 else f"{n_bytes / 2**30:,.1f} GiB"


def _cp_needs_contexts(train: Ratings) -> str:
    return ("--model cp needs a third mode, and these ratings have none: give --context time:N (N equal-count "
            "time bins of the ratings' timestamps; MovieLens datasets and CSV files with a timestamp column have "
            "them" + ("" if train.timestamps is None else ", and so does this one") + ") or use a dataset with "
            "contexts (synthetic with -o n_contexts=K)")


def build_problem(train: Ratings, config: TrainConfig, device: torch.device) -> Problem:
    """The spec, objective and training coordinates of ``config.model`` on ``train``."""
    is_cp = config.model == "cp"
    dtype = torch_dtype(config)
    if is_cp and train.n_contexts < 1:
        raise ValueError(_cp_needs_contexts(train))
    spec = ModelSpec(config.model, train.n_users, train.n_items, config.rank,
                     n_contexts=train.n_contexts if is_cp else _time_bins(config, train),
                     biases=config.cp_biases if is_cp else None)
    check_memory(spec, dtype, device)
    center = spec.has_biases if config.center is None else config.center
    axis = _time_axis(spec, train, device)  # time models: their coordinates carry the timestamps
    coords = (coords_from_ratings(train, device=device, dtype=dtype, use_contexts=is_cp) if axis is None
              else time_coords(train, device=device, dtype=dtype))
    implicit = implicit_of(spec, coords) if spec.has_implicit else None
    rating_std = values_std(train.values)
    # one count of each side's ratings serves the frequency weights and the seen masks (each
    # bincount is a pass over all ratings: about 20 ms at 9M)
    counts = {"user": torch.bincount(coords.users, minlength=spec.n_users),
              "item": torch.bincount(coords.items, minlength=spec.n_items)}
    objective = Objective(reg=config.reg_for(rating_std), bias_reg=config.effective_bias_reg,
                          loss=config.loss,
                          huber_delta=config.huber_delta, offset=train.mean if center else 0.0,
                          weights=_row_weights(config, spec, coords, dtype, implicit, counts), time=axis)
    return Problem(spec, objective, coords, train.mean, train.scale, counts["user"] > 0, counts["item"] > 0,
                   device=device, dtype=dtype, rating_std=rating_std, implicit=implicit)


def values_std(values: np.ndarray, chunk: int = 1 << 20) -> float:
    """The standard deviation of ``values``, summed in float64 a chunk at a time: numpy's ``std`` of
    float32 writes a deviation array as large as the ratings (fresh memory) and took 0.12 s at 9M."""
    n = len(values)
    if n == 0:
        return float("nan")
    mean = float(values.mean(dtype=np.float64))
    total = 0.0
    for start in range(0, n, chunk):
        d = values[start:start + chunk].astype(np.float64) - mean
        total += float(np.dot(d, d))
    return math.sqrt(total / n)


def _time_bins(config: TrainConfig, train: Ratings) -> int:
    """The time models' number of time bins: N of ``--context time:N`` when given (the ratings then
    carry N context bins), else ``DEFAULT_TIME_BINS``; 0 for the other models."""
    if config.model not in TIME_MODELS:
        return 0
    return train.n_contexts or DEFAULT_TIME_BINS


def _time_axis(spec: ModelSpec, train: Ratings, device: torch.device):
    """A time model's time axis (``models.time_axis``) of the training ratings, on ``device``; None otherwise."""
    if not spec.has_time:
        return None
    return torch_axis(fit_axis(train, spec.n_contexts), device)


def _row_weights(config: TrainConfig, spec: ModelSpec, coords: Coords, dtype: torch.dtype,
                 implicit: ImplicitFeedback | None, counts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Per-row penalty weights n_row / n for ``reg_weighting="frequency"``; None for uniform.
    ``counts``: the users' and items' rating counts (``build_problem`` counts them once)."""
    if config.reg_weighting != "frequency":
        return time_penalty_weights(spec, None, coords.users.device, dtype)  # None unless a time model
    counts = dict(counts)
    if spec.is_tensor:
        counts["context"] = torch.bincount(coords.contexts, minlength=spec.n_contexts)
    weights = {name: n_row.to(dtype) / len(coords) for name, n_row in counts.items()}
    if spec.has_implicit:  # SVD++'s implicit factors (models.svdpp)
        weights["implicit"] = implicit_row_weights(spec, coords, implicit)
    return {**weights, **(time_penalty_weights(spec, weights, coords.users.device, dtype) or {})}


def choose_run_path(config: TrainConfig, spec: ModelSpec, coords: Coords, largest_shard: int,
                    device: torch.device, rating_std: float = 1.0) -> PathChoice:
    """The run's gradient path: what ``batch_size`` / ``representation`` ask for, else the
    automatic choice (``models.path_choice``) for the largest shard (so every rank agrees)."""
    if config.batch_size is not None:
        if config.representation not in ("auto", "minibatch"):
            raise ValueError(f"batch_size given with representation {config.representation!r}: mini-batch "
                             "training uses gathered embeddings; drop one of the two")
        return PathChoice("minibatch", config.batch_size, "--batch-size given")
    if config.optimizer.lower() == LAZY_ADAM:  # its fused step works on mini-batches only
        if config.representation not in ("auto", "minibatch"):
            raise ValueError(f"optimizer lazy-adam steps on mini-batches, not on representation "
                             f"{config.representation!r}: drop --representation")
        if takes_auto_minibatch(largest_shard, config.optimizer):
            return auto_minibatch(largest_shard, device, "lazy-adam steps on mini-batches", rating_std)
        return small_minibatch(largest_shard, "lazy-adam steps on mini-batches")
    if config.representation != "auto":
        return PathChoice(config.representation, None, "--representation given")
    budget = None if config.memory_budget_gb is None else int(config.memory_budget_gb * (1 << 30))
    return choose_path(spec, largest_shard, device, optimizer=config.optimizer, budget_bytes=budget,
                       element_size=torch_dtype(config).itemsize, duplicates=lambda: has_duplicates(spec, coords),
                       rating_std=rating_std)

