"""Pydantic models of every request and response body of the service."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict  # pydantic needs typing_extensions' TypedDict on Python < 3.12

from recsys_flowadam.serve.settings import MAX_ID_LENGTH

RawID = Field(min_length=1, max_length=MAX_ID_LENGTH, description="Raw dataset ID, as a string")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


RawIDStr = Annotated[str, RawID]


class Pair(TypedDict):
    """One user-item pair. A TypedDict rather than a model: validating 10,000 pairs into dicts
    is ~3x faster than building 10,000 model instances, and the JSON schema is the same."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    user: RawIDStr
    item: RawIDStr


class PredictRequest(_Request):
    pairs: list[Pair] = Field(min_length=1, description="User-item pairs; at most the configured max_pairs (default 10,000).")
    strict: bool = Field(default=False, description="Answer 404 naming the unknown IDs instead of using cold start.")


class Prediction(BaseModel):
    user: str
    item: str
    rating: float = Field(description="Predicted rating, clipped to the model's rating scale")
    known_user: bool = Field(description="The model has training ratings for this user (else cold start)")
    known_item: bool = Field(description="The model has training ratings for this item (else cold start)")


class PredictResponse(BaseModel):
    predictions: list[Prediction]


class RecommendedItem(BaseModel):
    item: str
    rating: float = Field(description="Predicted rating, clipped to the rating scale")
    title: str | None = None


class RecommendationsResponse(BaseModel):
    user: str
    k: int
    exclude_rated: bool
    items: list[RecommendedItem]


class SimilarItem(BaseModel):
    item: str
    similarity: float = Field(description="Cosine similarity of the item factors, in [-1, 1]")
    title: str | None = None


class SimilarItemsResponse(BaseModel):
    item: str
    k: int
    items: list[SimilarItem]


class RatingScaleOut(BaseModel):
    min: float
    max: float


class DatasetOut(BaseModel):
    name: str
    split: str
    seed: int
    source_files: dict[str, str]


class OptimizerOut(BaseModel):
    name: str
    params: dict[str, Any]
    diagnostics: dict[str, Any]


class ModelInfo(BaseModel):
    model_type: str
    rank: int
    dataset: DatasetOut
    rating_scale: RatingScaleOut
    n_users: int
    n_items: int
    n_contexts: int
    global_mean: float
    metrics: dict[str, Any]
    created_at: datetime
    optimizer: OptimizerOut
    train_config: dict[str, Any]
    versions: dict[str, str]


class ReloadRequest(_Request):
    path: str | None = Field(
        default=None, min_length=1, max_length=4096,
        description="Artifact folder on the server; default: the configured artifact_dir.",
    )


class ReloadResponse(BaseModel):
    status: Literal["reloaded"] = "reloaded"
    path: str
    model: ModelInfo


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    model_type: str
    created_at: datetime


class ErrorResponse(BaseModel):
    """The body of every error answer (FastAPI's shape): a message, or a structured detail."""

    detail: Any


class UnknownIDs(BaseModel):
    message: str
    unknown_users: list[str]
    unknown_items: list[str]


class UnknownIDsResponse(BaseModel):
    """404 body of a strict prediction request with unknown IDs."""

    detail: UnknownIDs
