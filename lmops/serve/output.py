"""A choice on its way out: token events in, text a client may see out, and logprobs in OpenAI's formats.

Choices a reader could make otherwise:
- Stop sequences are matched on text, not tokens: a stop string can end inside a BPE token, and clients
  expect the text cut exactly there (finish_reason "stop").
- A stream holds text back: the last len(longest stop) - 1 characters, which may be the start of a stop
  sequence, and, when completions are moderated, what moderation could still change as more text comes:
  the word or number being written, which may be the start of PII or of a blocklisted term
  (lmops.safety.unsettled), at most serve.moderation_holdback_chars characters; PII shorter than that is
  redacted before any of it is sent. Holding a fixed 64 characters instead cost every stream ~16 tokens
  of time to its first text (~200 ms at 32 streams of a 4 x 256 model). After its first text, a moderated
  stream releases text in steps of serve.moderation_interval_chars rather than at every token, as each
  moderation reads the whole completion so far.
- Text is decoded incrementally (Detokenizer): a character split across byte-level BPE tokens never
  reaches a client broken in two.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from lmops.safety import Moderation
from lmops.serve.engine import RequestHandle, TokenEvent


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

    handle: RequestHandle | Done
    detok: Detokenizer
    stops: list[str]
    moderate: Callable[[str], Moderation] | None
    holdback: int
    lstrip: bool = False  # chat: drop the space a model writes after "Assistant:"
    every: int = 1  # when moderated: release text once at least this many characters can go
    # when moderated: where the text moderation could still change begins (safety.unsettled); None: the
    # last `holdback` characters
    unsettled: Callable[[str], int] | None = None
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
        cut = len(text) if final else len(text) - max(max(map(len, self.stops), default=0) - 1, 0)
        if self.moderate is not None:
            if not final:
                cut = min(cut, self.unsettled(text) if self.unsettled else len(text) - self.holdback)
                # the first text goes as soon as any can (time to first token); then in steps
                if cut < len(self.sent) + (self.every if self.sent else 1):
                    return ""  # too little could be released yet: spare the regexes
            m = self.moderation = self.moderate(text)
            if m.action == "block":
                self.finish_reason = "content_filter"
                return ""
            # the cut, from the original text into the moderated one (where PII became placeholders)
            cut = m.position(cut) if m.findings or m.text == text else len(m.text) - (len(text) - cut)
            text = m.text
        # A redaction reaching back into text already sent cannot unsend it: send what follows.
        new = text[len(self.sent):max(len(self.sent), cut)]
        self.sent += new
        return new


class Done:
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


def _finite(x: float | None) -> float | None:
    """JSON has no infinity: an impossible token's log-probability (-inf) becomes -9999, as OpenAI's."""
    return x if x is None or math.isfinite(x) else -9999.0


def prompt_logprobs(tok: Tokenizer, ids: list[int], scored: list) -> dict:
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


def completion_logprobs(tok: Tokenizer, pieces: list[Piece], offset: int) -> dict:
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for piece in pieces:
        for ev, at in zip(piece.events, piece.offsets):
            out["tokens"].append(token_text(tok, ev.token_id))
            out["token_logprobs"].append(_finite(ev.logprob))
            out["top_logprobs"].append({token_text(tok, t): _finite(v) for t, v in (ev.top_logprobs or {}).items()})
            out["text_offset"].append(offset + at)
    return out


def chat_logprobs(tok: Tokenizer, pieces: list[Piece]) -> list[dict]:
    def entry(tid: int, lp: float | None) -> dict:
        text = token_text(tok, tid)
        return {"token": text, "logprob": _finite(lp), "bytes": list(text.encode("utf-8"))}

    return [{**entry(ev.token_id, ev.logprob),
             "top_logprobs": [entry(t, v) for t, v in (ev.top_logprobs or {}).items()]}
            for piece in pieces for ev in piece.events]
