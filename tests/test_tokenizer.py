"""Tokenizers round-trip exactly, load in transformers, and a dataset's splits encode byte for byte."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from lmops.errors import LmopsError
from lmops.tokenizer import (
    EOT,
    UNK,
    _chunks,
    encode_splits,
    encode_text,
    load_meta,
    load_tokenizer,
    load_tokens,
    save_tokenizer,
    token_dtype,
    tokenizer_sha256,
    train_tokenizer,
)

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
UNICODE = "naïve café, Ærøskøbing — ¿qué?\n日本語のテキスト 😀👍🏽\n\n\tindented  twice   \r\nend "
ENGLISH = (
    "The quick brown fox jumps over the lazy dog.\nIt's a dog's life, isn't it?\n\n"
    "  Numbers 123 456, punctuation!? and    spaces.\n"
) * 40


def test_char_round_trip_and_vocab() -> None:
    tok = train_tokenizer([UNICODE, ENGLISH], "char")
    chars = set(UNICODE + ENGLISH)
    assert tok.get_vocab_size() == len(chars) + 2
    assert tok.token_to_id(EOT) == 0 and tok.token_to_id(UNK) == 1
    for text in (UNICODE, ENGLISH, " \n\n \r\n"):
        ids = tok.encode(text).ids
        assert len(ids) == len(text)  # one token per character
        assert tok.decode(ids) == text
    assert tok.encode("a€").ids == [tok.token_to_id("a"), 1]  # an unseen character is <unk>
    assert tok.encode(f"a{EOT}b").ids == [tok.token_to_id("a"), 0, tok.token_to_id("b")]


def test_bpe_round_trip_unicode() -> None:
    tok = train_tokenizer([ENGLISH, UNICODE], "bpe", vocab_size=400, min_frequency=2)
    assert tok.token_to_id(EOT) == 0
    assert 257 < tok.get_vocab_size() <= 400
    never_seen = "Ελληνικά,한국어, עברית, 🚀🧪 and a lone \u0301 accent"
    for text in (UNICODE, ENGLISH, never_seen, "  leading and trailing  \n"):
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
    assert len(tok.encode(ENGLISH).ids) < len(ENGLISH.encode()) / 2  # merges were learned
    assert tok.encode(f"x{EOT}y").ids[1] == 0


def test_bad_kind_and_empty_texts() -> None:
    with pytest.raises(LmopsError, match="kind"):
        train_tokenizer(["abc"], "word")  # type: ignore[arg-type]
    with pytest.raises(LmopsError, match="no text"):
        train_tokenizer(["", ""], "char")
    with pytest.raises(LmopsError, match="vocab_size"):
        train_tokenizer(["abc"], "bpe", vocab_size=100)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load_and_transformers(tmp_path: Path, kind: str) -> None:
    transformers = pytest.importorskip("transformers")
    tok = train_tokenizer([ENGLISH, UNICODE], kind, vocab_size=400)  # type: ignore[arg-type]
    folder = tmp_path / "tok"
    path = save_tokenizer(tok, folder)
    assert path == folder / "tokenizer.json"
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == tokenizer_sha256(tok)
    for loaded in (load_tokenizer(folder), load_tokenizer(path)):
        assert loaded.to_str() == tok.to_str()

    text = f"{ENGLISH[:120]}{EOT}{UNICODE} <unk> €"
    ours = tok.encode(text).ids
    for cls in (transformers.PreTrainedTokenizerFast, transformers.AutoTokenizer):
        hf = cls.from_pretrained(folder)
        assert hf.eos_token == EOT and hf.eos_token_id == 0
        assert hf(text)["input_ids"] == ours
        assert hf.decode(hf(UNICODE)["input_ids"]) == UNICODE


def test_load_missing_or_broken_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(LmopsError, match="lmops tokenizer train") as info:
        load_tokenizer(tmp_path)
    assert "tokenizer.json" in str(info.value)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(LmopsError, match="not a valid tokenizer"):
        load_tokenizer(bad)


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = train_tokenizer(["abc"], "char")
    save_tokenizer(tok, tmp_path)
    before = (tmp_path / "tokenizer.json").read_bytes()

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("lmops.tokenizer.os.replace", fail)
    with pytest.raises(OSError):
        save_tokenizer(train_tokenizer(["xyz"], "char"), tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_chunked_encoding_matches_whole_text() -> None:
    text = (ENGLISH + UNICODE + EOT) * 30 + "x" * 3000 + "\n\n  y  \n"
    chunks = _chunks(text, size=200)
    assert "".join(chunks) == text and len(chunks) > 20
    for kind in ("char", "bpe"):
        tok = train_tokenizer([ENGLISH, UNICODE], kind, vocab_size=500)  # type: ignore[arg-type]
        ids = encode_text(tok, text, np.dtype(np.uint32))
        assert ids.tolist() == tok.encode(text).ids


def test_encode_splits_bytes_and_meta(tmp_path: Path) -> None:
    docs = ["première ligne\nsecond line\n" * 20, "日本語 " * 30, "last doc 😀\n" * 10]
    tok = train_tokenizer(docs, "char")
    train_text, val_text = EOT.join(docs[:2]), docs[2]
    meta = encode_splits(tok, {"train": train_text, "val": val_text}, tmp_path)
    assert meta == load_meta(tmp_path)
    assert meta["dtype"] == "uint16" and meta["kind"] == "char"
    assert meta["vocab_size"] == tok.get_vocab_size()
    assert meta["train_bytes"] == len(train_text.encode("utf-8"))
    assert meta["val_bytes"] == len(val_text.encode("utf-8"))
    assert meta["tokenizer_sha256"] == tokenizer_sha256(tok)
    train, val = load_tokens(tmp_path, "train"), load_tokens(tmp_path, "val")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    assert train.tolist() == tok.encode(train_text).ids and val.tolist() == tok.encode(val_text).ids
    assert tok.decode(train.tolist(), skip_special_tokens=False) == train_text
    assert np.array_equal(np.memmap(tmp_path / "train.bin", dtype="uint16", mode="r"), train)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_encode_splits_bpe(tmp_path: Path) -> None:
    docs = [ENGLISH, UNICODE]
    tok = train_tokenizer(docs, "bpe", vocab_size=300)
    meta = encode_splits(tok, {"train": EOT.join(docs), "val": UNICODE}, tmp_path)
    assert meta["kind"] == "bpe"
    assert tok.decode(load_tokens(tmp_path, "train").tolist(), skip_special_tokens=False) == EOT.join(docs)
    assert meta["train_bytes"] == len(EOT.join(docs).encode())


def test_dtype_choice() -> None:
    assert token_dtype(65) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_uint32_when_vocab_is_large(tmp_path: Path) -> None:
    # A char vocabulary past 65536 ids: 66000 code points from the CJK extension planes.
    text = "".join(chr(c) for c in range(0x20000, 0x20000 + 66000))
    tok = train_tokenizer([text], "char")
    assert tok.get_vocab_size() > 65536
    meta = encode_splits(tok, {"train": text[:1800], "val": text[1800:2000]}, tmp_path)
    assert meta["dtype"] == "uint32"
    assert load_tokens(tmp_path, "val").dtype == np.uint32


def test_load_tokens_errors(tmp_path: Path) -> None:
    with pytest.raises(LmopsError, match="meta.json"):
        load_tokens(tmp_path, "train")
    tok = train_tokenizer(["hello world"], "char")
    encode_splits(tok, {"train": "hello", "val": " world"}, tmp_path)
    (tmp_path / "val.bin").write_bytes(b"\x01")  # as if a run stopped half-way
    with pytest.raises(LmopsError, match="val.bin"):
        load_tokens(tmp_path, "val")


def test_empty_val_split(tmp_path: Path) -> None:
    tok = train_tokenizer(["abc"], "char")
    meta = encode_splits(tok, {"train": "abc", "val": ""}, tmp_path)
    assert meta["val_tokens"] == 0 and len(load_tokens(tmp_path, "val")) == 0


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is absent (kept in shared/data)")
def test_tinyshakespeare_splits_and_encodes_as_nanogpt(tmp_path: Path) -> None:
    """Through the one data path (ingest -> dataset version -> tokenize): the one file is split inside
    itself at the line break after 90% (nanoGPT cuts at 90% of the characters, mid-line), and the char
    tokenizer has nanoGPT's 65 characters."""
    import shutil

    from lmops.config import override
    from lmops.data.ingest import clean_text
    from lmops.pipeline import prepare_data
    from lmops.workspace import init_workspace

    ws = init_workspace(tmp_path / "ws")
    shutil.copy(SHAKESPEARE, ws.root / "corpus" / "input.txt")
    data = prepare_data(ws, override(ws.config(), ["tokenizer.kind=char"]), log=lambda m: None)
    out = Path(data["tokens_dir"])
    meta = load_meta(out)
    tok = load_tokenizer(out)
    assert tok.get_vocab_size() == 65 + 2  # nanoGPT's 65 characters, plus EOT and <unk>
    text = SHAKESPEARE.read_text(encoding="utf-8")
    clean = clean_text(text)  # ingest's cleaning: trailing spaces and the final newline go
    assert len(text) - len(clean) == 5 and meta["train_bytes"] + meta["val_bytes"] == len(clean.encode())
    head = clean[:clean.index("\n", int(len(clean) * 0.9)) + 1]
    assert meta["train_tokens"] == len(head) and meta["val_tokens"] == len(clean) - len(head)
    assert abs(meta["train_tokens"] - 1003854) < 80  # nanoGPT's 90% cut, to within a line
    train = load_tokens(out, "train")
    chars = sorted(set(text))
    assert (train[:1000].astype(np.int64) - 2).tolist() == [chars.index(c) for c in text[:1000]]  # nanoGPT's ids + 2
