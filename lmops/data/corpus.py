"""The corpus: the UTF-8 text files a tokenizer and a model are trained on.

Corpus problems are the first thing a new user hits, so every one of them (a typo in a path, a PDF
dropped in the folder, a Latin-1 file) stops with a one-line LmopsError naming the file and the fix,
before any time is spent on training. Files are read as bytes and decoded exactly: line endings and
whitespace are kept as they are, only a leading UTF-8 byte-order mark is dropped.
"""

from __future__ import annotations


import glob
import re
from dataclasses import dataclass
from pathlib import Path

from lmops.errors import LmopsError

TEXT_SUFFIXES = (".txt", ".md")
BOM = b"\xef\xbb\xbf"
DEMO_DIR = "python-docs"


@dataclass(frozen=True)
class Document:
    path: Path
    text: str


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file())


def corpus_files(paths: list[Path]) -> list[Path]:
    """Expand files, folders and glob patterns into the ordered list of files, each once."""
    if not paths:
        raise LmopsError("no corpus paths given: list files or folders under data.corpus in lmops.yaml")
    files: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = _text_files(path)
            if not found:
                raise LmopsError(
                    f"corpus folder {path} has no .txt or .md files: add some, or fix data.corpus in lmops.yaml"
                )
        elif _is_glob(str(path)):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not found:
                raise LmopsError(f"corpus pattern {path} matched no files: check data.corpus in lmops.yaml")
        else:
            raise LmopsError(f"corpus path {path} not found: check data.corpus in lmops.yaml")
        files.extend(found)
    seen: set[Path] = set()
    unique = []
    for f in files:  # a file listed twice (say, a folder and a file in it) would be trained on twice
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def read_text_file(path: Path) -> str:
    """One file as text, or an LmopsError saying why it is not UTF-8 text."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise LmopsError(f"cannot read corpus file {path}: {err.strerror or err}") from None
    nul = data.find(b"\x00")
    if nul != -1:
        raise LmopsError(
            f"corpus file {path} is binary (NUL byte at offset {nul}): remove it from the corpus, "
            "or convert it to plain text"
        )
    skip = len(BOM) if data.startswith(BOM) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        raise LmopsError(
            f"corpus file {path} is not UTF-8 (byte 0x{data[skip + err.start]:02x} at offset {skip + err.start}): "
            f"convert it, e.g. iconv -f latin1 -t utf-8 {path} > converted.txt"
        ) from None


def read_corpus(paths: list[Path]) -> list[Document]:
    """Every text file named by paths (files, folders, globs), in order; empty files are left out."""
    files = corpus_files(paths)
    docs = [Document(f, read_text_file(f)) for f in files]
    kept = [d for d in docs if d.text.strip()]
    if not kept:
        names = ", ".join(str(f) for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise LmopsError(f"corpus is empty: {names} (only empty or whitespace files); add text to train on")
    return kept


def demo_documents() -> dict[str, str]:
    """The documentation topics shipped with every CPython (79 topics, ~465 KB of English about Python).

    A corpus that needs no download, so `lmops` can be tried offline; sorted keys keep it identical
    from run to run on the same Python version.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split pydoc_data out of the standard library
        raise LmopsError(
            "this Python has no pydoc_data module for the demo corpus: install the full standard library, "
            "or point data.corpus at your own text"
        ) from None
    return {key: topics[key].strip() + "\n" for key in sorted(topics)}


def demo_corpus() -> str:
    """The demo documents as one text."""
    return "\n".join(demo_documents().values())


def write_demo_corpus(folder: Path) -> Path:
    """Write the demo corpus as folder/python-docs/<topic>.txt, one document per topic (so a
    split by document has documents on both sides); return that folder."""
    out = folder / DEMO_DIR
    out.mkdir(parents=True, exist_ok=True)
    for key, text in demo_documents().items():
        (out / f"{re.sub(r'[^A-Za-z0-9_-]', '_', key)}.txt").write_text(text, encoding="utf-8", newline="\n")
    return out
