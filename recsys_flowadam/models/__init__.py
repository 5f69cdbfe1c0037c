"""Factorization models (mf, biased-mf, cp), their loss/gradient paths and their prediction rule.

Every path returns ``(loss, grads)`` for the same objective (see ``factorization``):
``DensePath`` (dense masked grid, two matmuls), ``SparsePath`` (CSR SDDMM + SpMM) and
``AutogradPath`` (gathered embeddings + autograd: mini-batches, and the test reference).
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
    from recsys_flowadam.models.factorization import (
        LOSSES,
        MODEL_TYPES,
        ModelSpec,
        Objective,
        init_params,
        predict,
    )
    from recsys_flowadam.models.representation import REPRESENTATIONS, choose_representation, estimate_bytes
    from recsys_flowadam.models.sparse import SparsePath

# name -> the submodule defining it (imports torch)
_LAZY = {
    "AutogradPath": "autograd_path", "batch_loss": "autograd_path",
    "Coords": "coords", "coords_from_ratings": "coords",
    "DensePath": "dense", "DuplicateRatingsError": "dense", "has_duplicates": "dense",
    "LOSSES": "factorization", "MODEL_TYPES": "factorization", "ModelSpec": "factorization",
    "Objective": "factorization", "init_params": "factorization", "predict": "factorization",
    "REPRESENTATIONS": "representation", "choose_representation": "representation",
    "estimate_bytes": "representation",
    "SparsePath": "sparse",
}

__all__ = [
    "AutogradPath", "batch_loss", "Coords", "coords_from_ratings", "DensePath", "DuplicateRatingsError",
    "has_duplicates", "LOSSES", "MODEL_TYPES", "ModelSpec", "Objective", "init_params", "predict",
    "REPRESENTATIONS", "choose_representation", "estimate_bytes", "SparsePath", "make_path",
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
    """The full-batch path object for ``dense`` / ``sparse`` (``minibatch`` uses AutogradPath)."""
    from recsys_flowadam.models.autograd_path import AutogradPath
    from recsys_flowadam.models.dense import DensePath
    from recsys_flowadam.models.representation import REPRESENTATIONS
    from recsys_flowadam.models.sparse import SparsePath

    if representation == "dense":
        return DensePath(spec, coords, objective)
    if representation == "sparse":
        return SparsePath(spec, coords, objective)
    if representation == "minibatch":
        return AutogradPath(coords, objective)
    raise ValueError(f"unknown representation {representation!r}; choose one of {', '.join(REPRESENTATIONS)}")
