"""Trained-model artifacts (format v1): one folder holding ``model.safetensors`` + ``model.json``.

The trainer writes artifacts with :func:`save_artifact`; ``evaluate`` and the HTTP service read
them with :func:`load_artifact`. No pickle is involved anywhere: tensors are safetensors, metadata
is JSON validated by a pydantic model that rejects unknown fields.

``schema`` describes the format (metadata models, required tensors, their validation);
``files`` reads and writes folders (atomic replacement, memory-mapped loading).
"""

from .files import check_artifact_target, load_artifact, save_artifact
from .schema import (
    MODEL_JSON,
    MODEL_TENSORS,
    SCHEMA_VERSION,
    Artifact,
    ArtifactError,
    ArtifactMeta,
    OptimizerInfo,
    RatingScaleInfo,
    TrainingData,
    VersionsInfo,
    expected_tensors,
    make_artifact,
)

__all__ = [
    "MODEL_JSON",
    "MODEL_TENSORS",
    "SCHEMA_VERSION",
    "Artifact",
    "ArtifactError",
    "ArtifactMeta",
    "OptimizerInfo",
    "RatingScaleInfo",
    "TrainingData",
    "VersionsInfo",
    "check_artifact_target",
    "expected_tensors",
    "load_artifact",
    "make_artifact",
    "save_artifact",
]
