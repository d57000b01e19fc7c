"""The inference engine: token ids in, token ids out, many requests decoding together.

No HTTP, no text, no tokenizer: `Engine.submit(prompt_ids, SamplingParams(...))` returns a
`RequestHandle` that streams `TokenEvent`s, to a blocking `for` loop or, when submitted from inside an
asyncio event loop, to `async for`.

Continuous batching. A background thread runs `step()` in a loop. Each step (1) runs queued jobs
(`score`), (2) drops cancelled requests, (3) admits waiting requests into free rows and prefills their
prompts, at most `prefill_chunk` prompt tokens per step, so a long prompt joins over several steps
in chunks instead of stalling everyone's next token, and (4) runs one decode step: one forward over
every running sequence, one new token each. A sequence that finishes (stop token, max_tokens,
block_size, cancel) leaves at once and its row is free for the next step.

The cache (`SlotCache`) is preallocated: keys and values of shape
(n_layer, max_batch, n_kv_head, block_size, head_dim), one row per running sequence, each row at its
own length. Running sequences occupy rows 0..n-1 without holes (a leaving sequence's row is refilled
by moving the last row's cache into it, a copy of one sequence; far cheaper than gathering rows every
step), so a decode step works on plain slices of the cache. The prompt being prefilled sits in row n.
In a decode step row b writes its new key and value at its own position, is rotated (RoPE) at that
position, and attends to keys [0, longest length) through a mask that hides positions past its own
length; all of it in `GPT.forward_rows` (lmops/model.py). A lone sequence needs no mask.

Runtime. That forward runs on ONNX Runtime when it can (`runtime="auto"`, lmops/serve/ort.py: the same
maths with each layer's small ops fused, 1.9-3.3x faster per token on a CPU, writing the same
SlotCache in place), else on PyTorch (`GPT.forward_rows`: a GPU, bf16 weights, a head_dim ORT's fused
attention does not take). `runtime="torch"` or `"onnxruntime"` insists on one. Sampling, the cache's
bookkeeping and scoring are the engine's either way.

Sequences cannot outgrow the model's context: prompt + completion is at most block_size tokens; a
sequence reaching it finishes with reason "length" (the engine does not slide a window as
`GPT.generate` does: the cache would have to be recomputed, and a server should say it stopped). A
prompt longer than block_size is refused by `submit` (ValueError).

Sampling is per request: each request with temperature > 0 has its own random stream (seeded by
`seed`), which draws its row's one uniform per token, so its tokens do not depend on what else is in
the batch: the same seed and prompt give the same tokens alone or in any batch. The rows of a step
are sampled together (one `sample` over all of them with each row's temperature, top_k and top_p),
not one by one: a row by itself costs a dozen small ops. Log-probabilities are those of the model
(log_softmax of the raw logits, before temperature, top-k and top-p), as in the OpenAI API.

Delivery. Events a step produces for requests submitted from an event loop are handed to that loop in
one call at the end of the step (`_Outbox`), not one call per token: waking an event loop from
another thread costs a system call, and with 32 streams that was 32 wake-ups per step. A reader
that falls behind takes every event already delivered at once (`RequestHandle.batches`), so the
server sends one chunk for them instead of one per token.

Model hot swap (`swap_model`): in-flight requests finish on the model they started with; new requests
wait until they have (admission pauses while a swap is pending), then the new model takes over and the
cache is rebuilt for it. Every request is thus served by one model from its first token to its last, at
the cost of a pause of at most one request's length for the new ones.

`max_batch=1` turns batching off: one sequence at a time, the others wait.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lmops.model import GPT, GPTConfig, sample
from lmops.serve import ort

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """submit() while max_waiting requests already wait (the HTTP layer answers 503 and the client retries)."""


class EngineStopped(Exception):
    """submit() after stop()."""


@dataclass(frozen=True)
class SamplingParams:
    """How to continue one prompt.

    temperature 0 is greedy (top_k and top_p then do nothing). logprobs None returns none; 0 the
    chosen token's log-probability; n > 0 also the n most likely tokens'. Generation ends at any of
    stop_token_ids (that token is not delivered), after max_tokens tokens, or at block_size.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    logprobs: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be >= 0 and finite, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no limit), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")


@dataclass(frozen=True, slots=True)
class TokenEvent:
    token_id: int
    logprob: float | None = None  # with SamplingParams.logprobs not None
    top_logprobs: dict[int, float] | None = None  # with logprobs > 0: token id -> log-probability


@dataclass(frozen=True)
class EngineStats:
    running: int  # in the batch (prefilling or decoding)
    waiting: int  # submitted, not yet admitted


class RequestHandle:
    """One submitted request: its token stream, its outcome and its timings.

    Iterate it (`for ev in handle`, blocking) or, when it was submitted from inside an asyncio event
    loop, `async for ev in handle`. When the stream ends, finish_reason is one of "stop", "length",
    "cancelled", "error" (then `error` says why). Timings are time.monotonic() seconds: queued_at
    (submit), started_at (joined the batch), first_token_at, finished_at.
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop | None,
                 on_cancel: Callable[[RequestHandle], None]):
        self.prompt_ids = prompt_ids
        self.params = params
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.queued_at = time.monotonic()
        self.started_at: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.cancelled = False
        self._loop = loop
        self._events: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop is not None else queue.SimpleQueue()
        self._done = threading.Event()
        self._on_cancel = on_cancel

    def cancel(self) -> None:
        """Stop generating (the client went away): the request leaves the batch at the next step."""
        if self.finish_reason is None and not self.cancelled:
            self.cancelled = True
            self._on_cancel(self)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished (True) or timeout (False)."""
        return self._done.wait(timeout)

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._loop is not None:
            raise RuntimeError("this request was submitted from an event loop: read it with `async for`")
        while (event := self._events.get()) is not None:
            yield event

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        if self._loop is None:
            raise RuntimeError("this request was submitted outside an event loop: read it with `for`")
        return self

    async def __anext__(self) -> TokenEvent:
        try:
            event = await self._events.get()
        except asyncio.CancelledError:  # the reading task was cancelled: nobody will read the rest
            self.cancel()
            raise
        if event is None:
            raise StopAsyncIteration
        return event

    async def batches(self) -> AsyncIterator[list[TokenEvent]]:
        """`async for events in handle.batches()`: the stream as lists of every event already
        delivered (at least one each), so a reader that fell behind catches up in one go."""
        if self._loop is None:
            raise RuntimeError("this request was submitted outside an event loop: read it with `for`")
        while True:
            try:
                first = await self._events.get()
            except asyncio.CancelledError:
                self.cancel()
                raise
            batch = [first]
            while not self._events.empty():
                batch.append(self._events.get_nowait())
            if None in batch:  # the end: nothing follows it
                if events := batch[:batch.index(None)]:
                    yield events
                return
            yield batch

    # -- called by the engine thread

    def _put(self, item: TokenEvent | None) -> None:
        if self._loop is None:
            self._events.put(item)
        elif (outbox := getattr(_step, "outbox", None)) is not None:  # inside a step: sent at its end
            outbox.add(self, item)
        else:
            _Outbox.send(self._loop, [(self, item)])

    def _finish(self, reason: str, error: str | None = None) -> None:
        if self.finish_reason is not None:
            return
        self.finish_reason, self.error = reason, error
        self.finished_at = time.monotonic()
        self._put(None)
        self._done.set()


_step = threading.local()  # .outbox while this thread runs Engine.step


class _Outbox:
    """The events of one step, by event loop: each loop gets its share in one call_soon_threadsafe."""

    def __init__(self) -> None:
        self.items: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, TokenEvent | None]]] = {}

    def add(self, handle: RequestHandle, item: TokenEvent | None) -> None:
        self.items.setdefault(handle._loop, []).append((handle, item))

    def flush(self) -> None:
        for loop, items in self.items.items():
            self.send(loop, items)
        self.items = {}

    @staticmethod
    def send(loop: asyncio.AbstractEventLoop, items: list[tuple[RequestHandle, TokenEvent | None]]) -> None:
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # the event loop is closed: nobody listens any more
            for handle, _ in items:
                handle.cancelled = True


def _deliver(items: list[tuple[RequestHandle, TokenEvent | None]]) -> None:
    for handle, item in items:
        handle._events.put_nowait(item)


class SlotCache:
    """Keys and values of up to `rows` sequences, one row each, every row at its own length.

    The `cache` argument of GPT.forward_rows: `select` names the rows and start positions of the next
    forward, `update` (called by each attention layer) stores the new keys and values there and returns
    the rows' keys and values up to the longest length.
    """

    def __init__(self, cfg: GPTConfig, rows: int, device: torch.device, dtype: torch.dtype):
        shape = (cfg.n_layer, rows, cfg.n_kv_head, cfg.block_size, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.row0 = 0
        self.starts: list[int] = [0]
        self._rows = self._pos = None

    def select(self, row0: int, starts: list[int]) -> None:
        """The next forward covers rows row0, row0+1, ...: one row and any tokens, or one token per row."""
        self.row0, self.starts = row0, starts
        if len(starts) > 1:  # index tensors for the scattered write, once per forward rather than per layer
            device = self.k.device
            self._rows = torch.arange(row0, row0 + len(starts), device=device)
            self._pos = torch.tensor(starts, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, _, T, _ = k.shape
        r, end = self.row0, max(self.starts) + T
        if B == 1:
            s = self.starts[0]
            self.k[layer, r, :, s:s + T] = k[0]
            self.v[layer, r, :, s:s + T] = v[0]
        else:
            assert T == 1, "several rows advance by one token each"
            self.k[layer, self._rows, :, self._pos] = k[:, :, 0]
            self.v[layer, self._rows, :, self._pos] = v[:, :, 0]
        return self.k[layer, r:r + B, :, :end], self.v[layer, r:r + B, :, :end]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row src into row dst, every layer."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


@dataclass(eq=False)
class _Seq:
    """A request inside the engine: where it is in its prompt and completion."""

    handle: RequestHandle
    limit: int  # completion tokens allowed: max_tokens, or fewer to stay within block_size
    rng: random.Random | None  # its own random stream when sampling (temperature > 0)
    pos: int = 0  # tokens in the cache
    last: int = -1  # the token to feed next
    stop: frozenset[int] = field(default_factory=frozenset)


def prepare(model: GPT) -> GPT:
    """Make model ready to serve, in place: eval mode and, on a CPU in float32, every linear weight
    stored transposed (same values and shape, strides swapped).

    F.linear(x, W) computes x @ W.T; with W.T contiguous, MKL streams the weight row by row into the
    output, 1.2-2x faster for the one to few rows of a decode step than dot products against the rows
    of W (measured on the model of benchmarks/engine_decode.py; most when the weights come from memory
    rather than cache). bf16 is left alone: its kernels are no faster with it.
    """
    model.eval()
    w = model.embed.weight
    if w.device.type == "cpu" and w.dtype == torch.float32:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Linear) and module.weight.is_contiguous():
                    module.weight.data = module.weight.data.t().contiguous().t()
    return model


RUNTIMES = ("auto", "onnxruntime", "torch")
Forward = Callable[[torch.Tensor, SlotCache], torch.Tensor]


class Loaded(NamedTuple):
    """A model ready to serve: prepared, with the forward that runs it, that runtime's name and the
    precision of the weights it decodes with."""

    model: GPT
    forward: Forward
    runtime: str
    weights: str = "fp32"


def load(model: GPT, runtime: str = "auto", weights: str = "fp32") -> Loaded:
    """Prepare model for serving and choose what runs its forward: (model, forward, runtime's name, weights).

    "auto" takes ONNX Runtime when the model suits it (lmops.serve.ort.unsupported says why not) and
    falls back to PyTorch, saying why, if it does not or its session cannot be built; "onnxruntime"
    raises ValueError instead of falling back. weights int8 or int4: the decode graph's linears on
    quantized weights (lmops.serve.ort.quantize), an ONNX Runtime graph's only; a model on PyTorch
    decodes in its own precision ("torch" with int8 or int4 is refused, "auto" falling back says so).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: one of {', '.join(RUNTIMES)}")
    if weights not in ort.WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}: one of {', '.join(ort.WEIGHTS)}")
    if runtime == "torch" and weights != "fp32":
        raise ValueError(f"weights {weights} are the ONNX Runtime graph's: use runtime auto or onnxruntime")
    model = prepare(model)
    if runtime == "torch":
        return Loaded(model, model.forward_rows, "torch")
    if (reason := ort.unsupported(model)) is None:
        try:
            return Loaded(model, ort.OrtDecoder(model, weights=weights).forward_rows, "onnxruntime", weights)
        except Exception as err:
            if runtime == "onnxruntime":
                raise
            reason = f"{type(err).__name__}: {err}"
    if runtime == "onnxruntime":
        raise ValueError(f"cannot serve this model on onnxruntime: {reason}")
    log.warning("decoding on PyTorch, not onnxruntime%s: %s", f", so with its own weights, not {weights}"
                if weights != "fp32" else "", reason)
    return Loaded(model, model.forward_rows, "torch")


class Engine:
    """Continuous-batching inference over one GPT (see the module docstring).

    The engine takes the model over: `prepare` puts it in eval mode and lays out its weights for
    decoding, in place (same values). max_batch sequences run at once, max_waiting more may wait, and
    each step prefills at most prefill_chunk prompt tokens. runtime and weights: see `load` (the chosen
    ones are in `self.runtime` and `self.weights`). Building the ONNX Runtime session takes a moment: construct the engine, and call
    swap_model, off an event loop.
    """

    def __init__(self, model: GPT, max_batch: int = 8, max_waiting: int = 64, prefill_chunk: int = 256,
                 runtime: str = "auto", weights: str = "fp32"):
        if max_batch < 1 or max_waiting < 0 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1, max_waiting >= 0")
        self._wanted = runtime, weights  # as asked; self.runtime, self.weights: what load chose
        self.model, self._forward, self.runtime, self.weights = load(model, runtime, weights)
        self.max_batch, self.max_waiting, self.prefill_chunk = max_batch, max_waiting, prefill_chunk
        self._cond = threading.Condition()  # guards everything below that submit/cancel/score touch
        self._waiting: deque[RequestHandle] = deque()
        self._jobs: deque[Callable[[], None]] = deque()
        self._next_model: Loaded | None = None  # swap_model's
        self._closed = False  # stop() called: no new requests
        self._deadline: float | None = None  # stop(): cancel what is left after this time
        self._thread: threading.Thread | None = None
        self._threads = torch.get_num_threads()  # PyTorch's threads in the thread creating the engine
        self._threads_set = threading.Event()
        self._serving = False  # the engine thread is in its loop and will run queued jobs
        # engine-thread state: row i of the cache holds _running[i]; _joining is being prefilled in row n
        self._running: list[_Seq] = []
        self._joining: _Seq | None = None
        self._cache: SlotCache | None = None

    # ------------------------------------------------------------------ public API

    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None) -> RequestHandle:
        """Queue a request for the next step.

        Raises QueueFull when max_waiting requests already wait (not counting those that free rows will
        take at the next step, so a burst into an idle engine is not refused), EngineStopped after stop(),
        ValueError for an empty prompt, ids outside the vocabulary or a prompt over block_size.
        """
        params = params or SamplingParams()
        ids = [int(t) for t in prompt_ids]
        with self._cond:
            self._check_ids(ids, self._next_model.model if self._next_model else self.model)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        handle = RequestHandle(ids, params, loop, self._cancel)
        with self._cond:
            if self._closed:
                raise EngineStopped("the engine is stopping")
            free_rows = self.max_batch - len(self._running) - (self._joining is not None)
            if len(self._waiting) >= self.max_waiting + max(free_rows, 0):
                raise QueueFull(f"{len(self._waiting)} requests already waiting (max_waiting {self.max_waiting})")
            self._waiting.append(handle)
            self._cond.notify()
        return handle

    def score(self, ids: list[int], top_n: int = 0) -> list[tuple[float | None, dict[int, float] | None]]:
        """Log-probability of each token given the tokens before it, and the top_n most likely tokens
        there (None when top_n is 0); the first token has (None, None). Runs in the engine thread
        between steps when it is running, so it is safe to call from any thread (it blocks)."""
        ids = [int(t) for t in ids]
        with self._cond:
            self._check_ids(ids, self.model)
            if self._serving:
                future: concurrent.futures.Future = concurrent.futures.Future()
                self._jobs.append(lambda: self._run_job(future, ids, top_n))
                self._cond.notify()
            else:
                future = None
        if future is not None:
            return future.result()
        with torch.inference_mode():
            return self._score(ids, top_n)

    def load_model(self, model: GPT, weights: str | None = None) -> Loaded:
        """Prepare model and build its runtime as this engine would (at other weights if given), for
        swap_model. It takes a moment (an ONNX Runtime session): call it where waiting is fine, then
        swap_model where it is not."""
        return load(model, self._wanted[0], weights or self._wanted[1])

    def swap_model(self, model: GPT | Loaded) -> None:
        """Serve new requests with model: in-flight ones finish on the old model first (new ones wait).
        A GPT is loaded here, in the caller's thread (see load_model)."""
        loaded = model if isinstance(model, Loaded) else self.load_model(model)
        with self._cond:
            self._next_model = loaded
            self._cond.notify()

    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(running=len(self._running) + (self._joining is not None), waiting=len(self._waiting))

    def start(self) -> Engine:
        if self._thread is not None:
            raise RuntimeError("the engine was already started")
        self._serving = True
        self._thread = threading.Thread(target=self._loop, name="lmops-engine", daemon=True)
        self._thread.start()
        self._threads_set.wait()
        # ATen also keeps the last count set as the default of threads that start later: give it back
        torch.set_num_threads(self._threads)
        return self

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Refuse new requests, let the accepted ones (running and waiting) finish for up to
        drain_timeout seconds, then cancel the rest and end the engine thread."""
        with self._cond:
            self._closed = True
            self._deadline = time.monotonic() + drain_timeout
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        else:
            self._cancel_all()

    def step(self) -> None:
        """One engine iteration: jobs, cancellations, admission and prefill, one decode step.

        The engine thread calls it in a loop; tests call it directly (without start) to interleave
        requests deterministically.
        """
        if self._serving and threading.current_thread() is not self._thread:
            raise RuntimeError("the engine thread is running: do not call step() from elsewhere")
        _step.outbox = outbox = _Outbox()
        try:
            self._step()
        finally:
            _step.outbox = None
            outbox.flush()

    def _step(self) -> None:
        with self._cond:
            jobs = list(self._jobs)
            self._jobs.clear()
            swap = self._next_model if not self._running and self._joining is None else None
            if swap is not None:
                self._next_model = None
            expired = self._deadline is not None and time.monotonic() >= self._deadline
        for job in jobs:
            job()
        if expired:
            self._cancel_all()
            return
        if swap is not None:
            (self.model, self._forward, self.runtime, self.weights) = swap
            self._cache = None  # a new config, device or dtype needs a new cache
            self._set_threads()  # (the rare swap onto another runtime leaves ATen's default for new threads at it)
        self._drop_cancelled()
        self._prefill()
        self._decode()

    # ------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        try:
            self._set_threads()
        finally:
            self._threads_set.set()
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._jobs or self._waiting or self._running or self._joining
                               or self._next_model is not None):
                        if self._closed:  # stopped and drained (or cancelled at the deadline)
                            self._serving = False
                            return
                        self._cond.wait()
                try:
                    self.step()
                except Exception as err:  # a bug: fail what is in flight rather than hang every client
                    log.exception("engine step failed")
                    self._fail_all(f"{type(err).__name__}: {err}")

    def _set_threads(self) -> None:
        """The engine thread's own PyTorch threads: all of them when PyTorch runs the forward, one when
        ONNX Runtime does. Then PyTorch only samples and moves small tensors, and two OpenMP threads
        contending with ONNX Runtime's (spinning) pool for the same cores made a sampled decode step
        2.5x slower (measured on 2 cores). With OpenMP, torch.set_num_threads applies to the calling
        thread (and becomes the default of threads started later: `start` restores that)."""
        if threading.current_thread() is self._thread:
            want = 1 if self.runtime == "onnxruntime" else self._threads
            if torch.get_num_threads() != want:
                torch.set_num_threads(want)

    def _cache_for_model(self) -> SlotCache:
        if self._cache is None:
            w = self.model.embed.weight
            self._cache = SlotCache(self.model.cfg, self.max_batch, w.device, w.dtype)
        return self._cache

    def _admit(self) -> RequestHandle | None:
        """The next waiting request, unless the batch is full or a model swap waits for it to drain."""
        with self._cond:
            if self._next_model is not None:
                return None
            return self._waiting.popleft() if self._waiting else None

    def _prefill(self) -> None:
        """Admit and prefill waiting requests, up to prefill_chunk prompt tokens in this step."""
        budget = self.prefill_chunk
        while budget > 0:
            if self._joining is None:
                if len(self._running) >= self.max_batch or (handle := self._admit()) is None:
                    return
                self._joining = self._start(handle)
                if self._joining is None:
                    continue
            seq, row = self._joining, len(self._running)
            prompt = seq.handle.prompt_ids
            n = min(budget, len(prompt) - seq.pos)
            cache = self._cache_for_model()
            cache.select(row, [seq.pos])
            idx = torch.tensor([prompt[seq.pos:seq.pos + n]], device=cache.k.device)
            try:
                logits = self._forward(idx, cache)
            except Exception as err:
                log.exception("prefill failed")
                self._joining = None
                seq.handle._finish("error", f"{type(err).__name__}: {err}")
                continue
            seq.pos += n
            budget -= n
            if seq.pos == len(prompt):  # prefilled: its first token, then it decodes with the others
                self._joining = None
                self._running.append(seq)
                self._advance([seq], logits, row)

    def _start(self, handle: RequestHandle) -> _Seq | None:
        """A request joins the batch; None when it is already done (max_tokens 0, no room in the context)."""
        handle.started_at = time.monotonic()
        p = handle.params
        limit = min(p.max_tokens, self.model.cfg.block_size - len(handle.prompt_ids))
        if limit <= 0:
            handle._finish("length")
            return None
        rng = random.Random(p.seed) if p.temperature > 0 else None  # seed None: seeded from the OS
        return _Seq(handle, limit, rng, stop=frozenset(p.stop_token_ids))

    def _decode(self) -> None:
        """One token for every running sequence, in one forward."""
        seqs = self._running
        if not seqs:
            return
        cache = self._cache_for_model()
        cache.select(0, [s.pos for s in seqs])
        idx = torch.tensor([[s.last] for s in seqs], device=cache.k.device)
        try:
            logits = self._forward(idx, cache)
        except Exception as err:
            log.exception("decode step failed")
            self._fail_all(f"{type(err).__name__}: {err}")
            return
        for s in seqs:
            s.pos += 1
        self._advance(list(seqs), logits, 0)

    def _advance(self, seqs: list[_Seq], logits: torch.Tensor, row0: int) -> None:
        """Choose each sequence's next token from its logits row, deliver it, retire finished ones."""
        tokens = logits.argmax(dim=-1).tolist()
        failed: dict[int, str] = {}  # row -> why sampling failed for it alone
        if rows := [i for i, seq in enumerate(seqs) if seq.rng is not None]:  # sampled rows, all in one go
            # each row's uniform from its own stream: 24 bits, exact in float32 and < 1
            uniforms = [seqs[i].rng.getrandbits(24) / 2**24 for i in rows]
            try:
                picked = self._sample(logits, seqs, rows, uniforms)
            except Exception:  # a row's parameters the sampler cannot take: find it, fail it alone
                picked = []
                for i, u in zip(rows, uniforms):
                    try:
                        picked += self._sample(logits, seqs, [i], [u])
                    except Exception as err:
                        log.exception("sampling failed for one request")
                        failed[i] = f"{type(err).__name__}: {err}"
                        picked.append(-1)
            for i, token in zip(rows, picked):
                tokens[i] = token
        finished: list[tuple[int, str]] = []
        now = time.monotonic()
        for i, seq in enumerate(seqs):
            p, handle = seq.handle.params, seq.handle
            token = tokens[i]
            if i in failed:
                finished.append((row0 + i, "error"))
                continue
            if token in seq.stop:
                finished.append((row0 + i, "stop"))
                continue
            event = TokenEvent(token)
            if p.logprobs is not None:
                logprobs = F.log_softmax(logits[i].float(), dim=-1)
                top = None
                if p.logprobs > 0:
                    values, ids = logprobs.topk(min(p.logprobs, logprobs.numel()))
                    top = dict(zip(ids.tolist(), values.tolist()))
                event = TokenEvent(token, logprobs[token].item(), top)
            seq.last = token
            handle.completion_tokens += 1
            if handle.first_token_at is None:
                handle.first_token_at = now
            handle._put(event)
            if handle.completion_tokens >= seq.limit:
                finished.append((row0 + i, "length"))
        for row, reason in reversed(finished):  # highest row first: moves never touch a row still to retire
            self._leave(row)._finish(reason, failed.get(row - row0))

    def _sample(self, logits: torch.Tensor, seqs: list[_Seq], rows: list[int], uniforms: list[float]) -> list[int]:
        """The sampled token of each of rows, in one go."""
        params = [seqs[i].handle.params for i in rows]
        device, vocab = logits.device, logits.shape[-1]
        picked = sample(logits[rows], torch.tensor([p.temperature for p in params], device=device),
                        # a top_k at or above the vocabulary keeps every token, as 0 does
                        torch.tensor([min(p.top_k or 0, vocab) for p in params], device=device),
                        torch.tensor([p.top_p or 1.0 for p in params], device=device),
                        uniform=torch.tensor(uniforms, device=device))
        return picked.view(-1).tolist()

    def _leave(self, row: int) -> RequestHandle:
        """Free a running sequence's row: the last running row moves into it, the prefilling one follows."""
        handle = self._running[row].handle
        last = len(self._running) - 1
        moved = self._running.pop()
        if row != last:
            self._running[row] = moved
            self._cache.move(last, row, moved.pos)
        if self._joining is not None:
            self._cache.move(last + 1, last, self._joining.pos)
        return handle

    def _drop_cancelled(self) -> None:
        for row in reversed(range(len(self._running))):
            if self._running[row].handle.cancelled:
                self._leave(row)._finish("cancelled")
        if self._joining is not None and self._joining.handle.cancelled:
            self._joining.handle._finish("cancelled")
            self._joining = None

    def _cancel(self, handle: RequestHandle) -> None:
        """RequestHandle.cancel: a waiting request finishes now; a running one at the next step."""
        with self._cond:
            try:
                self._waiting.remove(handle)
            except ValueError:
                self._cond.notify()
                return
        handle._finish("cancelled")

    def _cancel_all(self) -> None:
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        for seq in self._running + [self._joining] * (self._joining is not None):
            seq.handle._finish("cancelled")
        self._running, self._joining = [], None
        for handle in waiting:
            handle._finish("cancelled")

    def _fail_all(self, error: str) -> None:
        for seq in self._running + [self._joining] * (self._joining is not None):
            seq.handle._finish("error", error)
        self._running, self._joining = [], None

    # ------------------------------------------------------------------ scoring

    def _run_job(self, future: concurrent.futures.Future, ids: list[int], top_n: int) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(self._score(ids, top_n))
        except Exception as err:
            future.set_exception(err)

    def _score(self, ids: list[int], top_n: int) -> list[tuple[float | None, dict[int, float] | None]]:
        device = self.model.embed.weight.device
        logprobs = F.log_softmax(self.model(torch.tensor([ids], device=device))[0, :-1].float(), dim=-1)
        chosen = logprobs.gather(1, torch.tensor(ids[1:], dtype=torch.long, device=device)[:, None])[:, 0].tolist()
        tops: list[dict[int, float] | None] = [None] * len(chosen)
        if top_n > 0:
            values, indices = logprobs.topk(min(top_n, logprobs.shape[-1]), dim=-1)
            tops = [dict(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
        return [(None, None)] + list(zip(chosen, tops))

    @staticmethod
    def _check_ids(ids: list[int], model: GPT) -> None:
        cfg = model.cfg
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        if len(ids) > cfg.block_size:
            raise ValueError(f"{len(ids)} tokens exceed the model's context of {cfg.block_size}")
        if min(ids) < 0 or max(ids) >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size})")
