"""Administrative endpoints (bearer token; disabled, i.e. 404, when no token is configured)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool

from recsys_flowadam.artifact import ArtifactError
from recsys_flowadam.serve.body import openapi_request_body, parse_body
from recsys_flowadam.serve.dependencies import get_holder, get_settings, require_admin
from recsys_flowadam.serve.schemas import ErrorResponse, ReloadRequest, ReloadResponse
from recsys_flowadam.serve.settings import Settings
from recsys_flowadam.serve.state import ModelHolder

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])

_REQUEST = TypeAdapter(ReloadRequest | None)  # a body of JSON null reloads the configured folder


@router.post(
    "/reload",
    response_model=ReloadResponse,
    summary="Load an artifact and swap it in atomically (this worker process only)",
    responses={
        401: {"model": ErrorResponse, "description": "Missing or wrong bearer token"},
        404: {"model": ErrorResponse, "description": "Admin endpoints disabled (no token configured)"},
        413: {"model": ErrorResponse, "description": "Body larger than configured"},
        422: {"model": ErrorResponse, "description": "A malformed body, or the artifact is broken (the old model keeps serving)"},
    },
    openapi_extra=openapi_request_body(_REQUEST, required=False),
)
async def reload(
    request: Request,
    holder: ModelHolder = Depends(get_holder),
    settings: Settings = Depends(get_settings),
) -> ReloadResponse:
    # The body is read only now, after require_admin: a caller without the token costs no parsing.
    raw = await request.body()
    body = await parse_body(raw, _REQUEST, max_structure=8, too_large="body too large for a reload request") if raw else None
    path = body.path if body is not None and body.path is not None else settings.artifact_dir
    if path is None:
        raise HTTPException(422, "no path given and no artifact_dir configured (RECSYS_FLOWADAM_ARTIFACT_DIR)")
    try:
        loaded = await run_in_threadpool(holder.load, path)  # reads files: off the event loop
    except ArtifactError as exc:
        raise HTTPException(422, f"reload failed, the previous model keeps serving: {exc}") from None
    return ReloadResponse(path=str(loaded.path), model=loaded.info)
