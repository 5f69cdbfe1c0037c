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
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from threadpoolctl import threadpool_limits

from recsys_flowadam import __version__
from recsys_flowadam.serve.errors import validation_error_handler
from recsys_flowadam.serve.limits import BodySizeLimit
from recsys_flowadam.serve.routers import admin, health, model, predict, recommend
from recsys_flowadam.serve.settings import Settings
from recsys_flowadam.serve.state import ModelHolder


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # implicit's top-k scores a query against all items with one BLAS product. On a big catalogue
    # (100,000 items) OpenBLAS splits that product over its own pool (one thread per core by
    # default), whose threads then busy-wait for the next call: with several uvicorn workers
    # (and clients) on few cores they steal the CPU from the event loops and each other, costing
    # up to ~6x the CPU per request and second-long tail latency. Requests are served one at a time per
    # event loop, so each worker gets the BLAS threads its top-k may use (TOPK_THREADS; 0 = the
    # library's default), for the process's lifetime, restored at shutdown.
    threads = app.state.settings.topk_threads
    blas = threadpool_limits(limits=threads, user_api="blas") if threads > 0 else None
    # Move everything alive after start-up (libraries, the model's ID tables) out of the
    # cyclic GC's reach: otherwise full collections triggered by a 10,000-pair request's
    # temporary objects rescan them all and add ~50 ms to a random request.
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        if blas is not None:
            blas.restore_original_limits()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service; loads ``settings.artifact_dir`` now if set (ArtifactError if broken)."""
    settings = settings if settings is not None else Settings()
    holder = ModelHolder(topk_threads=settings.topk_threads)
    if settings.artifact_dir is not None:
        holder.load(settings.artifact_dir)
    # FastAPIOffline: FastAPI whose /docs and /redoc load their scripts and styles from files the
    # fastapi-offline package ships (served under /static-offline-docs), not from a CDN
    app = FastAPIOffline(
        title="recsys-flowadam",
        version=__version__,
        description="Rating predictions, recommendations and similar items from a trained recsys-flowadam artifact.",
        lifespan=_lifespan,
        exception_handlers={RequestValidationError: validation_error_handler},
    )
    # 413 for larger bodies while they stream in, chunked ones included (see limits.py)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.state.settings = settings
    app.state.holder = holder
    for module in (health, model, predict, recommend, admin):
        app.include_router(module.router)
    return app
