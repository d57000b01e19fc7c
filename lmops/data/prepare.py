"""Corpus -> tokenizer -> token shards, each redone only when its inputs changed.

The tokenizer is (re)trained when it is missing or its settings in lmops.yaml changed; the shards
are re-encoded when the corpus text, the tokenizer or the split changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from lmops.config import Config
from lmops.data.corpus import read_corpus
from lmops.tokenizer import encode_corpus, load_tokenizer, save_tokenizer, train_tokenizer
from lmops.workspace import Workspace

SETTINGS_FILE = "lmops-settings.json"


def _sha256(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def tokenizer_settings(cfg: Config) -> dict:
    return cfg.tokenizer.model_dump(mode="json")


def ensure_tokenizer(ws: Workspace, cfg: Config, docs: list[str] | None = None, force: bool = False,
                     log: Callable[[str], None] = print) -> Path:
    """Train the workspace tokenizer unless one with the same settings exists."""
    folder = ws.tokenizer_path.parent
    settings_file = folder / SETTINGS_FILE
    wanted = tokenizer_settings(cfg)
    if not force and ws.tokenizer_path.exists() and settings_file.exists():
        if json.loads(settings_file.read_text()) == wanted:
            return ws.tokenizer_path
        log("tokenizer settings changed in lmops.yaml: training it again")
    if docs is None:
        docs = [d.text for d in read_corpus([ws.resolve(p) for p in cfg.data.corpus])]
    log(f"training a {cfg.tokenizer.kind} tokenizer on {sum(map(len, docs)):,} characters")
    tok = train_tokenizer(docs, cfg.tokenizer.kind, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
    save_tokenizer(tok, folder)
    settings_file.write_text(json.dumps(wanted))
    log(f"tokenizer: {tok.get_vocab_size()} tokens -> {ws.tokenizer_path}")
    return ws.tokenizer_path


def prepare(ws: Workspace, cfg: Config, log: Callable[[str], None] = print) -> Path:
    """Make sure tokenizer and shards are current; return the shards' folder."""
    docs = [d.text for d in read_corpus([ws.resolve(p) for p in cfg.data.corpus])]
    tok_path = ensure_tokenizer(ws, cfg, docs, log=log)
    key = _sha256(*(d.encode("utf-8") for d in docs), tok_path.read_bytes(), str(cfg.data.val_fraction).encode())
    out = ws.tokens_dir
    key_file = out / "source.sha256"
    if key_file.exists() and key_file.read_text() == key and (out / "meta.json").exists():
        return out
    meta = encode_corpus(load_tokenizer(tok_path), docs, out, cfg.data.val_fraction)
    key_file.write_text(key)
    log(f"encoded {len(docs)} document(s): {meta['train_tokens']:,} training and {meta['val_tokens']:,} "
        f"validation tokens -> {out}")
    return out

