"""The demo corpus: Python's own documentation, identical from run to run, one file per topic."""

from pathlib import Path

from lmops.data.demo import demo_corpus, demo_documents, write_demo_corpus


def test_demo_corpus_is_deterministic_and_sizable(tmp_path: Path) -> None:
    text = demo_corpus()
    assert text == demo_corpus()
    assert len(text) > 300_000 and "\n\n" in text
    path = write_demo_corpus(tmp_path / "corpus")
    files = sorted(path.glob("*.txt"))
    assert path.name == "python-docs" and len(files) > 50
    assert sorted(f.read_text(encoding="utf-8") for f in files) == sorted(demo_documents().values())
