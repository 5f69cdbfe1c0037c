"""Rating predictions for user-item pairs."""

from __future__ import annotations

from typing import Any

import pydantic_core
from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import Response
from pydantic import TypeAdapter

from recsys_flowadam.serve.body import openapi_request_body, parse_body
from recsys_flowadam.serve.dependencies import get_model, get_settings
from recsys_flowadam.serve.schemas import ErrorResponse, PredictRequest, PredictResponse, UnknownIDsResponse
from recsys_flowadam.serve.settings import Settings
from recsys_flowadam.serve.state import LoadedModel

router = APIRouter(prefix="/v1", tags=["predict"])

_REQUEST = TypeAdapter(PredictRequest)


def _max_structure(max_pairs: int) -> int:
    """Twice the commas, '{' and '[' of the largest valid body (3 per pair: its object, the comma
    inside it, the comma before the next; plus the outer object, the list and the comma before
    "strict"). Bodies up to twice that still parse in ~15 ms and get the exact "N given" answer."""
    return 2 * (3 * max_pairs + 8)


def _json(content: Any) -> Response:
    # pydantic-core's serializer: about 3x faster than json.dumps for 10,000 small objects
    return Response(content=pydantic_core.to_json(content), media_type="application/json")


@router.post(
    "/predict",
    response_model=PredictResponse,
    summary="Predicted ratings for pairs of raw user/item IDs, in order",
    openapi_extra=openapi_request_body(_REQUEST, required=True),
    responses={
        404: {"model": UnknownIDsResponse, "description": "strict=true and some IDs are unknown (named in the detail)"},
        413: {"model": ErrorResponse, "description": "More pairs (or body bytes) than configured"},
        422: {"model": ErrorResponse, "description": "Malformed JSON or a field of the wrong type, length or range"},
        503: {"model": ErrorResponse, "description": "No model loaded"},
    },
)
async def predict(
    request: Request,
    model: LoadedModel = Depends(get_model),
    settings: Settings = Depends(get_settings),
) -> Response:
    # read here, not by FastAPI: the structure budget, strict JSON and big bodies off the event loop
    body = await parse_body(
        await request.body(), _REQUEST, max_structure=_max_structure(settings.max_pairs),
        too_large=f"too many pairs: the body holds more than a request of at most {settings.max_pairs} pairs can",
    )
    pairs = body.pairs
    if len(pairs) > settings.max_pairs:
        raise HTTPException(
            413,  # a number: Starlette renamed the constant (HTTP_413_CONTENT_TOO_LARGE) in 2025
            f"too many pairs: {len(pairs)} given, at most {settings.max_pairs} per request",
        )
    users = [p["user"] for p in pairs]
    items = [p["item"] for p in pairs]
    pred = model.scorer.predict(users, items)
    if body.strict and not (pred.known_user.all() and pred.known_item.all()):
        unknown_users = sorted({u for u, k in zip(users, pred.known_user.tolist()) if not k})
        unknown_items = sorted({i for i, k in zip(items, pred.known_item.tolist()) if not k})
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            {
                "message": f"{len(unknown_users)} unknown user ID(s) and {len(unknown_items)} unknown item ID(s)",
                "unknown_users": unknown_users,
                "unknown_items": unknown_items,
            },
        )
    # plain dicts serialised directly (the shape is PredictResponse): validating 10,000 response
    # objects again would cost more than the whole prediction
    out = [
        {"user": u, "item": i, "rating": r, "known_user": ku, "known_item": ki}
        for u, i, r, ku, ki in zip(users, items, pred.ratings.tolist(), pred.known_user.tolist(), pred.known_item.tolist())
    ]
    return _json({"predictions": out})
