"""The request-body byte limit, enforced while the body streams in (ASGI middleware).

A declared ``Content-Length`` over the limit is refused before one byte of the body is read; a
body without one (chunked) is counted chunk by chunk as the app reads it and refused as soon as
the count passes the limit, so the worker never holds more than the limit plus one chunk of it.
Both answers are ``413`` with ``Connection: close``: the server stops reading the rest.

Plain ASGI rather than ``FastAPI(max_body_size=...)``, which only recent FastAPI releases have
(older ones silently ignore the keyword: no limit at all).
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """Raised by the limited ``receive`` once the body passes the limit; FastAPI answers it (413)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, too_large_message(max_bytes), headers={"Connection": "close"})


def too_large_message(max_bytes: int) -> str:
    return f"request body too large: more than {max_bytes} bytes (RECSYS_FLOWADAM_MAX_BODY_BYTES)"


class BodySizeLimit:
    """ASGI middleware: 413 for HTTP request bodies over ``max_bytes``, checked as they arrive."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _refuse(self.max_bytes, scope, receive, send)
            return
        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLarge:
            # only reached where no exception handler answered it (e.g. outside a route)
            if response_started:
                raise
            await _refuse(self.max_bytes, scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server itself refuses a malformed Content-Length
    return None


async def _refuse(max_bytes: int, scope: Scope, receive: Receive, send: Send) -> None:
    response = JSONResponse({"detail": too_large_message(max_bytes)}, status_code=413, headers={"Connection": "close"})
    await response(scope, receive, send)
