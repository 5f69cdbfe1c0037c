"""The 422 answer: FastAPI's error list, with the echoed input made safe to encode and bounded.

FastAPI's default handler echoes each error's ``input`` as it is. A non-finite number there (a
``1e999`` in a body parses to ``inf``) makes strict JSON encoding fail, so the client got a 500;
and a wrong field holding a 7 MB list was echoed whole, costing seconds of encoding on the event
loop. Here each echoed value is copied with non-finite numbers written as the strings ``"NaN"``,
``"Infinity"``, ``"-Infinity"``, long strings cut and large or deep containers replaced by a short
description; at most :data:`MAX_ERRORS` errors are listed.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

MAX_ERRORS = 100
MAX_TEXT = 200  # characters of an echoed string
MAX_ITEMS = 20  # elements of an echoed list or object
MAX_DEPTH = 3


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with ``{"detail": [errors]}``, like FastAPI's handler, encodable as strict JSON."""
    detail = [safe_error(err) for err in exc.errors()[:MAX_ERRORS]]
    return JSONResponse({"detail": detail}, status_code=422)


def safe_error(err: dict[str, Any]) -> dict[str, Any]:
    """One validation error with its ``loc`` as a list and every other value :func:`bounded`."""
    return {key: list(value) if key == "loc" else bounded(value) for key, value in err.items()}


def bounded(value: Any, depth: int = 0) -> Any:
    """``value`` as plain JSON types, small and finite (see the module docstring)."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value[: 4 * MAX_TEXT]).decode("utf-8", "replace")
    if isinstance(value, str):
        return value if len(value) <= MAX_TEXT else value[:MAX_TEXT] + "..."
    if isinstance(value, dict):
        if len(value) > MAX_ITEMS or depth >= MAX_DEPTH:
            return f"<object with {len(value)} keys>"
        return {bounded(str(k)): bounded(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_ITEMS or depth >= MAX_DEPTH:
            return f"<array of {len(value)} items>"
        return [bounded(v, depth + 1) for v in value]
    return bounded(str(value))
