"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from recsys_flowadam.serve.dependencies import get_model
from recsys_flowadam.serve.schemas import ErrorResponse, Health, Ready
from recsys_flowadam.serve.state import LoadedModel

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="Liveness: the process answers")
async def health() -> Health:
    return Health()


@router.get("/ready", response_model=Ready, summary="Readiness: a model is loaded",
            responses={503: {"model": ErrorResponse, "description": "No model loaded"}})
async def ready(model: LoadedModel = Depends(get_model)) -> Ready:
    return Ready(model_type=model.info.model_type, created_at=model.info.created_at)
