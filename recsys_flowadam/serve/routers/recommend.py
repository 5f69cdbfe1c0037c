"""Top-k recommendations for a user and similar items for an item (implicit's top-k)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Path, Query, status

from recsys_flowadam.serve.dependencies import get_model
from recsys_flowadam.serve.schemas import ErrorResponse, RecommendationsResponse, SimilarItemsResponse
from recsys_flowadam.serve.scorer import UnknownIDError
from recsys_flowadam.serve.settings import MAX_ID_LENGTH, MAX_K
from recsys_flowadam.serve.state import LoadedModel

router = APIRouter(prefix="/v1", tags=["recommend"])

_K = Query(10, ge=1, le=MAX_K, description=f"How many items (1..{MAX_K}); fewer if fewer are available")
_errors = {404: {"model": ErrorResponse, "description": "Unknown ID"}, 503: {"model": ErrorResponse}}


@router.get(
    "/users/{user}/recommendations",
    response_model=RecommendationsResponse,
    summary="Top-k items for a user by predicted rating, biases included",
    responses=_errors,
)
async def recommendations(
    user: str = Path(min_length=1, max_length=MAX_ID_LENGTH, description="Raw user ID"),
    k: int = _K,
    exclude_rated: bool = Query(True, description="Leave out the items the user rated in training"),
    model: LoadedModel = Depends(get_model),
) -> RecommendationsResponse:
    scorer = model.scorer
    try:
        ids, ratings = scorer.recommend(user, k, exclude_rated=exclude_rated)
    except UnknownIDError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    items = [
        {"item": scorer.item_ids[i], "rating": r, "title": scorer.title(i)}
        for i, r in zip(ids.tolist(), ratings.tolist())
    ]
    return RecommendationsResponse(user=user, k=k, exclude_rated=exclude_rated, items=items)


@router.get(
    "/items/{item}/similar",
    response_model=SimilarItemsResponse,
    summary="Nearest items by cosine similarity of item factors",
    responses=_errors,
)
async def similar_items(
    item: str = Path(min_length=1, max_length=MAX_ID_LENGTH, description="Raw item ID"),
    k: int = _K,
    model: LoadedModel = Depends(get_model),
) -> SimilarItemsResponse:
    scorer = model.scorer
    try:
        ids, sims = scorer.similar(item, k)
    except UnknownIDError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    items = [
        {"item": scorer.item_ids[i], "similarity": s, "title": scorer.title(i)}
        for i, s in zip(ids.tolist(), sims.tolist())
    ]
    return SimilarItemsResponse(item=item, k=k, items=items)
