"""Sampling text from a checkpoint: the tokenizer saved beside it turns text into ids and back."""

from __future__ import annotations

from pathlib import Path

import torch

from lmops.checkpoint import Checkpoint
from lmops.errors import LmopsError
from lmops.model import GPT
from lmops.tokenizer import EOT, load_tokenizer
from lmops.train import resolve_device


def continuations(model: GPT, tok, prompt: str, max_tokens: int, temperature: float = 0.8, top_k: int | None = None,
                  top_p: float | None = None, seed: int = 1337, num_samples: int = 1) -> list[str]:
    """num_samples continuations of prompt (without it), each cut at the end-of-document token. An
    empty prompt starts a new document. Same seed, same text."""
    dev = model.embed.weight.device
    eot = tok.token_to_id(EOT)
    ids = tok.encode(prompt).ids or ([eot] if eot is not None else [])
    if not ids:
        raise LmopsError("the prompt is empty after tokenization; give some text to continue")
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = model.generate(idx, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen,
                         stop_token=eot)
    texts = []
    for row in out[:, len(ids):].tolist():
        if eot is not None and eot in row:
            row = row[:row.index(eot)]
        texts.append(tok.decode(row, skip_special_tokens=False))
    return texts


def generate_text(path: Path, prompt: str, max_tokens: int = 200, temperature: float = 0.8, top_k: int | None = 200,
                  top_p: float | None = None, seed: int = 1337, num_samples: int = 1, device: str = "auto") -> list[str]:
    """num_samples continuations of prompt from the checkpoint at path (the prompt included)."""
    ckpt = Checkpoint(path)
    model = ckpt.model(resolve_device(device))
    tok = load_tokenizer(ckpt.path.parent)
    return [prompt + text for text in continuations(model, tok, prompt, max_tokens, temperature, top_k, top_p, seed,
                                                    num_samples)]
