"""The OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models, probes, metrics.

HTTP lives here; the engine (engine.py) sees only token ids. A request passes, outermost first: the
request log (one row per inference request, whatever became of it) -> a body-size limit (413 before any
parsing) -> FastAPI's validation -> the API key (lmops.serve.auth: 401/403/429) -> moderation of the
prompt -> the engine -> stop sequences and moderation of the completion -> the client, whole or as
server-sent events.

Choices a reader could make otherwise:
- Stop sequences are matched on text, not tokens: a stop string can end inside a BPE token, and clients
  expect the text cut exactly there (finish_reason "stop").
- A stream holds text back: the last len(longest stop) - 1 characters, which may be the start of a stop
  sequence, and, when completions are moderated, serve.moderation_holdback_chars more, because moderation
  reads all the text so far and PII shorter than that is redacted before any of it is sent. A moderated
  stream also releases text in steps of serve.moderation_interval_chars rather than at every token, as
  each moderation reads the whole completion so far.
- A completion that trips a "block" rule ends with finish_reason "content_filter" (Azure OpenAI's), its
  text cut before the part that tripped it; a prompt that does is refused (400, code content_blocked).
- A completion also ends ("length") where prompt + completion fill the model's context (block_size), even
  before max_tokens: refusing every request whose max_tokens might not fit would refuse most of them.
- n > 1 is refused (400): each choice would be a separate engine request anyway. A list of prompts is
  served, one choice per prompt, all submitted at once so they batch.
- Text is decoded incrementally (Detokenizer): a character split across byte-level BPE tokens never
  reaches a client broken in two.
- Errors always have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, FastAPI's own
  validation errors included (400, not 422: what OpenAI clients expect).
- Serving an alias (NAME@champion), the server follows it: when it moves, the new version is loaded
  beside the old one and swapped into the engine, which lets running requests finish on the old model.
  A request queued at that moment runs on the new model; if the new version's tokenizer differs, that
  request was tokenized with the old one (the registry's versions of one workspace share a tokenizer
  unless you retrained it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tokenizers import Tokenizer

from lmops.config import Config, SafetyConfig
from lmops.errors import LmopsError
from lmops.model import GPT
from lmops.safety import STRENGTH, Moderation, moderate
from lmops.serve.engine import Engine, EngineStopped, QueueFull, RequestHandle, SamplingParams, TokenEvent
from lmops.store import REQUEST_FIELDS, utcnow
from lmops.tokenizer import EOT, load_tokenizer

log = logging.getLogger("lmops.serve")

INFERENCE_PATHS = ("/v1/completions", "/v1/chat/completions")  # what the request log records
MAX_LOGPROBS = 5  # as OpenAI's completions API
RETRY_AFTER_QUEUE_S = 1  # a small model drains a full batch in about a second
ENGINE_DRAIN_S = 2.0  # at shutdown, after the HTTP side waited: what is left in the engine has no client
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of SSE


# ----------------------------------------------------------------------------- errors

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


class _Sampling(_Body):
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


class CompletionRequest(_Sampling):
    prompt: str | list[int | str | list[int]] = Field(
        description="Text or token ids, or a list of texts or of token-id lists (one choice per prompt).")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="Log-probability of each token and of this many most likely ones.")
    echo: bool = Field(False, description="Return the prompt before the completion, with its logprobs when "
                       "logprobs is set; with max_tokens 0 this scores the prompt.")


class ChatMessage(_Body):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, description="OpenAI's newer name for max_tokens.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


# ----------------------------------------------------------------------------- the model and where it comes from

@dataclass(frozen=True)
class ServedModel:
    """A loaded model with its tokenizer, and the name and version clients and the request log see."""

    model: GPT
    tokenizer: Tokenizer
    name: str
    version: str
    eos_id: int | None  # generation stops there; also the start of an empty prompt

    @property
    def fingerprint(self) -> str:
        """OpenAI's system_fingerprint: which weights answered."""
        return f"{self.name}-v{self.version}"


_NUMBER = re.compile(r"v?\d+")


class ModelSource:
    """The model a reference names: a registry version (NAME@alias, NAME@3, 3, champion, models:/...) or a
    local path (an lmops checkpoint or the run folder holding one, or a Hugging Face Llama folder).

    `version()` says which version the reference names now; only an alias moves, and `movable` says whether
    it is one. `load(version)` reads that version and the tokenizer saved beside it.
    """

    def __init__(self, ws, cfg: Config, ref: str):
        self.ws, self.cfg, self.ref = ws, cfg, ref
        path = Path(ref).expanduser()
        self.path = path if path.exists() else None
        if self.path is not None:
            self.movable = False
            self.name = cfg.serve.served_model_name or (path if path.is_dir() else path.parent).name
            return
        if ws is None or ref.endswith(".safetensors") or "/" in ref and not ref.startswith("models:/"):
            raise LmopsError(f"{ref}: no such file or folder; give a checkpoint, a run folder, a Hugging Face folder "
                             "or a registry reference such as NAME@champion")
        from lmops import registry

        mv = registry.resolve(ws, cfg, ref)  # a typo fails now, with the reason
        self.registered = mv.name
        self.name = cfg.serve.served_model_name or mv.name
        selector = re.split(r"[@/]", ref)[-1].strip()
        self.movable = not _NUMBER.fullmatch(selector)

    def version(self) -> str:
        """The version the reference names now: a registry query (the file's hash for a path)."""
        if self.path is not None:
            return self._file_version()
        from lmops import registry

        return str(registry.resolve(self.ws, self.cfg, self.ref).version)

    def load(self, version: str | None = None) -> ServedModel:
        from lmops.checkpoint import Checkpoint
        from lmops.train import resolve_device

        device = resolve_device(self.cfg.train.device)
        if self.path is None:
            from lmops import registry

            version = version or self.version()
            ckpt = Checkpoint(registry.download_checkpoint(self.ws, self.cfg, f"{self.registered}@{version}"))
            model, folder = ckpt.model(), ckpt.path.parent
        else:
            p = self.path
            if p.is_dir() and (p / "config.json").is_file() and not (p / "ckpt.safetensors").is_file():
                from lmops.hf import import_hf

                model, folder = import_hf(p), p
            else:
                ckpt = Checkpoint(p)
                model, folder = ckpt.model(), ckpt.path.parent
            version = self._file_version()
        tok = load_tokenizer(folder)
        return ServedModel(model.to(device).eval(), tok, self.name, version, _eos_id(tok, folder))

    def _file_version(self) -> str:
        from lmops.tracking import file_sha256

        p = self.path
        if p.is_dir():
            p = p / "ckpt.safetensors" if (p / "ckpt.safetensors").is_file() else p / "model.safetensors"
        return file_sha256(p)[:12] if p.is_file() else "local"


def _eos_id(tok: Tokenizer, folder: Path) -> int | None:
    """End of text: lmops's <|endoftext|>, else the eos_token_id of a Hugging Face config.json."""
    if (eot := tok.token_to_id(EOT)) is not None:
        return eot
    try:
        eos = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError):
        return None
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return eos if isinstance(eos, int) else None


# ----------------------------------------------------------------------------- text

class Detokenizer:
    """Token ids -> text, a piece per token, never a piece ending in half a character.

    Byte-level BPE can split one character's UTF-8 bytes across tokens, and decoding those alone gives
    U+FFFD. So each new token is decoded together with a few tokens before it, and text is released only
    once it no longer ends in U+FFFD (as vLLM and Hugging Face's TextStreamer do). The context also keeps
    the spaces that some decoders drop at the start of a sequence.
    """

    def __init__(self, tokenizer: Tokenizer, context: list[int] | None = None):
        self.tok = tokenizer
        self.ids: list[int] = list(context or [])
        self.prefix = max(0, len(self.ids) - 5)  # first token decoded with the new ones, for context
        self.read = len(self.ids)  # tokens whose text was released

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def add(self, token_id: int) -> str:
        """The text token_id completes ('' while a character is unfinished)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        """What is left at the end, broken characters included (the model did write them)."""
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):]


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """A token as logprobs show it: its text alone (U+FFFD for part of a character)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_turns(messages: list[ChatMessage], roles: dict[str, str]) -> list[tuple[str, str]]:
    """(label, content) per message; the content of text parts joined."""
    turns = []
    for i, m in enumerate(messages):
        if m.role not in roles:
            raise APIError(400, f"messages[{i}].role '{m.role}' is not served; use one of {', '.join(roles)} "
                           "(serve.chat_roles)", param=f"messages.{i}.role", code="invalid_value")
        content = m.content
        if isinstance(content, list):
            if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are served",
                               param=f"messages.{i}.content", code="invalid_value")
            content = "".join(p["text"] for p in content)
        turns.append((roles[m.role], content or ""))
    return turns


def render_chat(turns: list[tuple[str, str]], assistant: str) -> str:
    """A transcript a model trained on plain text can continue: 'Label: content' lines, then 'Assistant:'."""
    return "".join(f"{label}: {content}\n" for label, content in turns) + f"{assistant}:"


# ----------------------------------------------------------------------------- metrics

# vLLM's buckets, with smaller ones added: a small model on a CPU answers in milliseconds.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)


class Metrics:
    """Prometheus metrics, named as vLLM's where they mean the same, in a registry of this app's own
    (several apps in one process, as in the tests, must not share counters)."""

    def __init__(self, stats: Callable[[], tuple[int, int]]):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("lmops:time_to_first_token_seconds", "From arrival at the engine to the first "
                              "token.", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("lmops:inter_token_latency_seconds", "Between consecutive output tokens, as the "
                             "server receives them.", buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("lmops:e2e_request_latency_seconds", "From arrival at the engine to the last "
                             "token.", buckets=E2E_BUCKETS, registry=r)
        self.queue = Histogram("lmops:request_queue_time_seconds", "Waiting for a batch slot.",
                               buckets=TTFT_BUCKETS, registry=r)
        running = Gauge("lmops:num_requests_running", "Requests in the running batch.", registry=r)
        waiting = Gauge("lmops:num_requests_waiting", "Requests waiting for a batch slot.", registry=r)
        running.set_function(lambda: stats()[0])
        waiting.set_function(lambda: stats()[1])
        self.prompt_tokens = Counter("lmops:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("lmops:generation_tokens", "Tokens generated.", registry=r)
        self.success = Counter("lmops:request_success", "Engine requests finished, by why.", ["finished_reason"],
                               registry=r)
        self.errors = Counter("lmops:request_errors", "Requests answered with an error, by its code.", ["reason"],
                              registry=r)
        self.moderation = Counter("lmops:moderation", "Moderation rules that found something.",
                                  ["rule", "action", "direction"], registry=r)
        self.reloads = Counter("lmops:model_reloads", "Swaps to the version a followed alias moved to.",
                               ["result"], registry=r)

    def moderated(self, m: Moderation, cfg: SafetyConfig, direction: str) -> None:
        actions = {"pii": cfg.pii_action, "blocklist": cfg.blocklist_action, "injection": cfg.injection_action}
        for rule in m.hits:
            self.moderation.labels(rule, actions.get(rule, m.action), direction).inc()

    def finished(self, h: RequestHandle, gaps: list[float]) -> None:
        """A finished (or abandoned) engine request's timings and tokens."""
        if h.queued_at is not None:
            for value, metric in ((h.started_at, self.queue), (h.first_token_at, self.ttft),
                                  (h.finished_at, self.e2e)):
                if value is not None:
                    metric.observe(max(0.0, value - h.queued_at))
        for gap in gaps:
            self.itl.observe(gap)
        self.prompt_tokens.inc(h.prompt_tokens)
        self.generation_tokens.inc(h.completion_tokens)


# ----------------------------------------------------------------------------- one choice on its way out

@dataclass
class Piece:
    """Text ready to send, with the token events it came from and where each token's text starts."""

    text: str
    events: list[TokenEvent]
    offsets: list[int]


@dataclass
class Choice:
    """One engine request's output on its way to the client: token events in, releasable text out.

    In order: incremental decoding; stop sequences (cut the text, cancel the request); moderation of all
    the text so far (block ends the choice with "content_filter", redact replaces PII); then text that a
    later token could still change is held back (module docstring).
    """

    handle: RequestHandle | _Done
    detok: Detokenizer
    stops: list[str]
    moderate: Callable[[str], Moderation] | None
    holdback: int
    lstrip: bool = False  # chat: drop the space a model writes after "Assistant:"
    every: int = 1  # when moderated: release text once at least this many characters can go
    raw: str = ""  # decoded text so far, cut at a stop sequence
    sent: str = ""  # text released so far (moderated)
    tokens: int = 0
    finish_reason: str | None = None
    moderation: Moderation | None = None  # the last verdict on the whole text
    gaps: list[float] = field(default_factory=list)  # inter-token latencies

    async def pieces(self) -> AsyncIterator[Piece]:
        longest = max(map(len, self.stops), default=0)
        events: list[TokenEvent] = []
        offsets: list[int] = []
        last = None
        try:
            async for batch in self.handle.batches():  # the tokens that arrived since the last look
                now = time.perf_counter()
                # tokens that arrive together share the wait since the last ones evenly (the first
                # token has no gap before it)
                if last is None:
                    self.gaps.extend([0.0] * (len(batch) - 1))
                else:
                    self.gaps.extend([(now - last) / len(batch)] * len(batch))
                last = now
                stopped = False
                for ev in batch:  # token by token up to a stop sequence: what follows it is dropped
                    self.tokens += 1
                    events.append(ev)
                    offsets.append(len(self.raw))
                    start = max(0, len(self.raw) - longest + 1)
                    self.raw += self.detok.add(ev.token_id)
                    if stopped := self._cut_at_stop(start):
                        break
                if stopped:
                    break
                text = self._release(final=False)
                if self.finish_reason == "content_filter":
                    break
                if text or events[-1].logprob is not None:
                    yield Piece(text, events, offsets)
                    events, offsets = [], []
            else:
                start = max(0, len(self.raw) - longest + 1)
                self.raw += self.detok.flush()
                if not self._cut_at_stop(start):
                    self.finish_reason = self.handle.finish_reason
            text = self._release(final=True)
            if text or events:
                yield Piece(text, events, offsets)
        finally:
            self.handle.cancel()  # a stop sequence, the content filter, or a client that left; else a no-op

    def _cut_at_stop(self, start: int) -> bool:
        found = [i for i in (self.raw.find(s, start) for s in self.stops) if i != -1]
        if found:
            self.raw = self.raw[:min(found)]
            self.finish_reason = "stop"
        return bool(found)

    def _release(self, final: bool) -> str:
        text = self.raw.lstrip() if self.lstrip else self.raw
        hold = 0 if final else max(max(map(len, self.stops), default=0) - 1, 0)
        if self.moderate is not None:
            if not final:
                hold = max(hold, self.holdback)
                if len(text) - hold < len(self.sent) + self.every:
                    return ""  # too little could be released yet: spare the regexes
            m = self.moderation = self.moderate(text)
            if m.action == "block":
                self.finish_reason = "content_filter"
                return ""
            text = m.text
        # A redaction reaching back into text already sent cannot unsend it: send what follows.
        new = text[len(self.sent):max(len(self.sent), len(text) - hold)]
        self.sent += new
        return new


class _Done:
    """A request with nothing to generate (max_tokens 0): an empty stream, finished before it began."""

    finish_reason = "length"
    completion_tokens = 0
    queued_at = started_at = first_token_at = finished_at = None

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens

    async def batches(self) -> AsyncIterator[list[TokenEvent]]:
        """An empty stream (RequestHandle.batches' shape)."""
        for _ in ():
            yield []

    def cancel(self) -> None:
        pass


# ----------------------------------------------------------------------------- middleware

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


class EventStream(StreamingResponse):
    """Server-sent events whose generator is closed however the response ends, so its `finally`
    (which cancels the engine requests) runs at once when a client leaves, not at garbage collection."""

    def __init__(self, events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream", headers=STREAM_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


# ----------------------------------------------------------------------------- the server

class Server:
    """What the routes do: the served model and its engine, the checks and policies, the metrics.

    `create_app` wires it to FastAPI. The switches (moderation, metrics) exist to measure what each layer
    costs (benchmarks/serve_load.py); serving keeps them on.
    """

    def __init__(self, cfg: Config, source: ModelSource, moderation: bool = True, metrics: bool = True):
        self.cfg, self.sc, self.source = cfg, cfg.serve, source
        self.moderation_on, self.metrics_on = moderation, metrics
        self.served: ServedModel | None = None
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.closing = False
        self.metrics = Metrics(self._stats)
        self._tasks: list[asyncio.Task] = []
        self.created = int(time.time())

    # ------------------------------------------------------------------------- life cycle

    async def start(self) -> None:
        """Load the model in the background: /healthz answers at once, /readyz once it is loaded."""
        self._tasks.append(asyncio.create_task(self._load()))

    async def stop(self) -> None:
        """After uvicorn stopped accepting and gave in-flight requests serve.shutdown_timeout_s."""
        self.closing = True
        for task in self._tasks:
            task.cancel()
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop, ENGINE_DRAIN_S)

    async def _load(self) -> None:
        try:
            served = await asyncio.to_thread(self.source.load)
        except Exception as err:
            self.load_error = str(err)
            log.error("could not load %s: %s", self.source.ref, err)
            return
        try:  # building the runtime's session takes a moment: off the event loop
            engine = await asyncio.to_thread(Engine, served.model, max_batch=self.sc.max_batch,
                                             max_waiting=self.sc.max_waiting, runtime=self.sc.runtime)
        except ValueError as err:  # serve.runtime onnxruntime for a model it cannot run
            self.load_error = str(err)
            log.error("could not serve %s: %s", self.source.ref, err)
            return
        self.engine = engine.start()
        self.served = served
        log.info("serving %s v%s from %s on %s", served.name, served.version, self.source.ref, engine.runtime)
        if self.source.movable:
            self._tasks.append(asyncio.create_task(self._follow_alias()))

    async def _follow_alias(self) -> None:
        """Every serve.reload_interval_s, ask where the alias points; when it moved, load that version
        and swap it in (engine.swap_model lets running requests finish on the old model)."""
        while True:
            await asyncio.sleep(self.sc.reload_interval_s)
            try:
                version = await asyncio.to_thread(self.source.version)
                if version == self.served.version:
                    continue
                served = await asyncio.to_thread(self.source.load, version)
                loaded = await asyncio.to_thread(self.engine.load_model, served.model)  # the slow part
                # swap and relabel in one go on the loop, so a request's fingerprint is the model it runs on
                self.engine.swap_model(loaded)
                self.served = served
                self.metrics.reloads.labels("ok").inc()
                log.info("%s moved: now serving %s v%s", self.source.ref, served.name, version)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # keep serving what we have, try again next time
                self.metrics.reloads.labels("failed").inc()
                log.warning("could not follow %s: %s", self.source.ref, err)

    def _stats(self) -> tuple[int, int]:
        if self.engine is None:
            return 0, 0
        s = self.engine.stats()
        return s.running, s.waiting

    # ------------------------------------------------------------------------- checks

    def ready(self) -> tuple[ServedModel, Engine]:
        if self.closing:
            raise APIError(503, "the server is shutting down; retry", "service_unavailable", code="shutting_down",
                           headers={"Retry-After": "1"})
        if self.served is None:
            why = "is still loading; retry shortly" if self.load_error is None else \
                f"could not be loaded: {self.load_error}"
            raise APIError(503, f"the model {why}", "service_unavailable", code="model_not_ready",
                           headers={"Retry-After": "1"})
        return self.served, self.engine

    def begin(self, body: _Sampling, request: Request, key) -> tuple[ServedModel, Engine, dict]:
        """Checks common to both endpoints; the request-log row, started."""
        row = request.scope.get("lmops.row", {})
        row["key_id"] = getattr(key, "id", None)
        served, engine = self.ready()
        row.update(model=served.name, model_version=served.version)
        if body.model not in (served.name, served.fingerprint, self.source.ref):
            raise APIError(404, f"the model '{body.model}' does not exist; this server serves '{served.name}'",
                           "not_found_error", param="model", code="model_not_found")
        if body.n != 1:
            raise APIError(400, "n: only 1 is supported; send several requests instead", param="n",
                           code="invalid_value")
        return served, engine, row

    def max_tokens(self, value: int | None) -> int:
        n = self.sc.default_max_tokens if value is None else value
        if not 0 <= n <= self.sc.max_tokens_limit:
            raise APIError(400, f"max_tokens is {n}; it must be between 0 and {self.sc.max_tokens_limit} "
                           "(serve.max_tokens_limit)", param="max_tokens", code="invalid_value")
        return n

    @staticmethod
    def stops(stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4:
            raise APIError(400, "stop: at most 4 sequences", param="stop", code="invalid_value")
        return [s for s in stops if s]

    def moderate_input(self, text: str, row: dict) -> str:
        """The prompt text the model may see; 400 content_blocked when a rule blocks it."""
        if not self.moderation_on:
            return text
        m = moderate(text, self.cfg.safety, "input")
        if m.hits:
            if self.metrics_on:
                self.metrics.moderated(m, self.cfg.safety, "input")
            seen = row.setdefault("moderation", {}).setdefault("input", {"action": "allow", "hits": {}})
            seen["action"] = max(seen["action"], m.action, key=STRENGTH.__getitem__)
            for rule, names in m.hits.items():
                seen["hits"][rule] = sorted(set(seen["hits"].get(rule, [])) | set(names))
        if m.action == "block":
            row["prompt"] = m.text
            raise APIError(400, "the prompt was refused by the content policy", param="prompt",
                           code="content_blocked")
        return m.text

    def encode(self, served: ServedModel, prompt: str | list[int], row: dict, param: str = "prompt",
               moderated: bool = False) -> tuple[str, list[int]]:
        """The prompt's text and ids as the model will see them: moderated (a redacted prompt is encoded
        again), within the vocabulary and within serve.max_prompt_tokens and the model's context."""
        tok, cfg = served.tokenizer, served.model.cfg
        if isinstance(prompt, str):
            text = prompt if moderated else self.moderate_input(prompt, row)
            ids = tok.encode(text, add_special_tokens=False).ids
        else:
            if bad := [i for i in prompt if not 0 <= i < cfg.vocab_size][:1]:
                raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary (0..{cfg.vocab_size - 1})",
                               param=param, code="invalid_value")
            ids = list(prompt)
            text = tok.decode(ids, skip_special_tokens=False)
            checked = self.moderate_input(text, row)
            if checked != text:
                text, ids = checked, tok.encode(checked, add_special_tokens=False).ids
        if not ids:  # nothing to continue: start a document, as in training
            if served.eos_id is None:
                raise APIError(400, f"{param}: empty", param=param, code="invalid_value")
            ids = [served.eos_id]
        limit = min(self.sc.max_prompt_tokens, cfg.block_size)
        if len(ids) > limit:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this server takes at most {limit} (the smaller "
                           "of serve.max_prompt_tokens and the model's context)", param=param,
                           code="context_length_exceeded")
        return text, ids

    def submit(self, engine: Engine, ids: list[int], params: SamplingParams) -> RequestHandle | _Done:
        if params.max_tokens == 0:
            return _Done(len(ids))
        try:
            return engine.submit(ids, params)
        except QueueFull:
            raise APIError(429, "the server is at capacity; retry shortly", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_QUEUE_S)}) from None
        except EngineStopped:
            raise APIError(503, "the server is shutting down; retry", "service_unavailable",
                           code="shutting_down", headers={"Retry-After": "1"}) from None

    def sampling(self, body: _Sampling, served: ServedModel, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                              top_k=body.top_k if body.top_k > 0 else None, top_p=body.top_p, seed=body.seed,
                              logprobs=logprobs,
                              stop_token_ids=() if served.eos_id is None or body.ignore_eos else (served.eos_id,))

    def choice(self, handle, served: ServedModel, ids: list[int], stops: list[str], lstrip: bool = False) -> Choice:
        moderator = (lambda text: moderate(text, self.cfg.safety, "output")) if self.moderation_on else None
        return Choice(handle, Detokenizer(served.tokenizer, ids), stops, moderator, self.sc.moderation_holdback_chars,
                      lstrip, every=self.sc.moderation_interval_chars)

    def finish(self, choices: list[Choice], row: dict, prompt: str) -> None:
        """Count and record the choices, finished or cut short by a client that left."""
        for c in choices:
            c.finish_reason = c.finish_reason or c.handle.finish_reason or "cancelled"
            hits = c.moderation is not None and c.moderation.hits
            if self.metrics_on:
                self.metrics.success.labels(c.finish_reason).inc()
                self.metrics.finished(c.handle, c.gaps)
                if hits:
                    self.metrics.moderated(c.moderation, self.cfg.safety, "output")
            if hits:
                row.setdefault("moderation", {})["output"] = {"action": c.moderation.action, "hits": c.moderation.hits}
        hs = [c.handle for c in choices]
        row.update(prompt=prompt, completion="\n".join(c.sent for c in choices),
                   prompt_tokens=sum(h.prompt_tokens for h in hs), completion_tokens=sum(c.tokens for c in choices),
                   queue_s=_min_delta(hs, "started_at"), ttft_s=_min_delta(hs, "first_token_at"))
        if errors := [c.handle.error for c in choices if c.finish_reason == "error"]:
            row["error"] = f"engine: {errors[0]}"

    async def collect(self, choices: list[Choice], request: Request) -> list[list[Piece]]:
        """Every choice's pieces; a client that leaves meanwhile cancels its engine requests."""

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            for c in choices:
                c.handle.cancel()

        watcher = asyncio.create_task(watch())
        try:
            return await asyncio.gather(*(_all_pieces(c) for c in choices))
        finally:
            watcher.cancel()

    # ------------------------------------------------------------------------- endpoints

    def models(self) -> dict:
        served, _ = self.ready()
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": self.created,
                                            "owned_by": "lmops", "root": served.fingerprint}]}

    async def completions(self, body: CompletionRequest, request: Request, key) -> dict | EventStream:
        served, engine, row = self.begin(body, request, key)
        max_tokens, stops, top_n = self.max_tokens(body.max_tokens), self.stops(body.stop), body.logprobs
        raw = body.prompt
        if isinstance(raw, str) or raw and all(isinstance(x, int) for x in raw):
            batch = [raw]
        elif raw and not any(isinstance(x, int) for x in raw):
            batch = raw
        else:
            raise APIError(400, "prompt: give a string, a list of token ids, or a list of strings or of token-id "
                           "lists (not an empty list, nor ids mixed with those)", param="prompt", code="invalid_value")
        prompts = [self.encode(served, p, row) for p in batch]
        row["prompt"] = "\n".join(text for text, _ in prompts)
        tok = served.tokenizer
        echoes = [tok.decode(ids, skip_special_tokens=False) if body.echo else "" for _, ids in prompts]
        scored = [None] * len(prompts)
        if body.echo and top_n is not None:
            scored = [_prompt_logprobs(tok, ids, await asyncio.to_thread(engine.score, ids, top_n))
                      for _, ids in prompts]
        params = self.sampling(body, served, max_tokens, top_n)
        handles: list = []
        try:
            for _, ids in prompts:
                handles.append(self.submit(engine, ids, params))
        except APIError:
            for h in handles:
                h.cancel()
            raise
        choices = [self.choice(h, served, ids, stops) for h, (_, ids) in zip(handles, prompts)]
        head = {"id": f"cmpl-{row.get('request_id', uuid.uuid4().hex)}", "object": "text_completion",
                "created": int(time.time()), "model": served.name, "system_fingerprint": served.fingerprint}

        def logprobs(i: int, pieces: list[Piece]) -> dict | None:
            if top_n is None:
                return None
            out = _completion_logprobs(tok, pieces, len(echoes[i]))
            return out if scored[i] is None else {k: scored[i][k] + out[k] for k in out}

        def usage() -> dict:
            p, c = sum(len(ids) for _, ids in prompts), sum(ch.tokens for ch in choices)
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        if not body.stream:
            try:
                outs = await self.collect(choices, request)
            finally:
                self.finish(choices, row, row["prompt"])
            _raise_engine_error(choices)
            out = [{"index": i, "text": echoes[i] + c.sent, "logprobs": logprobs(i, pieces),
                    "finish_reason": c.finish_reason} for i, (c, pieces) in enumerate(zip(choices, outs))]
            return {**head, "choices": out, "usage": usage()}

        with_usage = {"usage": None} if body.stream_options and body.stream_options.include_usage else {}

        def chunk(i: int, text: str, lp: dict | None = None, finish_reason: str | None = None) -> str:
            return _sse({**head, "choices": [{"index": i, "text": text, "logprobs": lp,
                                              "finish_reason": finish_reason}], **with_usage})

        async def events() -> AsyncIterator[str]:
            try:
                for i, c in enumerate(choices):  # all run in the engine at once; sent one after another
                    if body.echo:
                        yield chunk(i, echoes[i], scored[i])
                    offset = len(echoes[i])
                    async for piece in c.pieces():
                        yield chunk(i, piece.text, None if top_n is None else
                                    _completion_logprobs(tok, [piece], offset))
                    if c.finish_reason == "error":
                        yield _sse(_engine_error(c).body())
                        break
                    yield chunk(i, "", finish_reason=c.finish_reason)
                else:
                    if with_usage:
                        yield _sse({**head, "choices": [], "usage": usage()})
                yield "data: [DONE]\n\n"
            finally:
                for c in choices:
                    c.handle.cancel()
                self.finish(choices, row, row["prompt"])

        return EventStream(events())

    async def chat(self, body: ChatCompletionRequest, request: Request, key) -> dict | EventStream:
        served, engine, row = self.begin(body, request, key)
        max_tokens = self.max_tokens(body.max_completion_tokens if body.max_completion_tokens is not None
                                     else body.max_tokens)
        stops = self.stops(body.stop) + [s for s in self.sc.chat_stop if s]
        turns = [(label, self.moderate_input(content, row)) for label, content in chat_turns(body.messages,
                                                                                              self.sc.chat_roles)]
        text = render_chat(turns, self.sc.chat_roles.get("assistant", "Assistant"))
        text, ids = self.encode(served, text, row, param="messages", moderated=True)
        row["prompt"] = text
        top_n = (body.top_logprobs or 0) if body.logprobs else None
        c = self.choice(self.submit(engine, ids, self.sampling(body, served, max_tokens, top_n)), served, ids, stops,
                        lstrip=True)
        tok = served.tokenizer
        head = {"id": f"chatcmpl-{row.get('request_id', uuid.uuid4().hex)}", "object": "chat.completion",
                "created": int(time.time()), "model": served.name, "system_fingerprint": served.fingerprint}

        def usage() -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": c.tokens, "total_tokens": len(ids) + c.tokens}

        if not body.stream:
            try:
                (pieces,) = await self.collect([c], request)
            finally:
                self.finish([c], row, text)
            _raise_engine_error([c])
            lp = None if top_n is None else {"content": _chat_logprobs(tok, pieces)}
            return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": c.sent},
                                         "logprobs": lp, "finish_reason": c.finish_reason}], "usage": usage()}

        head["object"] = "chat.completion.chunk"
        with_usage = {"usage": None} if body.stream_options and body.stream_options.include_usage else {}

        def chunk(delta: dict, lp: list | None = None, finish_reason: str | None = None) -> str:
            return _sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None if lp is None else
                                              {"content": lp}, "finish_reason": finish_reason}], **with_usage})

        async def events() -> AsyncIterator[str]:
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for piece in c.pieces():
                    yield chunk({"content": piece.text}, None if top_n is None else _chat_logprobs(tok, [piece]))
                if c.finish_reason == "error":
                    yield _sse(_engine_error(c).body())
                else:
                    yield chunk({}, finish_reason=c.finish_reason)
                    if with_usage:
                        yield _sse({**head, "choices": [], "usage": usage()})
                yield "data: [DONE]\n\n"
            finally:
                c.handle.cancel()
                self.finish([c], row, text)

        return EventStream(events())


# ----------------------------------------------------------------------------- the app

def create_app(cfg: Config, source: ModelSource, store=None, *, auth: bool = True, moderation: bool = True,
               request_log: bool = True, metrics: bool = True) -> FastAPI:
    """The server for source's model. store (lmops.store.Store) holds the API keys and the request log.
    The switches turn layers off to measure what they cost (benchmarks/serve_load.py); with auth off
    every route is open, whatever auth.enabled says."""
    if (auth or request_log) and store is None:
        raise ValueError("API keys and the request log live in a store: pass one, or auth=False and request_log=False")
    server = Server(cfg, source, moderation=moderation, metrics=metrics)
    logger = None
    if request_log:
        from lmops.serve.requestlog import RequestLogger

        logger = RequestLogger(store)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.start()
        try:
            yield
        finally:  # uvicorn stopped accepting and waited up to serve.shutdown_timeout_s for in-flight requests
            await server.stop()
            if logger is not None:
                left = await asyncio.to_thread(logger.close)
                if left:
                    log.warning("request log: %d rows could not be written before exit", left)

    app = FastAPI(title="lmops", version="1", lifespan=lifespan,
                  description="OpenAI-compatible completions from a model served by lmops.")
    app.state.server = server
    app.state.request_logger = logger

    def count(err: APIError) -> None:
        if metrics:
            server.metrics.errors.labels(err.code or err.type).inc()

    def respond(request: Request, err: APIError) -> JSONResponse:
        count(err)
        if (row := request.scope.get("lmops.row")) is not None:
            row["error"] = err.message
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return respond(request, exc)

    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return respond(request, error_from_http(exc))

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.method == "POST" and "json" not in request.headers.get("content-type", ""):
            return respond(request, APIError(400, "send the request body as JSON, with the header "
                                             "Content-Type: application/json", code="invalid_json"))
        return respond(request, error_from_validation(exc))

    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return respond(request, APIError(500, "internal server error; the server's log has the details",
                                         "server_error", code="internal_error"))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_bug)

    if auth:
        from lmops.serve.auth import AuthError, install, require

        install(app, store, cfg.auth)
        app.add_exception_handler(AuthError, on_http_error)  # counted and logged as every other error
        inference, deployer = Depends(require("inference")), Depends(require("deployer"))
    else:
        inference = deployer = Depends(_open)

    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        """Alive, unless the model could not be loaded: then a restart is the cure."""
        if server.load_error is not None:
            return JSONResponse({"status": "failed", "error": server.load_error}, status_code=503)
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz():
        """Ready for requests: the model is loaded and the server is not shutting down."""
        if server.served is None or server.closing:
            status = "closing" if server.closing else "failed" if server.load_error else "loading"
            return JSONResponse({"status": status, "error": server.load_error}, status_code=503)
        return {"status": "ready", "model": server.served.name, "version": server.served.version,
                "runtime": server.engine.runtime}

    @app.get("/metrics", dependencies=[] if cfg.serve.metrics_public else [deployer], include_in_schema=False)
    async def metrics_endpoint():
        return PlainTextResponse(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(key=inference) -> dict:
        return server.models()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, key=inference):
        return await server.completions(body, request, key)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, key=inference):
        return await server.chat(body, request, key)

    app.add_middleware(BodyLimit, max_bytes=cfg.serve.max_body_bytes, on_error=count)
    if logger is not None:
        app.add_middleware(RequestLog, write=logger.log)  # outermost: a 413 is logged too
    return app


# ----------------------------------------------------------------------------- helpers

async def _open() -> None:
    return None


async def _all_pieces(c: Choice) -> list[Piece]:
    return [p async for p in c.pieces()]


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _min_delta(handles: list, attr: str) -> float | None:
    deltas = [getattr(h, attr) - h.queued_at for h in handles if getattr(h, attr) is not None]
    return min(deltas) if deltas else None


def _engine_error(c: Choice) -> APIError:
    return APIError(500, f"the engine failed on this request ({getattr(c.handle, 'error', None)})", "server_error",
                    code="engine_error")


def _raise_engine_error(choices: list[Choice]) -> None:
    for c in choices:
        if c.finish_reason == "error":
            raise _engine_error(c)


def _finite(x: float | None) -> float | None:
    """JSON has no infinity: an impossible token's log-probability (-inf) becomes -9999, as OpenAI's."""
    return x if x is None or math.isfinite(x) else -9999.0


def _prompt_logprobs(tok: Tokenizer, ids: list[int], scored: list) -> dict:
    """OpenAI's completions logprobs of the prompt (echo): None at the first token, which has no context."""
    detok, pos = Detokenizer(tok), 0
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tid, (lp, top) in zip(ids, scored):
        out["tokens"].append(token_text(tok, tid))
        out["token_logprobs"].append(_finite(lp))
        out["top_logprobs"].append(None if top is None else {token_text(tok, t): _finite(v) for t, v in top.items()})
        out["text_offset"].append(pos)
        pos += len(detok.add(tid))
    return out


def _completion_logprobs(tok: Tokenizer, pieces: list[Piece], offset: int) -> dict:
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for piece in pieces:
        for ev, at in zip(piece.events, piece.offsets):
            out["tokens"].append(token_text(tok, ev.token_id))
            out["token_logprobs"].append(_finite(ev.logprob))
            out["top_logprobs"].append({token_text(tok, t): _finite(v) for t, v in (ev.top_logprobs or {}).items()})
            out["text_offset"].append(offset + at)
    return out


def _chat_logprobs(tok: Tokenizer, pieces: list[Piece]) -> list[dict]:
    def entry(tid: int, lp: float | None) -> dict:
        text = token_text(tok, tid)
        return {"token": text, "logprob": _finite(lp), "bytes": list(text.encode("utf-8"))}

    return [{**entry(ev.token_id, ev.logprob),
             "top_logprobs": [entry(t, v) for t, v in (ev.top_logprobs or {}).items()]}
            for piece in pieces for ev in piece.events]


# ----------------------------------------------------------------------------- serve

def serve(ws, cfg: Config, model_ref: str, host: str, port: int) -> None:
    """Serve model_ref on host:port until SIGTERM or SIGINT, then drain and exit (blocking).

    model_ref: NAME@alias, NAME@version, a version, or a local checkpoint or Hugging Face folder. An alias
    is followed: when it moves, the new version is swapped in without dropping a request.
    """
    import uvicorn

    from lmops.store import Store

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    source = ModelSource(ws, cfg, model_ref)  # a wrong reference fails here, before the port is bound
    store = Store.for_workspace(ws, cfg)
    try:
        app = create_app(cfg, source, store)
        uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=cfg.serve.shutdown_timeout_s,
                    log_level="info", access_log=False)
    finally:
        store.close()
