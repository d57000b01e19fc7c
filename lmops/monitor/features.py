"""What the monitor measures on each prompt and answer, as arrays a statistic can resample.

- PromptFeatures: per prompt its length in tokens, its token counts (a sparse row over the vocabulary),
  its character-class counts and the share of its characters the tokenizer left unmerged (tokens of
  one character: text the tokenizer has not seen enough of to merge).
- AnswerFeatures: per answer its length, stop reason, repetition (share of repeated word 3-grams) and
  whether moderation acted on the request.
- ModelFeatures: per text the served model's own numbers from one forward pass over prompt + answer:
  mean loss per prompt token, the mean-pooled last hidden state over the prompt (the embedding), and
  the mean log-probability of the answer's tokens (the model's confidence in what it said).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse

CHAR_CLASSES = ("letter", "digit", "space", "punctuation", "other")
MAX_PROMPT_CHARS = 8000  # the start of a prompt is read: drift shows in it, and a 1 MB prompt costs no more


def _class_table() -> np.ndarray:
    table = np.full(128, 4, np.int8)  # control characters: other
    for c in range(128):
        ch = chr(c)
        if ch.isalpha():
            table[c] = 0
        elif ch.isdigit():
            table[c] = 1
        elif ch.isspace():
            table[c] = 2
        elif 33 <= c <= 126:
            table[c] = 3
    return table


_CLASS = _class_table()


@dataclass(frozen=True)
class PromptFeatures:
    lengths: np.ndarray  # (n,) tokens
    tokens: sparse.csr_matrix  # (n, vocab) token counts
    chars: np.ndarray  # (n, 5) character-class counts
    unmerged: np.ndarray  # (n,) share of characters in one-character tokens

    def __len__(self) -> int:
        return len(self.lengths)

    def take(self, idx: np.ndarray) -> PromptFeatures:
        return PromptFeatures(self.lengths[idx], self.tokens[idx], self.chars[idx], self.unmerged[idx])


def prompt_features(texts: Sequence[str], tokenizer) -> PromptFeatures:
    texts = [t[:MAX_PROMPT_CHARS] for t in texts]
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []
    lengths = np.array([len(e.ids) for e in encodings], np.int64)
    ids = np.concatenate([np.asarray(e.ids, np.int64) for e in encodings]) if texts else np.zeros(0, np.int64)
    rows = np.repeat(np.arange(len(texts)), lengths)
    tokens = sparse.csr_matrix((np.ones(len(ids)), (rows, ids)), shape=(len(texts), tokenizer.get_vocab_size()))
    chars = np.zeros((len(texts), len(CHAR_CLASSES)), np.int64)
    unmerged = np.zeros(len(texts))
    for i, (text, enc) in enumerate(zip(texts, encodings)):
        codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        cls = np.where(codes < 128, _CLASS[np.minimum(codes, 127)], 4)
        chars[i] = np.bincount(cls, minlength=len(CHAR_CLASSES))
        spans = [e - s for s, e in enc.offsets if e > s]
        total = sum(spans)
        unmerged[i] = sum(1 for s in spans if s == 1) / total if total else 0.0
    return PromptFeatures(lengths, tokens, chars, unmerged)


@dataclass(frozen=True)
class AnswerFeatures:
    lengths: np.ndarray  # (n,) tokens
    stops: np.ndarray  # (n,) index into STOPS
    repetition: np.ndarray  # (n,)
    moderated: np.ndarray  # (n,) bool

    def __len__(self) -> int:
        return len(self.lengths)

    def take(self, idx: np.ndarray) -> AnswerFeatures:
        return AnswerFeatures(self.lengths[idx], self.stops[idx], self.repetition[idx], self.moderated[idx])


STOPS = ("stop", "length", "content_filter", "other")


def repetition(text: str) -> float:
    """Share of the word 3-grams of a text that repeat an earlier one (0: none, near 1: a loop)."""
    words = text.split()
    grams = list(zip(words, words[1:], words[2:]))
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def answer_features(rows: Sequence) -> AnswerFeatures:
    """From request-log rows with completion, completion_tokens, finish_reason and moderation."""
    def stop(reason: str | None) -> int:
        first = (reason or "").split(",")[0]
        return STOPS.index(first) if first in STOPS else len(STOPS) - 1

    return AnswerFeatures(
        np.array([r.completion_tokens or 0 for r in rows], np.int64),
        np.array([stop(r.finish_reason) for r in rows], np.int64),
        np.array([repetition(r.completion or "") for r in rows]),
        np.array([r.moderation is not None for r in rows], bool),
    )


@dataclass(frozen=True)
class ModelFeatures:
    prompt_nll: np.ndarray  # (n,) nats per prompt token (nan: a one-token prompt)
    embeddings: torch.Tensor  # (n, d)
    answer_logprob: np.ndarray  # (n,) mean log-probability per answer token (nan: no answer)

    def __len__(self) -> int:
        return len(self.prompt_nll)


@torch.no_grad()
def model_features(model, tokenizer, prompts: Sequence[str], answers: Sequence[str | None] | None = None,
                   max_tokens: int = 128, batch_size: int = 32) -> ModelFeatures:
    """One forward pass per batch of prompt (+ answer) sequences, right-padded (causal attention: the
    padding after a sequence changes nothing before it), sorted by length so batches waste little."""
    answers = answers if answers is not None else [None] * len(prompts)
    block = model.cfg.block_size
    seqs = []
    for p, a in zip(tokenizer.encode_batch([x[:MAX_PROMPT_CHARS] for x in prompts], add_special_tokens=False),
                    tokenizer.encode_batch([(x or "")[:MAX_PROMPT_CHARS] for x in answers], add_special_tokens=False)):
        pi = p.ids[:min(max_tokens, block)] or [0]
        ai = a.ids[:max(0, min(max_tokens, block - len(pi)))]
        seqs.append((pi, ai))
    n, d = len(seqs), model.cfg.d_model
    nll, conf = np.full(n, math.nan), np.full(n, math.nan)
    emb = torch.zeros(n, d)
    device = next(model.parameters()).device
    order = sorted(range(n), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
    for start in range(0, n, batch_size):
        batch = order[start:start + batch_size]
        width = max(len(seqs[i][0]) + len(seqs[i][1]) for i in batch)
        idx = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            ids = seqs[i][0] + seqs[i][1]
            idx[row, :len(ids)] = torch.tensor(ids)
        idx = idx.to(device)
        hidden = _hidden(model, idx)
        logp = F.log_softmax(model.lm_head(hidden).float(), dim=-1)
        target_lp = logp[:, :-1].gather(-1, idx[:, 1:, None])[..., 0].cpu()  # log p(token t+1 | ..t)
        hidden = hidden.float().cpu()
        for row, i in enumerate(batch):
            p, a = len(seqs[i][0]), len(seqs[i][1])
            emb[i] = hidden[row, :p].mean(0)
            if p > 1:
                nll[i] = -float(target_lp[row, :p - 1].mean())
            if a:
                conf[i] = float(target_lp[row, p - 1:p - 1 + a].mean())
    return ModelFeatures(nll, emb, conf)


def _hidden(model, idx: torch.Tensor) -> torch.Tensor:
    """The last hidden state after the final norm, (B, T, d): GPT.forward up to the output layer."""
    T = idx.shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    x = model.embed(idx)
    for block in model.blocks:
        x = block(x, cos, sin, None, None)
    return model.norm(x)
