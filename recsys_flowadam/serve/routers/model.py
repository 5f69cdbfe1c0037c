"""Description of the served model."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from recsys_flowadam.serve.dependencies import get_model
from recsys_flowadam.serve.schemas import ErrorResponse, ModelInfo
from recsys_flowadam.serve.state import LoadedModel

router = APIRouter(prefix="/v1", tags=["model"])


@router.get("/model", response_model=ModelInfo, summary="Type, size, data, metrics and optimizer of the served model",
            responses={503: {"model": ErrorResponse}})
async def get_model_info(model: LoadedModel = Depends(get_model)) -> ModelInfo:
    return model.info
