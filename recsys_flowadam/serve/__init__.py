"""The HTTP prediction service (FastAPI) over a trained artifact.

``create_app`` is the application factory; ``recsys-flowadam serve DIR`` runs it with uvicorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from recsys_flowadam.serve.settings import Settings

__all__ = ["create_app"]


def create_app(settings: "Settings | None" = None) -> "FastAPI":
    """Build the FastAPI app (see :func:`recsys_flowadam.serve.app.create_app`)."""
    from recsys_flowadam.serve.app import create_app as _create_app

    return _create_app(settings)


def __getattr__(name: str) -> Any:  # pragma: no cover - convenience for `from ... import Settings`
    if name == "Settings":
        from recsys_flowadam.serve.settings import Settings

        return Settings
    raise AttributeError(name)
