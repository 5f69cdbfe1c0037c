"""JSON request bodies: strict parsing, a structure budget, and big bodies parsed off the event loop.

FastAPI's own body handling runs ``json.loads`` and validation inside the event loop and accepts
``NaN``/``Infinity`` tokens. One 8 MB body of 250,000 short pairs then costs ~200 ms of CPU with
the GIL held (``/health`` on the same worker waits that long), and a non-finite value echoed in the
422 answer breaks strict JSON encoding (a 500). So the endpoints that take a body read its raw
bytes (the byte limit is enforced while they stream in: :mod:`.limits`) and call
:func:`parse_body`, which

* refuses a body whose JSON structure (commas, ``{`` and ``[`` outside strings) is over the
  endpoint's budget, a small multiple of its largest valid request's (413), before any Python
  object is built;
* parses strict JSON: ``NaN``, ``Infinity`` and ``-Infinity`` are not JSON and get the same 422
  ``json_invalid`` error as any other syntax error;
* validates with pydantic, errors in FastAPI's 422 format (``loc`` starting with ``"body"``);
* does all of this in a worker thread for bodies over :data:`INLINE_BYTES`, so the event loop
  keeps answering other requests (the structure count is a Python loop, which hands the GIL back
  every few milliseconds; parsing a body within the budget holds it for ~15-20 ms at most).
"""

from __future__ import annotations

import re
import threading
from typing import Any, TypeVar

import pydantic_core
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool

T = TypeVar("T")

# Bodies up to this size are parsed on the event loop: a thread hop costs more than parsing them.
INLINE_BYTES = 64 * 1024
# One big body at a time per process: parsing holds the GIL anyway, and with several parsing
# threads the event loop waits behind all of them for its turn (/health's p99 about doubled).
_BIG_BODY = threading.Lock()

# One structural byte (',', '{' or '[') and everything after it up to the next one outside a
# string; strings (escapes included) are matched whole, so the separators inside them don't count.
# An unterminated string runs to the end of the body: a string match never fails, so nothing
# backtracks (a failing match retried at every later quote would make the scan quadratic).
_REST = rb'(?:"[^"\\]*(?:\\(?:.|\Z)[^"\\]*)*(?:"|\Z)|[^",{\[])*'
_SEGMENT = re.compile(rb"[,{\[]" + _REST, re.DOTALL)
_LEADING = re.compile(_REST, re.DOTALL)  # what comes before the first structural byte
_POSITION = re.compile(r"at line (\d+) column (\d+)$")


def structure_exceeds(raw: bytes, limit: int) -> bool:
    """Whether ``raw`` holds more than ``limit`` commas, ``{`` and ``[`` outside JSON strings.

    Every JSON value past the first in an array or object follows a comma, so this count bounds
    the number of values a parser would build. The bytes counted anywhere give an upper bound
    in a few milliseconds; only when that is over ``limit`` are strings skipped exactly, stopping
    as soon as the limit is passed (a Python loop, so other threads get the GIL meanwhile).
    """
    if raw.count(b",") + raw.count(b"{") + raw.count(b"[") <= limit:
        return False
    for count, _ in enumerate(_SEGMENT.finditer(raw, _LEADING.match(raw).end()), 1):
        if count > limit:
            return True
    return False


def parse_json(raw: bytes, adapter: TypeAdapter[T], *, max_structure: int, too_large: str) -> T:
    """Parse and validate ``raw`` (see the module docstring); raises the 413/422 HTTP errors."""
    if structure_exceeds(raw, max_structure):
        raise HTTPException(413, too_large)
    if b"NaN" in raw or b"Infinity" in raw:
        # pydantic-core's JSON validator accepts these tokens; its strict parser is a second pass
        # over the body, so it runs only when the words occur at all (inside strings they are fine)
        try:
            pydantic_core.from_json(raw, allow_inf_nan=False)
        except ValueError as exc:
            raise RequestValidationError([_json_invalid(raw, exc)], body=None) from None
    try:
        return adapter.validate_json(raw)  # one pass: parse and validate
    except ValidationError as exc:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in exc.errors(include_url=False)]
        raise RequestValidationError(errors, body=None) from None


async def parse_body(raw: bytes, adapter: TypeAdapter[T], *, max_structure: int, too_large: str) -> T:
    """:func:`parse_json`, in a worker thread when ``raw`` is larger than :data:`INLINE_BYTES`."""
    if len(raw) <= INLINE_BYTES:
        return parse_json(raw, adapter, max_structure=max_structure, too_large=too_large)
    return await run_in_threadpool(_parse_big, raw, adapter, max_structure, too_large)


def _parse_big(raw: bytes, adapter: TypeAdapter[T], max_structure: int, too_large: str) -> T:
    with _BIG_BODY:
        return parse_json(raw, adapter, max_structure=max_structure, too_large=too_large)


def _json_invalid(raw: bytes, exc: ValueError) -> dict[str, Any]:
    """A syntax error in pydantic's ``json_invalid`` shape, echoing a readable excerpt of the body."""
    return {
        "type": "json_invalid",
        "loc": ("body",),
        "msg": f"Invalid JSON: {exc}{_non_finite_hint(raw, str(exc))}",
        "input": raw[:200].decode("utf-8", "replace"),
        "ctx": {"error": str(exc)},
    }


def _non_finite_hint(raw: bytes, error: str) -> str:
    """A note when the parser stopped at NaN or Infinity, which some encoders write but JSON lacks."""
    where = _POSITION.search(error)
    if where is None:
        return ""
    line, column = int(where[1]), int(where[2])
    lines = raw.split(b"\n", line)
    if line > len(lines) or column < 1:
        return ""
    window = lines[line - 1][max(column - 2, 0) : column + 8]  # the column is 1-based, maybe past a '-'
    if b"NaN" in window or b"Infinity" in window:
        return " (NaN and Infinity are not JSON numbers)"
    return ""


def openapi_request_body(adapter: TypeAdapter[Any], *, required: bool) -> dict[str, Any]:
    """``openapi_extra`` documenting a JSON body that an endpoint reads itself.

    The schema's ``$defs`` are inlined: an OpenAPI requestBody cannot refer to ``#/$defs``.
    """
    schema = adapter.json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return {"requestBody": {"required": required, "content": {"application/json": {"schema": resolve(schema)}}}}
