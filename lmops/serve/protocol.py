"""The HTTP protocol of the server: request bodies (pydantic models, so validation and the OpenAPI
document are one thing) and errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}},
FastAPI's own validation errors included (400, not 422: what OpenAI clients expect)."""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError,
                      ValidationInfo, ValidatorFunctionWrapHandler, field_validator)
from starlette.exceptions import HTTPException

from lmops.config import Config, ServeConfig

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


_TYPE_TAG = re.compile(r"str|int|float|bool|none|literal\[.*|function-.*|.*[\[-].*")  # union branches in error paths


def _field(loc: tuple) -> str | None:
    """An error location as a client reads it: messages[0].content, stop[1], prompt."""
    out = ""
    for p in loc:
        if p == "body" or isinstance(p, str) and _TYPE_TAG.fullmatch(p):
            continue
        out += f"[{p}]" if isinstance(p, int) else f".{p}" if out else str(p)
    return out or None


def error_from_validation(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 as OpenAI's 400, naming the first problem and its field."""
    errors = exc.errors()
    # the first problem, or rather one a validator explained (pydantic lists each union branch's failure)
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else {})
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON ({reason})", code="invalid_json")
    param = _field(first.get("loc", ()))
    msg = first.get("msg", "invalid request").removeprefix("Value error, ")
    given = first.get("input")
    if isinstance(given, str) and len(given) <= 40 and _printable(given) and first.get("type") != "missing":
        msg += f" (got {given!r})"
    return APIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error body: what every status but 200 carries."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """The `responses=` of a route: each status it can answer with, and what it means."""
    meaning = {400: "Invalid request: the field is named in error.param.", 401: "Missing, invalid or revoked API key.",
               403: "The key's role is too low.", 404: "No such model.", 413: "The body is over serve.max_body_bytes.",
               429: "Rate limited, or the queue is full: retry after Retry-After seconds.",
               500: "An internal error; error.message gives the request id.", 503: "Loading or shutting down."}
    return {status: {"model": ErrorBody, "description": meaning[status]} for status in statuses}


# ----------------------------------------------------------------------------- request bodies

MAX_TOP_K = 2**31 - 1  # a bound for the schema; a top_k at or above the vocabulary keeps every token
MAX_STOP = 4  # stop sequences, as OpenAI's
MAX_SEED = 2**53 - 1
MAX_STOP_CHARS = 256  # a stream holds back len(longest stop) - 1 characters: a long one would hold it all
SERVED_ROLES = ("system", "developer", "user", "assistant")  # serve.chat_roles' keys by default

_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _printable(text: str) -> bool:
    return _SURROGATE.search(text) is None


def _unicode(text: str) -> str:
    """JSON's \\ud800 escapes can spell lone UTF-16 surrogates, which are no text: no tokenizer takes them
    and no UTF-8 can say them (the error echoing one back could not even be written)."""
    if (m := _SURROGATE.search(text)) is not None:
        raise ValueError(f"holds a lone UTF-16 surrogate (U+{ord(m.group()):04X}) at character {m.start()}, "
                         "which is not Unicode text")
    return text


def _number(value: Any) -> Any:
    """JSON's numbers only: "5" and true are not numbers (pydantic's lax mode would take them), while
    5.0 is the integer 5 (as JSON Schema says; pydantic's strict mode would refuse it)."""
    if isinstance(value, (str, bool, bytes)):
        raise ValueError("must be a number")
    return value


Text = Annotated[str, AfterValidator(_unicode)]
TokenId = Annotated[int, Field(ge=0), BeforeValidator(_number)]  # the bound first: then it is in the schema


class _Body(BaseModel):
    # OpenAI clients send fields a small server need not know: ignored. Numbers are JSON's (_json_numbers),
    # booleans true and false only.
    model_config = ConfigDict(extra="ignore")

    @field_validator("*", mode="before")
    @classmethod
    def _json_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields[info.field_name]
        kinds = {a for a in getattr(field.annotation, "__args__", (field.annotation,))}
        if kinds & {int, float} and not kinds & {str, bool}:
            return _number(value)
        return value


class StreamOptions(_Body):
    include_usage: StrictBool = False


class SamplingFields(_Body):
    model: Text = Field(description="The model id, as /v1/models lists it.")
    max_tokens: int | None = Field(None, ge=0, description="Tokens to generate at most (at most "
                                   "serve.max_tokens_limit); the server's default if absent.")
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(-1, ge=-1, le=MAX_TOP_K, description="Extension, as vLLM's: keep the k most likely tokens; "
                       "-1 (or 0, or the vocabulary's size or more) keeps all.")
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported: send several requests instead.")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[Text, Field(max_length=MAX_STOP_CHARS)] | Annotated[
        list[Annotated[Text, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP)] | None = Field(
        None, description=f"Up to {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters; the output is cut "
        "before the first.")
    # at most 2^53 - 1, JSON's largest exact integer: a client's float can say it, and JavaScript's too
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Same seed, prompt and model: same output.")
    ignore_eos: StrictBool = Field(False, description="Extension, as vLLM's: generate past end-of-text, for benchmarks "
                             "that need outputs of a fixed length.")
    user: Text | None = None


PROMPT_SHAPES = ("give a string, a list of token ids, or a list of strings or of token-id lists (not an empty "
                 "list, nor ids mixed with those)")


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal[SERVED_ROLES] = Field(description="As serve.chat_roles serves them.")  # type: ignore[valid-type]
    content: Text | list[TextPart] | None = None


def key_share(max_batch: int, max_waiting: int) -> int:
    """Engine requests (a request's prompts each count) one API key may have running or waiting at once:
    the whole batch and half of the waiting queue, so a key that fans out a large batch always leaves the
    other half of the queue to the other keys."""
    return max_batch + math.ceil(max_waiting / 2)


def max_prompts(cfg: Config, auth: bool = True) -> int:
    """Prompts one request may hold: its key's share of the queue, and no more than the key's burst
    (each prompt counts as a request against its rate limit)."""
    share = key_share(cfg.serve.max_batch, cfg.serve.max_waiting)
    return min(share, cfg.auth.burst) if auth and cfg.auth.enabled else share


def request_models(max_tokens_limit: int, max_prompts: int) -> tuple[type[SamplingFields], type[SamplingFields]]:
    """The request bodies (completions, chat) of a server whose serve.max_tokens_limit is max_tokens_limit
    and which takes at most max_prompts prompts in one request: the limits are in the schema (so the
    OpenAPI document says what the server takes) and in the validation."""

    def limited(value: int | None) -> int | None:
        if value is not None and not 0 <= value <= max_tokens_limit:
            raise ValueError(f"{value}; it must be between 0 and {max_tokens_limit} (serve.max_tokens_limit)")
        return value

    bound = {"minimum": 0, "maximum": max_tokens_limit}
    tokens = Annotated[int | None, AfterValidator(limited)]
    what = f"Tokens to generate at most, 0 to {max_tokens_limit}; the server's default if absent."
    many = Field(min_length=1, max_length=max_prompts)

    class CompletionRequest(SamplingFields):
        max_tokens: tokens = Field(None, description=what, json_schema_extra=bound)
        prompt: Text | Annotated[list[TokenId], Field(min_length=1)] | Annotated[list[Text], many] | \
            Annotated[list[list[TokenId]], many] = Field(description=f"Text or token ids, or a list of up to "
                                                         f"{max_prompts} texts or token-id lists (a choice each).")
        logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                     description="Log-probability of each token and of this many most likely ones.")
        echo: StrictBool = Field(False, description="Return the prompt before the completion, with its logprobs "
                                 "when logprobs is set; with max_tokens 0 this scores the prompt.")

        @field_validator("prompt", mode="wrap")
        @classmethod
        def _one_shape(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
            """One message for a prompt of no accepted shape, rather than one per branch of the union; a
            text that is no Unicode says so, a list too long says how long it may be."""
            try:
                return handler(value)
            except ValidationError as err:
                surrogate = next((e for e in err.errors() if "surrogate" in e["msg"]), None)
                if surrogate is not None:
                    raise ValueError(surrogate["msg"].removeprefix("Value error, ")) from None
                if isinstance(value, list) and value and not isinstance(value[0], int) and len(value) > max_prompts:
                    raise ValueError(f"{len(value)} prompts; this server takes at most {max_prompts} in one request "
                                     "(serve.max_batch + half of serve.max_waiting, and auth.burst)") from None
                raise ValueError(PROMPT_SHAPES) from None

    class ChatCompletionRequest(SamplingFields):
        messages: list[ChatMessage] = Field(min_length=1)
        max_tokens: tokens = Field(None, description=what, json_schema_extra=bound)
        max_completion_tokens: tokens = Field(None, description="OpenAI's newer name for max_tokens.",
                                              json_schema_extra=bound)
        logprobs: StrictBool = False
        top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    return CompletionRequest, ChatCompletionRequest


# the bodies of a server with the default config (the routes get those of theirs, from create_app)
CompletionRequest, ChatCompletionRequest = request_models(ServeConfig().max_tokens_limit, max_prompts(Config()))
