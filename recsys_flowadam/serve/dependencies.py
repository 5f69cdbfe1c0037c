"""FastAPI dependencies: settings, the current model (taken once per request), admin auth."""

from __future__ import annotations

import secrets

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from recsys_flowadam.serve.settings import Settings
from recsys_flowadam.serve.state import LoadedModel, ModelHolder

_bearer = HTTPBearer(auto_error=False, description="The admin token from RECSYS_FLOWADAM_ADMIN_TOKEN")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_holder(request: Request) -> ModelHolder:
    return request.app.state.holder


async def get_model(holder: ModelHolder = Depends(get_holder)) -> LoadedModel:
    """The model this request runs on: one reference taken now, unaffected by later reloads."""
    model = holder.current
    if model is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no model is loaded (set RECSYS_FLOWADAM_ARTIFACT_DIR)")
    return model


async def require_admin(
    settings: Settings = Depends(get_settings),
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> None:
    """Admin endpoints: 404 when no token is configured (disabled), 401 without the right token."""
    if settings.admin_token is None or not settings.admin_token.get_secret_value():
        raise HTTPException(status.HTTP_404_NOT_FOUND, "admin endpoints are disabled (no admin token configured)")
    given = credentials.credentials if credentials is not None else ""
    if not secrets.compare_digest(given.encode(), settings.admin_token.get_secret_value().encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
