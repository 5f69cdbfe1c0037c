"""Administrative endpoints (bearer token; disabled, i.e. 404, when no token is configured)."""

from __future__ import annotations

from fastapi import APIRouter, Body, Depends, HTTPException, status

from recsys_flowadam.artifact import ArtifactError
from recsys_flowadam.serve.dependencies import get_holder, get_settings, require_admin
from recsys_flowadam.serve.schemas import ErrorResponse, ReloadRequest, ReloadResponse
from recsys_flowadam.serve.settings import Settings
from recsys_flowadam.serve.state import ModelHolder

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])


@router.post(
    "/reload",
    response_model=ReloadResponse,
    summary="Load an artifact and swap it in atomically (this worker process only)",
    responses={
        401: {"model": ErrorResponse, "description": "Missing or wrong bearer token"},
        404: {"model": ErrorResponse, "description": "Admin endpoints disabled (no token configured)"},
        422: {"model": ErrorResponse, "description": "The artifact is broken; the old model keeps serving"},
    },
)
def reload(  # plain def: loading reads files, so FastAPI runs it in its thread pool
    body: ReloadRequest | None = Body(default=None),
    holder: ModelHolder = Depends(get_holder),
    settings: Settings = Depends(get_settings),
) -> ReloadResponse:
    path = body.path if body is not None and body.path is not None else settings.artifact_dir
    if path is None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            "no path given and no artifact_dir configured (RECSYS_FLOWADAM_ARTIFACT_DIR)")
    try:
        loaded = holder.load(path)
    except ArtifactError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"reload failed, the previous model keeps serving: {exc}") from None
    return ReloadResponse(path=str(loaded.path), model=loaded.info)
