"""ASGI middleware around the app: the request log (outermost) and the body-size limit."""

from __future__ import annotations

import asyncio
import concurrent.futures
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
STREAM_END = b"data: [DONE]\n\n"  # the last event of a stream


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
    """A request-log row per inference request, whatever its status. Handlers fill the row in through
    request.scope["lmops.row"].

    With `durable` (RequestLogger.log_durably) a response's last bytes wait until its row is in the
    journal on disk: the last body message, or a stream's "data: [DONE]" chunk (after which a client
    has its whole answer). A request whose response never got that far (the client left, the server
    failed) is logged when it ends, without waiting."""

    def __init__(self, app: ASGIApp, write: Callable[[dict], Any],
                 durable: Callable[[dict], concurrent.futures.Future | None] | None = None):
        self.app, self.write, self.durable = app, write, durable

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in INFERENCE_PATHS:
            return await self.app(scope, receive, send)
        row: dict[str, Any] = {"ts": utcnow(), "request_id": uuid.uuid4().hex, "route": scope["path"]}
        scope["lmops.row"] = row
        start = time.perf_counter()
        logged = False

        def record() -> dict:
            row.setdefault("status_code", 500)
            row["latency_s"] = time.perf_counter() - start
            return {k: v for k, v in row.items() if k in REQUEST_FIELDS}

        async def send_logged(msg: Message) -> None:
            nonlocal logged
            if msg["type"] == "http.response.start":
                row["status_code"] = msg["status"]
            elif (msg["type"] == "http.response.body" and not logged and self.durable is not None
                  and (not msg.get("more_body") or msg.get("body", b"").endswith(STREAM_END))):
                logged = True
                try:
                    future = self.durable(record())
                except Exception:  # the log must never fail a request
                    log.exception("request log: could not queue a row")
                    future = None
                if future is not None:
                    try:
                        await asyncio.wrap_future(future)
                    except OSError:
                        pass  # the journal logged it; the row is still on its way to the store
            await send(msg)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            if not logged:
                try:
                    self.write(record())
                except Exception:  # the log must never fail a request
                    log.exception("request log: could not queue a row")
