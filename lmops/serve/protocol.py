"""The HTTP protocol of the server: request bodies (pydantic models, so validation and the OpenAPI
document are one thing) and errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}},
FastAPI's own validation errors included (400, not 422: what OpenAI clients expect)."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

MAX_LOGPROBS = 5  # as OpenAI's completions API


class APIError(Exception):
    """An error the client gets as OpenAI's error body, with its HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error",
          503: "service_unavailable"}


def error_from_http(exc: HTTPException) -> APIError:
    """A Starlette/FastAPI HTTPException (no such route, an unreadable body, lmops.serve.auth's AuthError)
    as an APIError; a detail already in OpenAI's shape is kept."""
    status, detail, headers = exc.status_code, exc.detail, dict(exc.headers or {})
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    if isinstance(detail, dict) and isinstance(detail.get("error"), dict):
        e = detail["error"]
        return APIError(status, str(e.get("message")), e.get("type") or kind, e.get("param"), e.get("code"), headers)
    message = detail if isinstance(detail, str) else json.dumps(detail)
    if message == "There was an error parsing the body":  # FastAPI's words for a body that is not UTF-8
        message, code = "the request body is not valid UTF-8 JSON", "invalid_json"
    else:
        code = {404: "not_found", 405: "method_not_allowed"}.get(status)
    return APIError(status, message, kind, code=code, headers=headers)


_TYPE_TAG = re.compile(r"str|int|float|bool|none|.*[\[-].*")  # pydantic names a union's branches in error paths


def error_from_validation(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 as OpenAI's 400, naming the first problem and its field."""
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON ({reason})", code="invalid_json")
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and not _TYPE_TAG.fullmatch(str(p))) or None
    msg = first.get("msg", "invalid request")
    return APIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


# ----------------------------------------------------------------------------- request bodies

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields a small server need not know


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    model: str = Field(description="The model id, as /v1/models lists it.")
    max_tokens: int | None = Field(None, description="Tokens to generate at most; the server's default if absent.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, description="Extension, as vLLM's: keep the k most likely tokens; -1 keeps all.")
    n: int = Field(1, description="Only 1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="Up to 4 strings; the output is cut before the first.")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Same seed, prompt and model: same output.")
    ignore_eos: bool = Field(False, description="Extension, as vLLM's: generate past end-of-text, for benchmarks "
                             "that need outputs of a fixed length.")
    user: str | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[int | str | list[int]] = Field(
        description="Text or token ids, or a list of texts or of token-id lists (one choice per prompt).")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="Log-probability of each token and of this many most likely ones.")
    echo: bool = Field(False, description="Return the prompt before the completion, with its logprobs when "
                       "logprobs is set; with max_tokens 0 this scores the prompt.")


class ChatMessage(_Body):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, description="OpenAI's newer name for max_tokens.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
