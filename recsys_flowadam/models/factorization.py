"""Factorization models: parameter layout, initialisation, prediction and the objective.

Parameters live in a plain ``dict[str, torch.Tensor]`` whose keys are the artifact's tensor
names (``user_factors``, ``item_factors``, ``user_bias``, ``item_bias``, ``context_factors``),
so the trainer, the gradient paths and the artifact writer all speak the same names.

The objective (identical for every optimizer and every gradient path)::

    L = (1/n) * sum_k rho(pred_k - y_k)
        + reg      * (||U||^2 + ||V||^2 [+ ||W||^2])
        + bias_reg * (||b_user||^2 + ||b_item||^2)

``pred = offset [+ b_user[u] + b_item[i]] + <U[u], V[i] [, W[c]]>`` with ``n`` the number of
training ratings, ``rho(r) = r^2`` (MSE) or the Huber function scaled to agree with it near 0:
``rho(r) = r^2`` for ``|r| <= delta``, ``2*delta*|r| - delta^2`` beyond (so ``rho'`` is
``2r`` clipped to ``+-2*delta``).

SVD++ (``svdpp``, :mod:`recsys_flowadam.models.svdpp`) is biased MF with ``U[u]`` replaced by
``U[u] + |N(u)|^{-1/2} sum_{j in N(u)} Y[j]`` (``implicit_factors``, penalised with ``reg`` like
the other factors, and weighted like the items under frequency weighting).

``time-mf`` (:mod:`recsys_flowadam.models.time_axis`, :mod:`recsys_flowadam.models.timeaware`)
is biased MF whose biases move with time: ``item_time_bias`` (n_items, n_bins) and
``user_drift_bias`` (n_users,) are biases (zero start, ``bias_reg``; weighted like their mode).
``time-svdpp`` (timeSVD++ without its time-dependent user factors) is SVD++ with time-mf's
moving biases: both additions at once, each as in its own model.

Optional frequency weighting of the penalty (``Objective.weights``, "weighted-lambda" as in
ALS-WR, Zhou et al. 2008; also what per-rating SGD regularisation as in Funk/Surprise
minimises): row ``u`` of U (and ``b_u``) is penalised with weight ``n_u / n`` (its share
of the training ratings) instead of 1, likewise items and contexts; the default is uniform.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from recsys_flowadam.models.kinds import IMPLICIT_MODELS, MODEL_TYPES, TIME_MODELS

LOSSES = ("mse", "huber")
PARAM_ORDER = ("user_factors", "item_factors", "context_factors", "implicit_factors", "user_bias", "item_bias",
                "item_time_bias", "user_drift_bias")


@dataclass(frozen=True)
class ModelSpec:
    """What a model is: its type, sizes, rank and whether it has biases."""

    model_type: str
    n_users: int
    n_items: int
    rank: int
    n_contexts: int = 0
    biases: bool | None = None  # None: biased-mf has biases, mf has none, cp none unless asked

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"unknown model type {self.model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.model_type == "cp" and self.n_contexts < 1:
            raise ValueError("the cp model needs a third mode: ratings with contexts (n_contexts >= 1)")
        if self.model_type == "mf" and self.biases:
            raise ValueError("the mf model has no biases; use biased-mf")
        if self.model_type == "biased-mf" and self.biases is False:
            raise ValueError("biased-mf always has biases; use mf for a model without them")
        if self.has_implicit and self.biases is False:
            raise ValueError(f"{self.model_type} always has biases")
        if self.has_time and (self.biases is False or self.n_contexts < 1):
            raise ValueError(f"{self.model_type} always has biases and needs n_contexts >= 1 (its time bins)")

    @property
    def has_biases(self) -> bool:
        return self.model_type in ("biased-mf", *IMPLICIT_MODELS, *TIME_MODELS) or (
            self.model_type == "cp" and bool(self.biases))

    @property
    def has_implicit(self) -> bool:
        """SVD++'s implicit factors ``Y`` (svdpp, time-svdpp)."""
        return self.model_type in IMPLICIT_MODELS

    @property
    def has_time(self) -> bool:
        """Time-binned item biases and user drift (time-mf, time-svdpp); n_contexts = the bins."""
        return self.model_type in TIME_MODELS

    @property
    def is_tensor(self) -> bool:
        return self.model_type == "cp"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter name -> shape, in ``PARAM_ORDER``."""
        out: dict[str, tuple[int, ...]] = {
            "user_factors": (self.n_users, self.rank),
            "item_factors": (self.n_items, self.rank),
        }
        if self.is_tensor:
            out["context_factors"] = (self.n_contexts, self.rank)
        if self.has_implicit:  # SVD++'s implicit factors Y (models.svdpp)
            out["implicit_factors"] = (self.n_items, self.rank)
        if self.has_biases:
            out["user_bias"] = (self.n_users,)
            out["item_bias"] = (self.n_items,)
        if self.has_time:  # time-binned item biases and user drift (models.time_axis)
            out["item_time_bias"] = (self.n_items, self.n_contexts)
            out["user_drift_bias"] = (self.n_users,)
        return out

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class Objective:
    """The training loss: data term, L2 penalties and the constant prediction offset.

    ``weights`` (optional): mode name ("user", "item", "context") -> per-row penalty weight
    tensor; absent means uniform weight 1 (see the module docstring). ``time``: the time axis
    of ``time-mf`` (bin edges, user mean dates), part of its prediction like ``offset``.
    """

    reg: float = 0.0
    bias_reg: float = 0.0
    loss: str = "mse"
    huber_delta: float = 1.0
    offset: float = 0.0
    weights: dict[str, torch.Tensor] | None = None
    time: Any = None  # time-mf: its models.time_axis.TimeAxis (torch tensors on the data's device)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.reg < 0 or self.bias_reg < 0:
            raise ValueError("regularisation weights must be >= 0")
        if self.loss == "huber" and not self.huber_delta > 0:
            raise ValueError(f"huber_delta must be > 0, got {self.huber_delta}")

    def rho(self, r: torch.Tensor) -> torch.Tensor:
        """Per-residual loss (not yet averaged)."""
        if self.loss == "mse":
            return r * r
        a = r.abs()
        d = self.huber_delta
        return torch.where(a <= d, r * r, 2.0 * d * a - d * d)

    def psi(self, r: torch.Tensor) -> torch.Tensor:
        """Derivative of ``rho``."""
        if self.loss == "mse":
            return 2.0 * r
        return 2.0 * r.clamp(-self.huber_delta, self.huber_delta)

    def row_weights(self, name: str) -> torch.Tensor | None:
        if not self.weights:
            return None
        own = self.weights.get(name)  # a parameter's own weights (time-mf's time terms) before its mode's
        return own if own is not None else self.weights.get(name.split("_")[0])

    def penalty(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The L2 terms of ``params`` (all of a model's, or some); differentiable (the autograd paths)."""
        total = next(iter(params.values())).new_zeros(())
        for name, p in params.items():
            lam = self.bias_reg if name.endswith("_bias") else self.reg
            if not lam:
                continue
            sq = p.pow(2) if p.dim() == 1 else p.pow(2).sum(dim=1)
            w = self.row_weights(name)
            total = total + lam * (sq.sum() if w is None else torch.dot(w.to(sq.dtype), sq))
        return total

    def add_penalty(self, params: dict[str, torch.Tensor], data: torch.Tensor,
                    grads: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The analytic paths' last step: ``data`` + the L2 terms, and their gradients added to ``grads``
        (in place); the gradients come back in the parameters' order."""
        for name, g in grads.items():
            pg = self.penalty_grad(name, params[name].detach())
            if not isinstance(pg, float):
                g.add_(pg)
        loss = data + self.penalty({k: p.detach() for k, p in params.items()})
        return loss, {k: grads[k] for k in params}

    def penalty_grad(self, name: str, p: torch.Tensor) -> torch.Tensor | float:
        """Gradient of the L2 term of one parameter (``0.0`` when it has none)."""
        lam = self.bias_reg if name.endswith("_bias") else self.reg
        if not lam:
            return 0.0
        w = self.row_weights(name)
        if w is None:
            return 2.0 * lam * p
        w = w.to(p.dtype)
        return 2.0 * lam * (w * p if p.dim() == 1 else w[:, None] * p)


def init_params(
    spec: ModelSpec,
    *,
    init_std: float = 0.1,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Factors ~ N(0, init_std^2) (the paper's N(0, 0.1^2)), biases 0; leaf tensors needing grad.

    Drawn on the CPU from ``generator`` then moved, so a seed gives the same start on any device.
    """
    params: dict[str, torch.Tensor] = {}
    for name, shape in spec.shapes().items():
        if name.endswith("_bias"):
            t = torch.zeros(shape, dtype=dtype)
        else:
            t = torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype) * init_std
        params[name] = t.to(device).requires_grad_(True)
    return params


def predict(
    params: dict[str, torch.Tensor],
    users: torch.Tensor,
    items: torch.Tensor,
    contexts: torch.Tensor | None = None,
    offset: float = 0.0,
) -> torch.Tensor:
    """Raw (unclipped) predictions at the given coordinates, via gathered embeddings.

    Differentiable: the mini-batch path and the autograd reference are built on it.
    """
    if "implicit_factors" in params:
        raise ValueError("SVD++ predictions need the implicit feedback: use models.svdpp_autograd.svdpp_predict")
    u = params["user_factors"][users]
    v = params["item_factors"][items]
    if "context_factors" in params:
        if contexts is None:
            # no context given: the expectation over a uniformly chosen context
            w = params["context_factors"].mean(dim=0)
            pred = (u * v * w).sum(dim=1)
        else:
            pred = (u * v * params["context_factors"][contexts]).sum(dim=1)
    else:
        pred = (u * v).sum(dim=1)
    if "user_bias" in params:
        pred = pred + params["user_bias"][users] + params["item_bias"][items]
    return pred + offset
