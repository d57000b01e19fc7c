"""Tokenizers round-trip exactly, load in transformers, and the encoded corpus splits as nanoGPT's."""

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
    encode_corpus,
    encode_text,
    load_meta,
    load_tokenizer,
    load_tokens,
    save_tokenizer,
    split_point,
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


def test_encode_corpus_split_bytes_and_meta(tmp_path: Path) -> None:
    docs = ["première ligne\nsecond line\n" * 20, "日本語 " * 30, "last doc 😀\n" * 10]
    tok = train_tokenizer(docs, "char")
    meta = encode_corpus(tok, docs, tmp_path, val_fraction=0.25)
    text = EOT.join(docs)
    n_train = int(len(text) * 0.75)
    train_text, val_text = text[:n_train], text[n_train:]
    assert EOT not in val_text[:5]  # the cut is not inside an EOT here; see test_split_never_cuts_eot
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
    assert tok.decode(np.concatenate([train, val]).tolist(), skip_special_tokens=False) == text
    assert np.array_equal(np.memmap(tmp_path / "train.bin", dtype="uint16", mode="r"), train)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_encode_corpus_bpe(tmp_path: Path) -> None:
    docs = [ENGLISH, UNICODE]
    tok = train_tokenizer(docs, "bpe", vocab_size=300)
    meta = encode_corpus(tok, docs, tmp_path, val_fraction=0.1)
    assert meta["kind"] == "bpe"
    ids = np.concatenate([load_tokens(tmp_path, "train"), load_tokens(tmp_path, "val")]).tolist()
    assert tok.decode(ids, skip_special_tokens=False) == EOT.join(docs)
    assert meta["train_bytes"] + meta["val_bytes"] == len(EOT.join(docs).encode())


def test_split_never_cuts_eot() -> None:
    text = "a" * 10 + EOT + "b" * 10
    for fraction in (0.4, 0.5, 0.6):
        n = split_point(text, fraction)
        assert EOT in text[:n] or EOT in text[n:]
    assert split_point(text, 0.5) == 10 + len(EOT)  # int(33 * 0.5) = 16 falls inside it
    assert split_point(text, 0.1) == int(len(text) * 0.9)  # after the EOT: left as it is


def test_dtype_choice() -> None:
    assert token_dtype(65) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_uint32_when_vocab_is_large(tmp_path: Path) -> None:
    # A char vocabulary past 65536 ids: 66000 code points from the CJK extension planes.
    text = "".join(chr(c) for c in range(0x20000, 0x20000 + 66000))
    tok = train_tokenizer([text], "char")
    assert tok.get_vocab_size() > 65536
    meta = encode_corpus(tok, [text[:2000]], tmp_path, val_fraction=0.1)
    assert meta["dtype"] == "uint32"
    assert load_tokens(tmp_path, "val").dtype == np.uint32


def test_load_tokens_errors(tmp_path: Path) -> None:
    with pytest.raises(LmopsError, match="meta.json"):
        load_tokens(tmp_path, "train")
    tok = train_tokenizer(["hello world"], "char")
    encode_corpus(tok, ["hello world"], tmp_path, val_fraction=0.5)
    (tmp_path / "val.bin").write_bytes(b"\x01")  # as if a run stopped half-way
    with pytest.raises(LmopsError, match="val.bin"):
        load_tokens(tmp_path, "val")
    with pytest.raises(LmopsError, match="val_fraction"):
        encode_corpus(tok, ["x"], tmp_path, val_fraction=1.0)


def test_empty_val_split(tmp_path: Path) -> None:
    tok = train_tokenizer(["abc"], "char")
    meta = encode_corpus(tok, ["abc"], tmp_path, val_fraction=0.0)
    assert meta["val_tokens"] == 0 and len(load_tokens(tmp_path, "val")) == 0


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is absent (kept in shared/data)")
def test_tinyshakespeare_matches_nanogpt(tmp_path: Path) -> None:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    tok = train_tokenizer([text], "char")
    assert tok.get_vocab_size() == 65 + 2  # nanoGPT's 65 characters, plus EOT and <unk>
    meta = encode_corpus(tok, [text], tmp_path, val_fraction=0.1)
    assert (meta["train_tokens"], meta["val_tokens"]) == (1003854, 111540)
    assert meta["train_bytes"] + meta["val_bytes"] == 1115394
    train = load_tokens(tmp_path, "train")
    assert tok.decode(train[:200].tolist()) == text[:200]
    # nanoGPT's ids are ours minus the two specials
    chars = sorted(set(text))
    assert (train[:1000].astype(np.int64) - 2).tolist() == [chars.index(c) for c in text[:1000]]
