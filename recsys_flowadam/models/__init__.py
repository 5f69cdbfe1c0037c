"""Factorization models (mf, biased-mf, cp) and their loss/gradient paths.

Every path returns ``(loss, grads)`` for the same objective (see ``factorization``):
``DensePath`` (dense masked grid, two matmuls), ``SparsePath`` (CSR SDDMM + SpMM) and
``AutogradPath`` (gathered embeddings + autograd: mini-batches, and the test reference).
"""

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

__all__ = [
    "AutogradPath", "batch_loss", "Coords", "coords_from_ratings", "DensePath", "DuplicateRatingsError",
    "has_duplicates", "LOSSES", "MODEL_TYPES", "ModelSpec", "Objective", "init_params", "predict",
    "REPRESENTATIONS", "choose_representation", "estimate_bytes", "SparsePath", "make_path",
]


def make_path(representation: str, spec: ModelSpec, coords: Coords, objective: Objective):
    """The full-batch path object for ``dense`` / ``sparse`` (``minibatch`` uses AutogradPath)."""
    if representation == "dense":
        return DensePath(spec, coords, objective)
    if representation == "sparse":
        return SparsePath(spec, coords, objective)
    if representation == "minibatch":
        return AutogradPath(coords, objective)
    raise ValueError(f"unknown representation {representation!r}; choose one of {', '.join(REPRESENTATIONS)}")
