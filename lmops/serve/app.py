"""The OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models, probes, metrics.

HTTP lives here; the engine (engine.py) sees only token ids. A request passes, outermost first: the
request log (one row per inference request, whatever became of it; written ahead to a journal before
the response's last bytes) -> a body-size limit (413 before any parsing) -> FastAPI's validation against
the request bodies of protocol.py (400) -> the API key (lmops.serve.auth: 401/403/429; each prompt
counts) -> the prompt's length in tokens -> moderation of the prompt (both in a worker thread when the
prompt is long) -> the engine (within the key's share of the queue) -> stop sequences and moderation of
the completion (output.py) -> the client, whole or as server-sent events.

Choices a reader could make otherwise (those about text on its way out are in output.py):
- A completion that trips a "block" rule ends with finish_reason "content_filter" (Azure OpenAI's), its
  text cut before the part that tripped it; a prompt that does is refused (400, code content_blocked).
- A completion also ends ("length") where prompt + completion fill the model's context (block_size), even
  before max_tokens: refusing every request whose max_tokens might not fit would refuse most of them.
- n > 1 is refused (400): each choice would be a separate engine request anyway. A list of prompts is
  served, one choice per prompt, all submitted at once so they batch.
- Errors always have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, FastAPI's own
  validation errors included (400, not 422: what OpenAI clients expect). A 500 says only that it happened
  and the request id: the exception, which describes the server's insides, goes to the log.
- A prompt of token ids is scored as sent: when moderation would change its text, it is refused, as
  re-encoding the redacted text would score other tokens than the client's.
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
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from lmops.config import Config
from lmops.errors import LmopsError
from lmops.safety import moderate, unsettled
from lmops.serve.engine import Engine, EngineStopped, QueueFull, RequestHandle, SamplingParams
from lmops.serve.metrics import Metrics
from lmops.serve.middleware import BodyLimit, RequestLog
from lmops.serve.output import (Choice, Detokenizer, Done, Piece, chat_logprobs, completion_logprobs,
                                prompt_logprobs)
from lmops.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, SamplingFields, error_from_http,
                                  error_from_validation, error_responses, key_share, max_prompts, request_models)
from lmops.serve.prompts import Prompts
from lmops.serve.shadow import Job, Shadow
from lmops.serve.router import HEADER, VERSION_HEADER, Router
from lmops.serve.source import ModelSource, ServedModel, chat_messages
from lmops.store import utcnow

log = logging.getLogger("lmops.serve")

RETRY_AFTER_QUEUE_S = 1  # a small model drains a full batch in about a second
ENGINE_DRAIN_S = 2.0  # at shutdown, after the HTTP side waited: what is left in the engine has no client
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of SSE


class EventStream(StreamingResponse):
    """Server-sent events whose generator is closed however the response ends, so its `finally`
    (which cancels the engine requests) runs at once when a client leaves, not at garbage collection."""

    def __init__(self, events: AsyncIterator[str], headers: dict[str, str] | None = None):
        super().__init__(events, media_type="text/event-stream", headers={**STREAM_HEADERS, **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


@dataclass(frozen=True)
class Format:
    """The fields of a choice that differ between completions and chat: of a whole answer's choice, of a
    stream's opening chunk (None: none), of a piece's chunk, of the closing chunk."""

    whole: Callable[[int, Choice, list[Piece]], dict]
    opening: Callable[[int], dict | None]
    delta: Callable[[int, Piece], dict]
    closing: Callable[[int], dict]


# ----------------------------------------------------------------------------- the server

class Server:
    """What the routes do: the served model and its engine, the checks and policies, the metrics.

    `create_app` wires it to FastAPI. The switches (moderation, metrics) exist to measure what each layer
    costs (benchmarks/serve_load.py); serving keeps them on.
    """

    def __init__(self, cfg: Config, source: ModelSource | None, moderation: bool = True, metrics: bool = True,
                 endpoint: str | None = None, store=None, ws=None):
        self.cfg, self.sc, self.source = cfg, cfg.serve, source
        self.ws, self.store = ws, store
        self.moderation_on, self.metrics_on = moderation, metrics
        if endpoint is not None and store is None:
            raise ValueError("an endpoint's deployments live in a store: pass one")
        self.router = Router(cfg, endpoint, source=source, store=store, ws=ws)
        self.closing = False
        self.metrics = self.router.metrics = Metrics(self.router.stats)
        self.shadow = Shadow(self.router, store, cfg, self.metrics if metrics else None) if endpoint else None
        self.prompts = Prompts(cfg, self.metrics if metrics else None, moderation)
        self.monitoring = None  # scheduled monitor runs and drift gauges (lmops/serve/monitoring.py)
        if store is not None:
            from lmops.serve.monitoring import Monitoring

            ref = None if source is None or ws is None else source.ref
            self.monitoring = Monitoring(cfg, store, ws, endpoint, ref, self.metrics if metrics else None)
        self._held: dict[int, list[RequestHandle]] = {}  # key id -> its engine requests not known to be done
        self.created = int(time.time())

    # ------------------------------------------------------------------------- life cycle

    @property
    def served(self) -> ServedModel | None:
        """The model of the deployment taking the most traffic (the only one of `serve --model`)."""
        b = self.router.primary
        return None if b is None else b.served

    @property
    def engine(self) -> Engine | None:
        b = self.router.primary
        return None if b is None else b.engine

    @property
    def load_error(self) -> str | None:
        """Why nothing can be served: set when no deployment is loaded and one failed to load."""
        if self.router.ready:
            return None
        return next((b.load_error for b in self.router.backends.values() if b.load_error), None)

    async def start(self) -> None:
        """Load the models in the background (/healthz answers at once, /readyz once one is loaded), follow
        the alias or the endpoint, score shadow traffic."""
        await self.router.start()
        if self.shadow is not None:
            self.shadow.start()
        if self.monitoring is not None:
            self.monitoring.start()

    async def stop(self) -> None:
        """After uvicorn stopped accepting and gave in-flight requests serve.shutdown_timeout_s."""
        self.closing = True
        if self.shadow is not None:
            self.shadow.stop()
        if self.monitoring is not None:
            self.monitoring.stop()
        await self.router.stop(ENGINE_DRAIN_S)

    # ------------------------------------------------------------------------- checks

    def ready(self, request: Request | None = None) -> tuple[ServedModel, Engine]:
        """The deployment that answers this request (its header's, else one by traffic weight)."""
        if self.closing:
            raise APIError(503, "the server is shutting down; retry", "service_unavailable", code="shutting_down",
                           headers={"Retry-After": "1"})
        if request is None:
            b = self.router.pick(None)
        else:
            row = request.scope.setdefault("lmops.row", {})
            row["endpoint"] = self.router.endpoint  # also when no deployment can answer
            b = self.router.pick(request.headers.get(HEADER))
            row["deployment"] = b.name
        return b.served, b.engine

    def model_ids(self, served: ServedModel) -> tuple[str, ...]:
        """The names a request's `model` may give: the endpoint's, or the model's (name, fingerprint, ref)."""
        if self.router.endpoint is not None:
            return self.router.endpoint, served.name, served.fingerprint
        return served.name, served.fingerprint, self.source.ref

    def public_name(self, served: ServedModel) -> str:
        return self.router.endpoint or served.name

    def begin(self, body: SamplingFields, request: Request, key) -> tuple[ServedModel, Engine, dict]:
        """Checks common to both endpoints; the request-log row, started."""
        row = request.scope.setdefault("lmops.row", {})
        row["key_id"] = getattr(key, "id", None)
        served, engine = self.ready(request)
        row.update(model=served.name, model_version=served.version)
        if body.model not in self.model_ids(served):
            raise APIError(404, f"the model '{body.model}' does not exist; this server serves "
                           f"'{self.public_name(served)}'", "not_found_error", param="model", code="model_not_found")
        return served, engine, row

    @property
    def key_share(self) -> int:
        """Engine requests one API key may have running or waiting at once (protocol.key_share)."""
        return key_share(self.sc.max_batch, self.sc.max_waiting)

    async def admit(self, request: Request, key, count: int) -> None:
        """A request of `count` engine requests (one per prompt): each counts against the key's rate limit
        (the auth dependency took one); 400 when it could never fit the key's share of the queue or its
        burst, 429 when the rate limit refuses it now. The share itself is checked at submission."""
        share = self.key_share
        if count > share:
            raise APIError(400, f"prompt: {count} prompts in one request; this server takes at most {share} "
                           "(serve.max_batch + half of serve.max_waiting)", param="prompt", code="too_many_prompts")
        if key is None:  # auth off: no keys to be fair between
            return
        auth = getattr(request.app.state, "auth", None)
        if count > 1 and auth is not None:
            if count > auth.cfg.burst:
                raise APIError(400, f"prompt: {count} prompts in one request, over this key's burst of "
                               f"{auth.cfg.burst} (auth.burst): each prompt counts as a request", param="prompt",
                               code="too_many_prompts")
            ok, retry_after_s = await auth.acquire(key, count - 1)
            if not ok:
                seconds = max(1, math.ceil(retry_after_s))
                raise APIError(429, f"Rate limit reached for API key {key.prefix}: {count} prompts count as "
                               f"{count} requests; retry after {seconds} s.", "rate_limit_error",
                               code="rate_limit_exceeded", headers={"Retry-After": str(seconds)})

    def max_tokens(self, value: int | None) -> int:
        n = self.sc.default_max_tokens if value is None else value
        if not 0 <= n <= self.sc.max_tokens_limit:
            raise APIError(400, f"max_tokens is {n}; it must be between 0 and {self.sc.max_tokens_limit} "
                           "(serve.max_tokens_limit)", param="max_tokens", code="invalid_value")
        return n

    @staticmethod
    def stops(stop: str | list[str] | None) -> list[str]:
        """The stop sequences (at most MAX_STOP: the request body says so), empty ones dropped."""
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        return [s for s in stops if s]

    def submit(self, engine: Engine, ids: list[int], params: SamplingParams) -> RequestHandle | Done:
        if params.max_tokens == 0:
            return Done(len(ids))
        try:
            return engine.submit(ids, params)
        except QueueFull:
            raise _queue_full() from None
        except EngineStopped:
            raise APIError(503, "the server is shutting down; retry", "service_unavailable",
                           code="shutting_down", headers={"Retry-After": "1"}) from None

    def sampling(self, body: SamplingFields, served: ServedModel, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                              top_k=body.top_k if body.top_k > 0 else None, top_p=body.top_p, seed=body.seed,
                              logprobs=logprobs,
                              stop_token_ids=() if served.eos_id is None or body.ignore_eos else (served.eos_id,))

    def choice(self, handle, served: ServedModel, ids: list[int], stops: list[str], lstrip: bool = False) -> Choice:
        safety, holdback = self.cfg.safety, self.sc.moderation_holdback_chars
        moderator = (lambda text: moderate(text, safety, "output")) if self.moderation_on else None
        return Choice(handle, Detokenizer(served.tokenizer, ids), stops, moderator, holdback, lstrip,
                      every=self.sc.moderation_interval_chars, unsettled=lambda text: unsettled(text, safety, holdback))

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
                   queue_s=_min_delta(hs, "started_at"), ttft_s=_min_delta(hs, "first_token_at"),
                   finish_reason=",".join(dict.fromkeys(c.finish_reason for c in choices)))
        if errors := [c.handle.error for c in choices if c.finish_reason == "error"]:
            row["error"] = f"engine: {errors[0]}"
        if self.shadow is not None and self.shadow.comparing:
            self.to_shadow(choices, row)

    def to_shadow(self, choices: list[Choice], row: dict) -> None:
        """Queue each finished answer for scoring, and for its mirrors (lmops/serve/shadow.py)."""
        live = self.router.backends.get(row.get("deployment"))
        if live is None or live.served is None:
            return
        for c in choices:
            h = c.handle
            if not isinstance(h, RequestHandle) or c.finish_reason in ("error", "cancelled"):
                continue
            self.shadow.offer(Job(row.get("ts") or utcnow(), row.get("request_id", ""), live, list(h.prompt_ids),
                                  c.detok.ids[len(h.prompt_ids):], h.params, c.finish_reason,
                                  bool(c.moderation is not None and c.moderation.hits),
                                  None if h.first_token_at is None else h.first_token_at - h.queued_at,
                                  None if h.finished_at is None else h.finished_at - h.queued_at,
                                  self.router.mirror_targets(live.name)))

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
        return {"object": "list", "data": [{"id": self.public_name(served), "object": "model", "created": self.created,
                                            "owned_by": "lmops", "root": served.fingerprint,
                                            "max_model_len": served.model.cfg.block_size}]}  # as vLLM's

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
        await self.admit(request, key, len(batch) * body.n)
        size = sum(len(p) if isinstance(p, str) else 4 * len(p) for p in batch)
        prompts = await self.prompts.off_loop(size, lambda: [self.prompts.encode(served, p, row) for p in batch])
        row["prompt"] = "\n".join(text for text, _ in prompts)
        tok = served.tokenizer
        echoes = [tok.decode(ids, skip_special_tokens=False) if body.echo else "" for _, ids in prompts]
        scored = [None] * len(prompts)
        if body.echo and top_n is not None:
            scored = [prompt_logprobs(tok, ids, await asyncio.to_thread(engine.score, ids, top_n))
                      for _, ids in prompts]
        params = self.sampling(body, served, max_tokens, top_n)
        choices = self.submit_all(engine, served, [ids for _, ids in prompts], params, stops, key)

        def logprobs(i: int, pieces: list[Piece]) -> dict | None:
            if top_n is None:
                return None
            out = completion_logprobs(tok, pieces, len(echoes[i]))
            return out if scored[i] is None else {k: scored[i][k] + out[k] for k in out}

        def whole(i: int, c: Choice, pieces: list[Piece]) -> dict:
            return {"text": echoes[i] + c.sent, "logprobs": logprobs(i, pieces)}

        def opening(i: int) -> dict | None:
            return {"text": echoes[i], "logprobs": scored[i]} if body.echo else None

        def delta(i: int, piece: Piece) -> dict:
            return {"text": piece.text, "logprobs": None if top_n is None else
                    completion_logprobs(tok, [piece], len(echoes[i]))}

        def closing(i: int) -> dict:
            return {"text": "", "logprobs": None}

        return await self.answer(body, request, row, served, "cmpl", "text_completion", choices,
                                 Format(whole, opening, delta, closing))

    async def chat(self, body: ChatCompletionRequest, request: Request, key) -> dict | EventStream:
        served, engine, row = self.begin(body, request, key)
        max_tokens = self.max_tokens(body.max_completion_tokens if body.max_completion_tokens is not None
                                     else body.max_tokens)
        template = served.chat_template
        messages = chat_messages(body.messages, self.sc.chat_roles)
        await self.admit(request, key, body.n)
        # the plain transcript's own stops: an untuned model goes on to write the next turn itself
        stops = self.stops(body.stop) + ([] if template else [s for s in self.sc.chat_stop if s])
        text, ids = await self.prompts.off_loop(sum(len(m["content"]) for m in messages), self.prompts.chat, served,
                                                messages, row)
        row["prompt"] = text
        top_n = (body.top_logprobs or 0) if body.logprobs else None
        choices = self.submit_all(engine, served, [ids], self.sampling(body, served, max_tokens, top_n), stops,
                                  key, lstrip=template is None)  # the space a model writes after "Assistant:"
        tok = served.tokenizer

        def logprobs(pieces: list[Piece]) -> dict | None:
            return None if top_n is None else {"content": chat_logprobs(tok, pieces)}

        def whole(i: int, c: Choice, pieces: list[Piece]) -> dict:
            return {"message": {"role": "assistant", "content": c.sent}, "logprobs": logprobs(pieces)}

        def opening(i: int) -> dict:
            return {"delta": {"role": "assistant", "content": ""}, "logprobs": None}

        def delta(i: int, piece: Piece) -> dict:
            return {"delta": {"content": piece.text}, "logprobs": logprobs([piece])}

        def closing(i: int) -> dict:
            return {"delta": {}, "logprobs": None}

        return await self.answer(body, request, row, served, "chatcmpl", "chat.completion", choices,
                                 Format(whole, opening, delta, closing))

    # ------------------------------------------------------------------------- one answer, whole or streamed

    def submit_all(self, engine: Engine, served: ServedModel, prompts: list[list[int]], params: SamplingParams,
                   stops: list[str], key, lstrip: bool = False) -> list[Choice]:
        """A choice per prompt, all submitted at once so they batch; none if one is refused (429, 503).
        They count against the key's share of the queue until they finish (see admit)."""
        stats = engine.stats()
        if stats.running + stats.waiting + len(prompts) > self.sc.max_batch + self.sc.max_waiting:
            raise _queue_full()
        if key is not None:  # checked here, where nothing runs between the check and the submissions
            held = self._held.setdefault(key.id, [])
            held[:] = [h for h in held if not h.done]
            if len(held) + len(prompts) > self.key_share:
                raise APIError(429, f"API key {key.prefix} already has {len(held)} requests running or waiting; a "
                               f"key may have {self.key_share} at once, so that other keys are served too; retry "
                               "shortly", "rate_limit_error", code="key_queue_full",
                               headers={"Retry-After": str(RETRY_AFTER_QUEUE_S)})
        handles: list = []
        try:
            for ids in prompts:
                handles.append(self.submit(engine, ids, params))
        except APIError:
            for h in handles:
                h.cancel()
            raise
        if key is not None:
            self._held[key.id].extend(h for h in handles if isinstance(h, RequestHandle))
        return [self.choice(h, served, ids, stops, lstrip) for h, ids in zip(handles, prompts)]

    async def answer(self, body: SamplingFields, request: Request, row: dict, served: ServedModel, id_prefix: str,
                     obj: str, choices: list[Choice], fmt: Format) -> dict | EventStream:
        """The response of either endpoint: one JSON body, or a stream of chunks (each choice's opening
        chunk, its pieces, its closing chunk with the finish_reason, one after another; the usage chunk
        when asked for; [DONE]). fmt gives what differs between the endpoints: the fields of a choice."""
        head = {"id": f"{id_prefix}-{row.get('request_id', uuid.uuid4().hex)}", "object": obj,
                "created": int(time.time()), "model": self.public_name(served),
                "system_fingerprint": served.fingerprint}
        headers = served_headers(row)
        prompt = row.get("prompt", "")

        def usage() -> dict:
            p, c = sum(ch.handle.prompt_tokens for ch in choices), sum(ch.tokens for ch in choices)
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        if not body.stream:
            try:
                outs = await self.collect(choices, request)
            finally:
                self.finish(choices, row, prompt)
            _raise_engine_error(choices, row.get("request_id"))
            return JSONResponse({**head, "usage": usage(), "choices": [
                {"index": i, **fmt.whole(i, c, pieces), "finish_reason": c.finish_reason}
                for i, (c, pieces) in enumerate(zip(choices, outs))]}, headers=headers)

        head["object"] = f"{obj}.chunk" if obj == "chat.completion" else obj
        with_usage = {"usage": None} if body.stream_options and body.stream_options.include_usage else {}

        def chunk(i: int, fields: dict, finish_reason: str | None = None) -> str:
            return _sse({**head, "choices": [{"index": i, **fields, "finish_reason": finish_reason}], **with_usage})

        async def events() -> AsyncIterator[str]:
            finished = False
            try:
                for i, c in enumerate(choices):  # all run in the engine at once; sent one after another
                    if (first := fmt.opening(i)) is not None:
                        yield chunk(i, first)
                    async for piece in c.pieces():
                        yield chunk(i, fmt.delta(i, piece))
                    if c.finish_reason == "error":
                        yield _sse(_engine_error(c, row.get("request_id")).body())
                        break
                    yield chunk(i, fmt.closing(i), c.finish_reason)
                else:
                    if with_usage:
                        yield _sse({**head, "choices": [], "usage": usage()})
                self.finish(choices, row, prompt)  # before [DONE]: the request log records the row with it
                finished = True
                yield "data: [DONE]\n\n"
            finally:
                for c in choices:
                    c.handle.cancel()
                if not finished:
                    self.finish(choices, row, prompt)

        return EventStream(events(), headers)


# ----------------------------------------------------------------------------- the app

def create_app(cfg: Config, source: ModelSource | None, store=None, *, auth: bool = True, moderation: bool = True,
               request_log: bool = True, metrics: bool = True, journal_dir: Path | None = None,
               endpoint: str | None = None, ws=None) -> FastAPI:
    """The server for source's model, or (source None) for the deployments of `endpoint` in the store (ws:
    the workspace whose registry they come from). store (lmops.store.Store) holds the API keys, the
    request log and the endpoints.
    journal_dir: the request log's write-ahead journal (lmops.serve.requestlog), replayed into the store
    here; a response then completes only once its row is on disk. The switches turn layers off to
    measure what they cost (benchmarks/serve_load.py); with auth off every route is open, whatever
    auth.enabled says."""
    if (auth or request_log) and store is None:
        raise ValueError("API keys and the request log live in a store: pass one, or auth=False and request_log=False")
    server = Server(cfg, source, moderation=moderation, metrics=metrics, endpoint=endpoint, store=store, ws=ws)
    logger = None
    if request_log:
        from lmops.serve.requestlog import RequestLogger

        logger = RequestLogger(store, journal_dir=journal_dir)

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
        row = request.scope.get("lmops.row")
        if row is not None:
            row.setdefault("error", err.message)  # an engine error keeps its details in the log
        return JSONResponse(err.body(), status_code=err.status, headers={**(err.headers or {}), **served_headers(row)})

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
        request_id = (request.scope.get("lmops.row") or {}).get("request_id")
        log.exception("internal error on %s (request %s)", request.url.path, request_id)
        return respond(request, APIError(500, f"internal server error (request id {request_id}); the server's log "
                                         "has the details", "server_error", code="internal_error"))

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
    if store is not None:  # /dashboard: the store's view for a browser, signed in by a cookie (dashboard.py)
        from lmops.serve.dashboard import install as install_dashboard

        install_dashboard(app, server, store)

    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        """Alive, unless the model could not be loaded: then a restart is the cure."""
        if server.load_error is not None:
            return JSONResponse({"status": "failed", "error": server.load_error}, status_code=503)
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz():
        """Ready for requests: the model is loaded and the server is not shutting down."""
        if not server.router.ready or server.closing:
            status = "closing" if server.closing else "failed" if server.load_error else "loading"
            return JSONResponse({"status": status, "error": server.load_error}, status_code=503)
        out = {"status": "ready", "model": server.served.name, "version": server.served.version,
               "runtime": server.engine.runtime, "weights": server.engine.weights}
        if server.router.endpoint is not None:
            out["endpoint"] = server.router.endpoint
            out["deployments"] = {n: {"version": b.served.version if b.served else None,
                                      "traffic": server.router.traffic.get(n, 0), "loaded": b.served is not None}
                                  for n, b in sorted(server.router.backends.items())}
        return out

    @app.get("/metrics", dependencies=[] if cfg.serve.metrics_public else [deployer], include_in_schema=False)
    async def metrics_endpoint():
        return PlainTextResponse(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=error_responses(*([401, 403, 429] if auth else []), 503))
    async def models(key=inference) -> dict:
        return server.models()

    completion_body, chat_body = request_models(cfg.serve.max_tokens_limit, max_prompts(cfg, auth))

    async def completions(body, request: Request, key=inference):
        return await server.completions(body, request, key)

    async def chat_completions(body, request: Request, key=inference):
        return await server.chat(body, request, key)

    completions.__annotations__["body"] = completion_body  # classes of this config, not names to look up
    chat_completions.__annotations__["body"] = chat_body
    inference_errors = error_responses(*([400, 401, 403] if auth else [400]), 404, 413, 429, 500, 503)
    streamed = {200: {"description": "The completion: JSON, or with stream true server-sent events ending in "
                      "data: [DONE].", "content": {"application/json": {}, "text/event-stream": {
                          "schema": {"type": "string"}}}}}
    app.post("/v1/completions", responses={**streamed, **inference_errors})(completions)
    app.post("/v1/chat/completions", responses={**streamed, **inference_errors})(chat_completions)
    if store is not None:  # POST /v1/feedback: users' scores of completions (feedback.py)
        from lmops.serve.feedback import install as install_feedback

        install_feedback(app, server, store, logger, inference)
    app.openapi = lambda: _openapi(app)

    app.add_middleware(BodyLimit, max_bytes=cfg.serve.max_body_bytes, on_error=count)
    if logger is not None:
        # outermost: a 413 is logged too
        app.add_middleware(RequestLog, write=logger.log, durable=logger.log_durably if journal_dir else None)
    return app


# ----------------------------------------------------------------------------- helpers

def _openapi(app: FastAPI) -> dict:
    """FastAPI's document without its 422 (this server answers 400 for what it refuses, in OpenAI's shape)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in doc.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            doc.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = doc
    return app.openapi_schema


async def _open() -> None:
    return None


async def _all_pieces(c: Choice) -> list[Piece]:
    return [p async for p in c.pieces()]


def served_headers(row: dict | None) -> dict[str, str]:
    """Which deployment and model version answered: on every response a deployment produced."""
    if not row or not row.get("deployment"):
        return {}
    return {HEADER: row["deployment"], VERSION_HEADER: str(row.get("model_version") or "")}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _min_delta(handles: list, attr: str) -> float | None:
    deltas = [getattr(h, attr) - h.queued_at for h in handles if getattr(h, attr) is not None]
    return min(deltas) if deltas else None


def _queue_full() -> APIError:
    return APIError(429, "the server is at capacity; retry shortly", "rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(RETRY_AFTER_QUEUE_S)})


def _engine_error(c: Choice, request_id: str | None) -> APIError:
    """What the client learns of an engine failure: that it happened, and the id to find it in the log
    by; never the exception's text, which describes the server's insides."""
    log.error("request %s: the engine failed: %s", request_id, getattr(c.handle, "error", None))
    return APIError(500, f"the engine failed on this request (request id {request_id}); the server's log has "
                    "the details", "server_error", code="engine_error")


def _raise_engine_error(choices: list[Choice], request_id: str | None) -> None:
    for c in choices:
        if c.finish_reason == "error":
            raise _engine_error(c, request_id)


# ----------------------------------------------------------------------------- serve

def serve(ws, cfg: Config, model_ref: str | None, host: str, port: int, endpoint: str | None = None) -> None:
    """Serve model_ref (or every deployment of `endpoint`) on host:port until SIGTERM or SIGINT, then drain
    and exit (blocking).

    model_ref: NAME@alias, NAME@version, a version, or a local checkpoint or Hugging Face folder. An alias
    is followed: when it moves, the new version is swapped in without dropping a request. endpoint: its
    deployments, traffic and mirror are followed in the store, and this server drives its rollouts
    (lmops/deploy/rollout.py; one driver per rollout however many servers run).
    """
    import uvicorn

    from lmops.store import Store

    # MLflow draws a progress bar per artifact download, which would fill a server's log
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    if not 1 <= port <= 65535:
        raise LmopsError(f"port {port}: a TCP port is between 1 and 65535")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # a wrong reference fails here, before the port is bound
    source = None if endpoint else ModelSource(ws, cfg, model_ref)
    store = Store.for_workspace(ws, cfg)
    driver = None
    try:
        # one journal per port: two servers of one workspace must not replay (and delete) each other's
        app = create_app(cfg, source, store, journal_dir=ws.state / "request-journal" / str(port),
                         endpoint=endpoint, ws=ws)
        app.state.server.router.preload()  # so does a model that cannot be loaded or run
        if endpoint is not None:
            from lmops.deploy.rollout import Driver

            own = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
            driver = Driver(store, cfg, ws=ws, endpoint=endpoint, smoke=_smoke(store, cfg, f"http://{own}:{port}"),
                            name=f"serve@{os.uname().nodename}:{port}", changed=app.state.server.router.wake).start()
        uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=cfg.serve.shutdown_timeout_s,
                    log_level="info", access_log=False)
    finally:
        if driver is not None:
            driver.stop(timeout=10)
        store.close()


def _smoke(store, cfg: Config, base_url: str):
    """The blue-green smoke suite against this server, through the deployment header. With auth on, it
    runs under an inference key of its own, created for the run and revoked after (both audited)."""
    from lmops.serve.smoke import run_smoke

    def smoke(endpoint: str, deployment: str):
        key = None
        headers = {}
        if cfg.auth.enabled:
            key, secret = store.keys.create(f"rollout smoke test of {endpoint}/{deployment}", "inference",
                                            "lmops-rollout")
            headers = {"Authorization": f"Bearer {secret}"}
        try:
            sc = cfg.rollout.smoke
            return run_smoke(base_url, deployment, sc.prompts, headers, sc.max_latency_s, sc.max_tokens,
                             model=endpoint)
        finally:
            if key is not None:
                store.keys.revoke(key.id, "lmops-rollout")

    return smoke
