"""Reading a corpus: what is read, in what order, and a one-line error naming the file for each mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmops.data.corpus import Document, demo_corpus, demo_documents, read_corpus, write_demo_corpus
from lmops.errors import LmopsError


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def error(paths: list[Path]) -> str:
    with pytest.raises(LmopsError) as info:
        read_corpus(paths)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_file_is_read_exactly(tmp_path: Path) -> None:
    f = write(tmp_path / "a.txt", "line one\r\n  two\ttabs\n\nnaïve 😀\n")
    assert read_corpus([f]) == [Document(f, "line one\r\n  two\ttabs\n\nnaïve 😀\n")]


def test_bom_is_stripped(tmp_path: Path) -> None:
    f = write(tmp_path / "bom.txt", b"\xef\xbb\xbfhello")
    assert read_corpus([f])[0].text == "hello"


def test_folder_is_recursive_sorted_and_text_only(tmp_path: Path) -> None:
    write(tmp_path / "b.txt", "b")
    write(tmp_path / "a.md", "a")
    write(tmp_path / "sub" / "c.txt", "c")
    write(tmp_path / "image.png", b"\x89PNG\x00")
    write(tmp_path / "notes.csv", "x,y")
    docs = read_corpus([tmp_path])
    assert [d.path.relative_to(tmp_path).as_posix() for d in docs] == ["a.md", "b.txt", "sub/c.txt"]
    assert [d.text for d in docs] == ["a", "b", "c"]


def test_glob_and_duplicates(tmp_path: Path) -> None:
    write(tmp_path / "x" / "1.txt", "one")
    write(tmp_path / "x" / "deep" / "2.txt", "two")
    write(tmp_path / "x" / "3.log", "three")
    docs = read_corpus([Path(f"{tmp_path}/x/**/*.txt"), tmp_path / "x" / "1.txt"])
    assert [d.text for d in docs] == ["one", "two"]  # sorted; 1.txt, named twice, is read once
    assert [d.text for d in read_corpus([Path(f"{tmp_path}/x/*.log")])] == ["three"]


def test_empty_files_are_left_out(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", "text")
    write(tmp_path / "b.txt", " \n\t\n")
    assert [d.path.name for d in read_corpus([tmp_path])] == ["a.txt"]


def test_missing_path(tmp_path: Path) -> None:
    msg = error([tmp_path / "nope.txt"])
    assert "nope.txt" in msg and "not found" in msg and "data.corpus" in msg


def test_no_paths() -> None:
    assert "data.corpus" in error([])


def test_folder_without_text_files(tmp_path: Path) -> None:
    folder = tmp_path / "pdfs"
    write(folder / "paper.pdf", b"%PDF")
    msg = error([folder])
    assert "pdfs" in msg and ".txt" in msg


def test_glob_matching_nothing(tmp_path: Path) -> None:
    msg = error([Path(f"{tmp_path}/*.rst")])
    assert "*.rst" in msg and "matched no files" in msg


def test_binary_file(tmp_path: Path) -> None:
    f = write(tmp_path / "model.txt", b"abc\x00\x01\x02")
    msg = error([f])
    assert "model.txt" in msg and "binary" in msg and "offset 3" in msg


def test_non_utf8_file_names_the_offset(tmp_path: Path) -> None:
    f = write(tmp_path / "latin1.txt", "café au lait".encode("latin-1"))
    msg = error([f])
    assert "latin1.txt" in msg and "not UTF-8" in msg and "offset 3" in msg and "iconv" in msg


def test_non_utf8_offset_counts_the_bom(tmp_path: Path) -> None:
    f = write(tmp_path / "bom.txt", b"\xef\xbb\xbfab\xff")
    assert "offset 5" in error([f])


def test_empty_corpus(tmp_path: Path) -> None:
    write(tmp_path / "empty.txt", "")
    write(tmp_path / "blank.md", "\n  \n")
    msg = error([tmp_path])
    assert "empty" in msg and "empty.txt" in msg and "blank.md" in msg


def test_demo_corpus_is_deterministic_and_sizable(tmp_path: Path) -> None:
    text = demo_corpus()
    assert text == demo_corpus()
    assert len(text) > 300_000 and "\n\n" in text
    path = write_demo_corpus(tmp_path / "corpus")
    docs = read_corpus([path])
    assert path.name == "python-docs" and len(docs) > 50
    assert sorted(d.text for d in docs) == sorted(demo_documents().values())
