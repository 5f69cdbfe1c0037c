"""The FastAPI application factory.

``uvicorn --factory recsys_flowadam.serve.app:create_app`` builds the app from
``RECSYS_FLOWADAM_*`` environment variables; every worker process calls the factory and so
loads (memory-maps) the artifact itself.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from recsys_flowadam import __version__
from recsys_flowadam.serve.routers import admin, health, model, predict, recommend
from recsys_flowadam.serve.settings import Settings
from recsys_flowadam.serve.state import ModelHolder


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Move everything alive after start-up (libraries, the model's ID tables) out of the
    # cyclic GC's reach: otherwise full collections triggered by a 10,000-pair request's
    # temporary objects rescan them all and add ~50 ms to a random request.
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service; loads ``settings.artifact_dir`` now if set (ArtifactError if broken)."""
    settings = settings if settings is not None else Settings()
    holder = ModelHolder(topk_threads=settings.topk_threads)
    if settings.artifact_dir is not None:
        holder.load(settings.artifact_dir)
    app = FastAPI(
        title="recsys-flowadam",
        version=__version__,
        description="Rating predictions, recommendations and similar items from a trained recsys-flowadam artifact.",
        lifespan=_lifespan,
        max_body_size=settings.max_body_bytes,  # 413 for larger bodies, chunked ones included
    )
    app.state.settings = settings
    app.state.holder = holder
    for module in (health, model, predict, recommend, admin):
        app.include_router(module.router)
    return app
