"""Tokenizers (Hugging Face `tokenizers`) and the corpus encoded as flat token files.

Two kinds, both exact (decode(encode(text)) == text, whitespace and newlines included):
- char: one token per character seen in the corpus, the classic baseline of nanoGPT's
  shakespeare_char (same vocabulary, ids shifted by the two special tokens). It is a BPE model with
  no merges, so it needs no code of ours at encode time; characters never seen map to <unk>.
- bpe: byte-level BPE as in GPT-2. Every byte is in the vocabulary, so nothing is ever unknown.

EOT (<|endoftext|>) is id 0 in both and separates documents. The saved folder (tokenizer.json plus
tokenizer_config.json) loads in `transformers` as a PreTrainedTokenizerFast with the same ids.

The encoded corpus is nanoGPT's format: train.bin and val.bin, raw uint16 (uint32 past 65536 ids)
token ids to np.memmap, plus meta.json saying how to read them and how many bytes of text they hold
(for bits per byte). Every file is written under a temporary name then renamed, and meta.json last,
so an interrupted run never leaves a half-written file under its final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Literal

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmops.errors import LmopsError
from lmops.util import first_line

EOT = "<|endoftext|>"
UNK = "<unk>"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"
SPLITS = ("train", "val")
TRAIN_HINT = "run `lmops tokenizer train` first"
ENCODE_HINT = "encode the dataset first (`lmops tokenizer train`)"

# encode_batch works on chunks of about this many characters, in parallel. A chunk ends only just
# before a single space or newline that has a non-space character on each side: a char tokenizer
# gives the same ids however the text is cut, and byte-level BPE does too at such a cut because its
# pre-tokenizer (the GPT-2 regex) always starts a new piece there, and merges never cross pieces.
CHUNK_CHARS = 1 << 14
CHUNKS_PER_BATCH = 256
PROGRESS_MIN_CHARS = 20_000_000  # about 10 s of encoding; below that a progress bar is noise
_CUT = re.compile(r"(?<=\S)(?=[ \n]\S)")


def train_tokenizer(
    texts: list[str], kind: Literal["char", "bpe"], vocab_size: int = 4096, min_frequency: int = 2
) -> Tokenizer:
    """A new tokenizer fit to texts. vocab_size and min_frequency apply to bpe only: char keeps every
    character it sees, because a character dropped as rare could never be written by the model."""
    if not any(texts):
        raise LmopsError("no text to train the tokenizer on: check data.corpus in lmops.yaml")
    if kind == "char":
        return _char_tokenizer(texts)
    if kind == "bpe":
        return _bpe_tokenizer(texts, vocab_size, min_frequency)
    raise LmopsError(f"tokenizer kind {kind!r} is unknown: use 'char' or 'bpe' (tokenizer.kind in lmops.yaml)")


def _char_tokenizer(texts: list[str]) -> Tokenizer:
    chars = sorted(set().union(*map(set, texts)))
    vocab = {EOT: 0, UNK: 1} | {c: i for i, c in enumerate(chars, start=2)}
    # No pre-tokenizer: the whole text is one "word" that BPE splits into characters and, having no
    # merges, leaves that way. Fuse joins decoded tokens with nothing between them.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([EOT, UNK])  # special in transformers too, so both encode "<unk>" alike
    return tok


def _bpe_tokenizer(texts: list[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    if vocab_size < 257:
        raise LmopsError(f"tokenizer.vocab_size {vocab_size} is too small for bpe: it needs 256 bytes + EOT")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tokenizer_kind(tok: Tokenizer) -> str:
    return "bpe" if isinstance(tok.pre_tokenizer, pre_tokenizers.ByteLevel) else "char"


def _tokenizer_json(tok: Tokenizer) -> str:
    return tok.to_str(pretty=True)


def tokenizer_sha256(tok: Tokenizer) -> str:
    """Hash of tokenizer.json as save_tokenizer writes it: ties encoded tokens to their tokenizer."""
    return hashlib.sha256(_tokenizer_json(tok).encode("utf-8")).hexdigest()


@contextmanager
def _atomic(path: Path) -> Iterator[IO[bytes]]:
    """A file that appears under path only once fully written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    with _atomic(path) as f:
        f.write(text.encode("utf-8"))


def save_tokenizer(tok: Tokenizer, folder: Path) -> Path:
    """Write folder/tokenizer.json and the tokenizer_config.json that transformers reads; return the former."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / TOKENIZER_FILE
    _write_text(path, _tokenizer_json(tok))
    hf_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOT,
        # transformers would otherwise "clean up" spaces before punctuation and break round trips.
        "clean_up_tokenization_spaces": False,
    }
    if tok.token_to_id(UNK) is not None:
        hf_config["unk_token"] = UNK
    _write_text(folder / "tokenizer_config.json", json.dumps(hf_config, indent=2) + "\n")
    return path


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer in path (a tokenizer.json, or the folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise LmopsError(f"{path}: no tokenizer here; {TRAIN_HINT}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for any bad file
        raise LmopsError(f"{path}: not a valid tokenizer ({first_line(err)}); run `lmops tokenizer train` again") from None


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    out, start = [], 0
    while start < len(text):
        cut = _CUT.search(text, start + size) if start + size < len(text) else None
        end = cut.start() if cut else len(text)
        out.append(text[start:end])
        start = end
    return out


def encode_text(tok: Tokenizer, text: str, dtype: np.dtype) -> np.ndarray:
    """Ids of text, encoded in parallel chunks (same ids as tok.encode(text), see CHUNK_CHARS)."""
    from rich.console import Console
    from rich.progress import Progress

    chunks = _chunks(text)
    parts: list[np.ndarray] = []
    with Progress(console=Console(stderr=True), transient=True, disable=len(text) < PROGRESS_MIN_CHARS) as bar:
        task = bar.add_task("encoding", total=len(text))
        for i in range(0, len(chunks), CHUNKS_PER_BATCH):
            batch = chunks[i : i + CHUNKS_PER_BATCH]
            parts.extend(np.asarray(e.ids, dtype=dtype) for e in tok.encode_batch(batch, add_special_tokens=False))
            bar.advance(task, sum(map(len, batch)))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def encode_splits(tok: Tokenizer, texts: dict[str, str], out_dir: Path) -> dict:
    """Encode the train and val texts into out_dir/{train,val}.bin and meta.json; return the meta."""
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    meta: dict = {
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "kind": tokenizer_kind(tok),
        "tokenizer_sha256": tokenizer_sha256(tok),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        part = texts[split]
        ids = encode_text(tok, part, dtype)
        with _atomic(out_dir / f"{split}.bin") as f:
            ids.tofile(f)
        meta[f"{split}_tokens"] = int(ids.size)
        meta[f"{split}_bytes"] = len(part.encode("utf-8"))
    _write_text(out_dir / META_FILE, json.dumps(meta, indent=2) + "\n")
    return meta


def load_meta(out_dir: Path) -> dict:
    path = Path(out_dir) / META_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmopsError(f"{path}: not found; {ENCODE_HINT}") from None
    except json.JSONDecodeError as err:
        raise LmopsError(f"{path}: not valid JSON ({err.msg}, line {err.lineno}); {ENCODE_HINT}") from None


def load_tokens(out_dir: Path, split: str) -> np.ndarray:
    """The token ids of split ('train' or 'val') as a read-only np.memmap (a plain empty array if none)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    meta = load_meta(out_dir)
    path = Path(out_dir) / f"{split}.bin"
    if not path.is_file():
        raise LmopsError(f"{path}: not found; {ENCODE_HINT}")
    dtype = np.dtype(meta["dtype"])
    expected = meta[f"{split}_tokens"] * dtype.itemsize
    if path.stat().st_size != expected:  # e.g. a run stopped between writing a .bin and meta.json
        raise LmopsError(
            f"{path}: {path.stat().st_size} bytes but meta.json says {expected}; {ENCODE_HINT} again"
        )
    if expected == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r")
