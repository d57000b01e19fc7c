"""ASGI middleware around the app: the request log (outermost) and the body-size limit."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmops.serve.protocol import APIError
from lmops.store import REQUEST_FIELDS, utcnow

log = logging.getLogger("lmops.serve")

INFERENCE_PATHS = ("/v1/completions", "/v1/chat/completions")  # what the request log records


class BodyLimit:
    """413 for a body over max_bytes: at once from Content-Length, else while a chunked body comes in.
    Bodies are small JSON, so it is read here whole and replayed to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_error: Callable[[APIError], None]):
        self.app, self.max_bytes, self.on_error = app, max_bytes, on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        too_large = length.isdigit() and int(length) > self.max_bytes
        chunks, size, more = [], 0, True
        while more and not too_large:
            msg = await receive()
            if msg["type"] != "http.request":
                break  # the client left; the app sees that from receive
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more, too_large = msg.get("more_body", False), size > self.max_bytes
        if too_large:
            err = APIError(413, f"the request body is over {self.max_bytes} bytes (serve.max_body_bytes)",
                           code="request_too_large")
            self.on_error(err)
            response = JSONResponse(err.body(), status_code=413, headers={"Connection": "close"})
            return await response(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class RequestLog:
    """A request-log row per inference request, written when its response has ended (a stream's too),
    whatever its status. Handlers fill the row in through request.scope["lmops.row"]."""

    def __init__(self, app: ASGIApp, write: Callable[[dict], Any]):
        self.app, self.write = app, write

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in INFERENCE_PATHS:
            return await self.app(scope, receive, send)
        row: dict[str, Any] = {"ts": utcnow(), "request_id": uuid.uuid4().hex, "endpoint": scope["path"]}
        scope["lmops.row"] = row
        start = time.perf_counter()

        async def send_status(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                row["status_code"] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            row.setdefault("status_code", 500)
            row["latency_s"] = time.perf_counter() - start
            try:
                self.write({k: v for k, v in row.items() if k in REQUEST_FIELDS})
            except Exception:  # the log must never fail a request
                log.exception("request log: could not queue a row")
