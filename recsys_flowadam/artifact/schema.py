"""The artifact format v1 itself: the ``model.json`` schema and the tensors it requires.

Pure description and validation, no file access: pydantic models that reject unknown fields,
the tensor names, dtypes and shapes a given metadata calls for, and the check of a set of
tensors against it. :mod:`recsys_flowadam.artifact.files` applies these on save and load.
"""

from __future__ import annotations

import math
import platform
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from recsys_flowadam.models.kinds import IMPLICIT_MODELS, TIME_MODELS

SCHEMA_VERSION = 1
MODEL_JSON = "model.json"
MODEL_TENSORS = "model.safetensors"

_FLOAT_TENSORS = ("user_factors", "item_factors", "user_bias", "item_bias", "context_factors", "implicit_factors",
                  "item_time_bias", "user_drift_bias", "user_mean_day",
                  "user_day_span")


class ArtifactError(ValueError):
    """An artifact folder is missing, unreadable or inconsistent; the message names folder, file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainingData(_Strict):
    """Which data the model was trained on (source file checksums make it reproducible)."""

    name: str
    source_files: dict[str, str] = Field(default_factory=dict)
    split: str
    seed: int


_RATING_LIMIT = 1e15  # far beyond any rating scale; float32 predictions and squared errors stay finite


class RatingScaleInfo(_Strict):
    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> "RatingScaleInfo":
        if not (math.isfinite(self.min) and math.isfinite(self.max) and self.min < self.max):
            raise ValueError(f"rating_scale needs finite min < max, got min={self.min}, max={self.max}")
        if max(abs(self.min), abs(self.max)) > _RATING_LIMIT:
            # predictions are float32 and a span this wide overflows in clipping and error sums
            raise ValueError(f"rating_scale must lie within +-{_RATING_LIMIT:g}, got min={self.min}, max={self.max}")
        return self


class OptimizerInfo(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    diagnostics: dict[str, Any] = Field(default_factory=dict)


class VersionsInfo(_Strict):
    recsys_flowadam: str
    torch: str
    numpy: str
    python: str


class TimeAxisInfo(_Strict):
    """time-mf's time axis (``models.time_axis``): inner bin edges and the prediction time without a
    timestamp (``now``), in seconds since the epoch, and the drift exponent. t_u per user is the
    tensor ``user_mean_day``, each user's first and last training day ``user_day_span``."""

    edges: list[float]
    now: float
    beta: float = Field(gt=0, le=1)

    @model_validator(mode="after")
    def _sorted(self) -> "TimeAxisInfo":
        if not all(math.isfinite(e) for e in [*self.edges, self.now]) or sorted(self.edges) != self.edges:
            raise ValueError("time_axis needs finite, ascending edges and a finite now")
        return self


class ArtifactMeta(_Strict):
    """The ``model.json`` schema (format v1); unknown fields are an error."""

    schema_version: int
    model_type: Literal["mf", "biased-mf", "cp", "svdpp", "time-mf", "time-svdpp"]
    rank: int = Field(ge=1)
    n_users: int = Field(ge=1)
    n_items: int = Field(ge=1)
    n_contexts: int = Field(default=0, ge=0)
    dataset: TrainingData
    rating_scale: RatingScaleInfo
    global_mean: float
    prediction_offset: float
    user_ids: list[str]
    item_ids: list[str]
    item_titles: list[str | None] | None = None
    time_axis: TimeAxisInfo | None = None  # time-mf and time-svdpp only
    train_config: dict[str, Any] = Field(default_factory=dict)
    optimizer: OptimizerInfo
    metrics: dict[str, Any] = Field(default_factory=dict)
    versions: VersionsInfo
    created_at: datetime

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema_version {v}; this version reads {SCHEMA_VERSION}")
        return v

    @field_validator("global_mean", "prediction_offset")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("created_at")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("created_at must carry a UTC offset (ISO-8601, e.g. 2026-01-01T00:00:00Z)")
        return v.astimezone(timezone.utc)

    @model_validator(mode="after")
    def _consistent(self) -> "ArtifactMeta":
        for name, ids, n in (("user_ids", self.user_ids, self.n_users), ("item_ids", self.item_ids, self.n_items)):
            if len(ids) != n:
                raise ValueError(f"{name} has {len(ids)} entries but n_{name[:-4]}s is {n}")
            if len(set(ids)) != n:
                raise ValueError(f"{name} contains duplicate IDs")
        if self.item_titles is not None and len(self.item_titles) != self.n_items:
            raise ValueError(f"item_titles has {len(self.item_titles)} entries but n_items is {self.n_items}")
        if (self.model_type in ("cp", *TIME_MODELS)) != (self.n_contexts > 0):
            raise ValueError(f"n_contexts must be > 0 exactly for model_type 'cp', 'time-mf' and 'time-svdpp' "
                             f"(got {self.n_contexts} for '{self.model_type}')")
        if (self.model_type in TIME_MODELS) != (self.time_axis is not None):
            raise ValueError("time_axis is required for model_type 'time-mf' and 'time-svdpp' and only for them")
        if self.time_axis is not None and len(self.time_axis.edges) != self.n_contexts - 1:
            raise ValueError(f"time_axis has {len(self.time_axis.edges)} edges for n_contexts {self.n_contexts} "
                             "(time bins): expected n_contexts - 1")
        if not self.rating_scale.min <= self.global_mean <= self.rating_scale.max:
            raise ValueError(f"global_mean {self.global_mean} lies outside the rating scale")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


@dataclass(frozen=True)
class Artifact:
    """A checked artifact: its folder (None while only in memory), validated metadata and tensors
    (read-only and memory-mapped when loaded from a folder)."""

    path: Path | None
    meta: ArtifactMeta
    tensors: dict[str, np.ndarray]


def format_errors(exc: ValidationError) -> str:
    """A pydantic validation error as one line, each problem as ``field 'a.b': message``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"field '{loc}': {err['msg']}")
    return "; ".join(parts)


def default_versions() -> dict[str, str]:
    """The ``versions`` block for a new artifact: this package, torch (if installed), numpy, Python."""
    from recsys_flowadam import __version__

    torch_mod = sys.modules.get("torch")
    if torch_mod is None:
        try:
            from importlib.metadata import version

            torch_version = version("torch")
        except Exception:  # noqa: BLE001 - torch is optional for writing numpy artifacts
            torch_version = "unknown"
    else:
        torch_version = torch_mod.__version__
    return {"recsys_flowadam": __version__, "torch": torch_version, "numpy": np.__version__, "python": platform.python_version()}


def complete_meta(where: Path, meta: ArtifactMeta | Mapping[str, Any]) -> ArtifactMeta:
    """``meta`` as a validated :class:`ArtifactMeta`; in a mapping, ``schema_version``,
    ``versions`` and ``created_at`` are filled in when absent. ArtifactError names ``where``."""
    if isinstance(meta, ArtifactMeta):
        return meta
    data = dict(meta)
    data.setdefault("schema_version", SCHEMA_VERSION)
    data.setdefault("versions", default_versions())
    data.setdefault("created_at", datetime.now(timezone.utc))
    try:
        return ArtifactMeta.model_validate(data)
    except ValidationError as exc:
        raise ArtifactError(f"{where}: invalid metadata for {MODEL_JSON}: {format_errors(exc)}") from None


def as_numpy(name: str, value: Any) -> np.ndarray:
    """A tensor as a contiguous numpy array (torch tensors are moved to the CPU)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise ArtifactError(f"tensor '{name}' must be a numpy array or torch tensor, got {type(value).__name__}")
    return np.ascontiguousarray(value)


def make_artifact(tensors: Mapping[str, Any], meta: ArtifactMeta | Mapping[str, Any],
                  where: Path | None = None) -> Artifact:
    """An :class:`Artifact` checked exactly as :func:`save_artifact` checks one, without writing it
    (the Python API holds a fitted model this way). ``where`` names it in errors and is its path."""
    label = where if where is not None else Path("<in-memory artifact>")
    meta = complete_meta(label, meta)
    arrays = {name: as_numpy(name, value) for name, value in tensors.items()}
    check_tensors(f"{label}: {MODEL_TENSORS}", meta, arrays)
    return Artifact(path=where, meta=meta, tensors=arrays)


def expected_tensors(meta: ArtifactMeta) -> dict[str, tuple[np.dtype, tuple[int, ...] | None]]:
    """Required tensors: name -> (dtype, shape); shape None means 1-D of any length (train_items)."""
    f32, i64 = np.dtype("<f4"), np.dtype("<i8")
    out: dict[str, tuple[np.dtype, tuple[int, ...] | None]] = {
        "user_factors": (f32, (meta.n_users, meta.rank)),
        "item_factors": (f32, (meta.n_items, meta.rank)),
        "train_indptr": (i64, (meta.n_users + 1,)),
        "train_items": (i64, None),
    }
    if meta.model_type in ("biased-mf", *IMPLICIT_MODELS, *TIME_MODELS):
        out["user_bias"] = (f32, (meta.n_users,))
        out["item_bias"] = (f32, (meta.n_items,))
    if meta.model_type == "cp":
        out["context_factors"] = (f32, (meta.n_contexts, meta.rank))
    if meta.model_type in IMPLICIT_MODELS:  # SVD++'s Y; the service sums it over train_indptr/train_items
        out["implicit_factors"] = (f32, (meta.n_items, meta.rank))
    if meta.model_type in TIME_MODELS:  # time-binned item biases, user drift and t_u (models.time_axis)
        out["item_time_bias"] = (f32, (meta.n_items, meta.n_contexts))
        out["user_drift_bias"] = (f32, (meta.n_users,))
        out["user_mean_day"] = (f32, (meta.n_users,))
        out["user_day_span"] = (f32, (meta.n_users, 2))
    return out


def _allowed_tensors(where: str, meta: ArtifactMeta, tensors: Mapping[str, np.ndarray]):
    """Required plus optional tensors for ``meta``; cp may carry biases (both or neither)."""
    expected = expected_tensors(meta)
    optional = {}
    if meta.model_type == "cp":
        optional = {"user_bias": (np.dtype("<f4"), (meta.n_users,)), "item_bias": (np.dtype("<f4"), (meta.n_items,))}
        has = [k in tensors for k in optional]
        if any(has) and not all(has):
            raise ArtifactError(f"{where}: tensors user_bias and item_bias must both be present or both absent")
    allowed = {**expected, **optional}
    unknown = sorted(set(tensors) - set(allowed))
    if unknown:
        raise ArtifactError(f"{where}: unexpected tensor(s) {unknown} for model_type '{meta.model_type}'")
    return expected, allowed


def check_tensors(where: str, meta: ArtifactMeta, tensors: Mapping[str, np.ndarray]) -> None:
    """Every tensor's name, dtype, shape and content against the metadata; ArtifactError otherwise."""
    expected, allowed = _allowed_tensors(where, meta, tensors)
    for name, (dtype, shape) in allowed.items():
        if name not in tensors:
            if name in expected:
                raise ArtifactError(f"{where}: tensor '{name}' is missing (required for model_type '{meta.model_type}')")
            continue
        arr = tensors[name]
        if arr.dtype != dtype:
            raise ArtifactError(f"{where}: tensor '{name}' has dtype {arr.dtype}, expected {dtype.name}")
        if shape is None:
            if arr.ndim != 1:
                raise ArtifactError(f"{where}: tensor '{name}' has shape {arr.shape}, expected 1-D")
        elif arr.shape != shape:
            raise ArtifactError(f"{where}: tensor '{name}' has shape {tuple(arr.shape)}, expected {shape}")
        if name in _FLOAT_TENSORS and not np.isfinite(arr).all():
            raise ArtifactError(f"{where}: tensor '{name}' contains NaN or infinite values")
    indptr, items = tensors["train_indptr"], tensors["train_items"]
    if indptr[0] != 0 or indptr[-1] != items.shape[0] or (np.diff(indptr) < 0).any():
        raise ArtifactError(
            f"{where}: tensor 'train_indptr' is not a CSR row pointer for {items.shape[0]} train_items "
            "(must start at 0, never decrease, end at len(train_items))"
        )
    if items.size and (items.min() < 0 or items.max() >= meta.n_items):
        raise ArtifactError(f"{where}: tensor 'train_items' holds item indices outside [0, {meta.n_items})")


__all__ = [
    "MODEL_JSON",
    "MODEL_TENSORS",
    "SCHEMA_VERSION",
    "Artifact",
    "ArtifactError",
    "ArtifactMeta",
    "OptimizerInfo",
    "RatingScaleInfo",
    "TimeAxisInfo",
    "TrainingData",
    "VersionsInfo",
    "check_tensors",
    "complete_meta",
    "default_versions",
    "expected_tensors",
    "format_errors",
]
