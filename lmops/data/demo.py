"""The demo corpus: the documentation topics that ship with every CPython, so that lmops can be tried
(quickstart, tests, benchmarks) with no download."""

from __future__ import annotations

import re
from pathlib import Path

from lmops.errors import LmopsError

DEMO_DIR = "python-docs"


def demo_documents() -> dict[str, str]:
    """The topics of pydoc_data (79 topics, ~465 KB of English about Python), sorted by key so the corpus
    is identical from run to run on the same Python version."""
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
    """Write the demo corpus as folder/python-docs/<topic>.txt, one document per topic; return that folder."""
    out = Path(folder) / DEMO_DIR
    out.mkdir(parents=True, exist_ok=True)
    for key, text in demo_documents().items():
        (out / f"{re.sub(r'[^A-Za-z0-9_-]', '_', key)}.txt").write_text(text, encoding="utf-8", newline="\n")
    return out
