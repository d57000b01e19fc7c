"""POST /v1/feedback: a user's score of a completion this server (or another of its store) served.

The body names the completion by the "id" its response carried (cmpl-<request id>, chatcmpl-<request
id>) or by the bare request id, and gives either a score in [0, 1] or thumbs up (1.0) / down (0.0), with
an optional comment. The comment goes through the same moderation as a prompt before it is stored (PII
replaced when safety.pii_action redacts). The completion must be in the request log: a row the request
logger still holds in memory is flushed first, so feedback right after an answer finds it. The feedback
row copies the request's endpoint, deployment and model version (the monitor reads one table) and the
key that gave it; any inference key may give feedback on any completion.
"""

from __future__ import annotations

import asyncio
import re
from typing import Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmops.safety import moderate
from lmops.serve.protocol import APIError, error_responses

MAX_COMMENT_CHARS = 2000
FLUSH_TIMEOUT_S = 5.0
_ID = re.compile(r"^(?:cmpl-|chatcmpl-)?([0-9a-f]{1,64})$")


class FeedbackRequest(BaseModel):
    # exactly one of score and thumbs, said in the schema too (clients and fuzzers read it)
    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [
        {"required": ["score"], "properties": {"score": {"type": "number"}}},
        {"required": ["thumbs"], "properties": {"thumbs": {"enum": ["up", "down"]}}},
    ]})

    id: str = Field(..., min_length=1, max_length=80,
                    description="The completion's id (cmpl-..., chatcmpl-...) or its request id.")
    score: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False, description="0 (bad) to 1 (good).")
    thumbs: Literal["up", "down"] | None = Field(None, description="up: score 1, down: score 0.")
    comment: str | None = Field(None, max_length=MAX_COMMENT_CHARS)

    @model_validator(mode="after")
    def _one_score(self):
        if (self.score is None) == (self.thumbs is None):
            raise ValueError("give exactly one of score and thumbs")
        return self

    @property
    def value(self) -> float:
        return float(self.score) if self.score is not None else 1.0 if self.thumbs == "up" else 0.0


def install(app: FastAPI, server, store, logger, inference) -> None:
    """The route, on an app whose store holds the request log (logger: its RequestLogger, or None)."""
    counter = None
    if server.metrics_on:
        from prometheus_client import Counter

        counter = Counter("lmops:feedback", "Feedback received on completions, by deployment.", ["deployment"],
                          registry=server.metrics.registry)  # exposed as lmops:feedback_total

    def lookup(request_id: str):
        row = store.requests.get(request_id)
        if row is None and logger is not None and logger.pending:
            logger.flush(FLUSH_TIMEOUT_S)  # it may still be on its way to the store
            row = store.requests.get(request_id)
        return row

    @app.post("/v1/feedback", status_code=201, responses=error_responses(400, 401, 403, 404, 429))
    async def feedback(body: FeedbackRequest, request: Request, key=inference) -> dict:
        m = _ID.match(body.id.strip().lower())
        row = None if m is None else await asyncio.to_thread(lookup, m.group(1))
        if row is None or row.status_code >= 400:
            raise APIError(404, f"no completion with id '{body.id}' on this server", "not_found_error",
                           param="id", code="completion_not_found")
        comment = body.comment
        if comment is not None and server.moderation_on:
            comment = moderate(comment, server.cfg.safety, "input").text
        fb = await asyncio.to_thread(store.feedback.add, {
            "request_id": row.request_id, "key_id": getattr(key, "id", None), "endpoint": row.endpoint,
            "deployment": row.deployment, "model_version": row.model_version, "score": body.value,
            "comment": comment})
        if counter is not None:
            counter.labels(row.deployment or "").inc()
        return {"id": fb.id, "object": "feedback", "completion_id": body.id, "score": fb.score}
