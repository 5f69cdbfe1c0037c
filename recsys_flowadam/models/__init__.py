"""Factorization models (mf, biased-mf, cp), their loss/gradient paths and their prediction rule.

Every path returns ``(loss, grads)`` for the same objective (see ``factorization``):
``DensePath`` (dense masked grid, two matmuls), ``SparsePath`` (CSR SDDMM + SpMM),
``MiniBatchPath`` (gathers and scatter-adds written out: mini-batches) and ``AutogradPath``
(gathered embeddings + autograd: the test reference). ``representation`` decides which one a
run uses (``choose_path``).
``prediction`` holds the rating rule (cold start, clipping) on numpy or torch.

The torch-based names are imported on first use, so the numpy-only service can import
``recsys_flowadam.models.prediction`` without importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from recsys_flowadam.models.prediction import (
    RatingRule,
    clip_ratings,
    fold_rows,
    known,
    rule_from_artifact,
    seen_from_csr,
    seen_in_training,
    seen_mask,
)

if TYPE_CHECKING:
    from recsys_flowadam.models.autograd_path import AutogradPath, batch_loss
    from recsys_flowadam.models.coords import Coords, coords_from_ratings
    from recsys_flowadam.models.dense import DensePath, DuplicateRatingsError, has_duplicates
    from recsys_flowadam.models.minibatch import MiniBatchPath
    from recsys_flowadam.models.factorization import (
        LOSSES,
        MODEL_TYPES,
        ModelSpec,
        Objective,
        init_params,
        predict,
    )
    from recsys_flowadam.models.path_choice import PathChoice, auto_batch_size, choose_path
    from recsys_flowadam.models.representation import REPRESENTATIONS, choose_representation, estimate_bytes
    from recsys_flowadam.models.sparse import SparsePath
    from recsys_flowadam.models.implicit import ImplicitFeedback
    from recsys_flowadam.models.svdpp import make_svdpp_path
    from recsys_flowadam.models.svdpp_autograd import SvdppAutogradPath

# name -> the submodule defining it (imports torch)
_LAZY = {
    "AutogradPath": "autograd_path", "batch_loss": "autograd_path",
    "Coords": "coords", "coords_from_ratings": "coords",
    "DensePath": "dense", "DuplicateRatingsError": "dense", "has_duplicates": "dense",
    "LOSSES": "factorization", "MODEL_TYPES": "factorization", "ModelSpec": "factorization",
    "Objective": "factorization", "init_params": "factorization", "predict": "factorization",
    "MiniBatchPath": "minibatch",
    "REPRESENTATIONS": "representation", "choose_representation": "representation",
    "estimate_bytes": "representation",
    "PathChoice": "path_choice", "choose_path": "path_choice", "auto_batch_size": "path_choice",
    "SparsePath": "sparse",
    "ImplicitFeedback": "implicit", "SvdppAutogradPath": "svdpp_autograd", "make_svdpp_path": "svdpp",
}

__all__ = [
    "AutogradPath", "batch_loss", "Coords", "coords_from_ratings", "DensePath", "DuplicateRatingsError",
    "has_duplicates", "LOSSES", "MODEL_TYPES", "ModelSpec", "Objective", "init_params", "predict",
    "MiniBatchPath", "REPRESENTATIONS", "choose_representation", "estimate_bytes", "PathChoice", "choose_path",
    "auto_batch_size", "SparsePath", "make_path", "ImplicitFeedback", "SvdppAutogradPath", "make_svdpp_path",
    "RatingRule", "clip_ratings", "fold_rows", "known", "rule_from_artifact", "seen_from_csr",
    "seen_in_training", "seen_mask",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def make_path(representation: str, spec: ModelSpec, coords: Coords, objective: Objective):
    """The gradient path for a representation: ``DensePath`` / ``SparsePath`` (full batch) or
    ``MiniBatchPath`` (``minibatch``; also computes a full batch when given no batch)."""
    from recsys_flowadam.models.dense import DensePath
    from recsys_flowadam.models.minibatch import MiniBatchPath
    from recsys_flowadam.models.representation import REPRESENTATIONS
    from recsys_flowadam.models.sparse import SparsePath

    if spec.has_implicit:  # its own paths (models.svdpp), over biased MF's or time-mf's
        from recsys_flowadam.models.svdpp import make_svdpp_path

        return make_svdpp_path(representation, spec, coords, objective)
    if spec.has_time:  # its own paths (models.timeaware)
        from recsys_flowadam.models.timeaware import make_time_path

        return make_time_path(representation, spec, coords, objective)
    if representation == "dense":
        return DensePath(spec, coords, objective)
    if representation == "sparse":
        return SparsePath(spec, coords, objective)
    if representation == "minibatch":
        return MiniBatchPath(coords, objective)
    raise ValueError(f"unknown representation {representation!r}; choose one of {', '.join(REPRESENTATIONS)}")
