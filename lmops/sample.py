"""Sampling text from a checkpoint: the tokenizer saved beside it turns text into ids and back."""

from __future__ import annotations

from pathlib import Path

import torch

from lmops.checkpoint import Checkpoint
from lmops.errors import LmopsError
from lmops.tokenizer import EOT, load_tokenizer
from lmops.train import resolve_device


def generate_text(path: Path, prompt: str, max_tokens: int = 200, temperature: float = 0.8, top_k: int | None = 200,
                  top_p: float | None = None, seed: int = 1337, num_samples: int = 1, device: str = "auto") -> list[str]:
    """num_samples continuations of prompt (the prompt included). Same seed, same text."""
    ckpt = Checkpoint(path)
    tok = load_tokenizer(ckpt.path.parent)
    dev = resolve_device(device)
    model = ckpt.model(dev)
    ids = tok.encode(prompt).ids
    if not ids:
        raise LmopsError("the prompt is empty after tokenization; give some text to continue")
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = model.generate(idx, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
    eot = tok.token_to_id(EOT)
    texts = []
    for row in out.tolist():
        if eot is not None and eot in row[len(ids):]:
            row = row[:len(ids) + row[len(ids):].index(eot)]
        texts.append(tok.decode(row, skip_special_tokens=False))
    return texts
