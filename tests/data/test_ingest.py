"""Ingest: every source format, cleaning, filters, PII, duplicates, quarantine, gates and the report."""

from __future__ import annotations

import csv
import gzip
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from lmops.config import DataConfig, SafetyConfig
from lmops.data.ingest import check_gates, clean_text, ingest, render_report
from lmops.errors import LmopsError

WORDS = ("time river stone light garden window letter morning winter city music paper silver voice "
         "forest bridge candle mountain harbor meadow lantern orchard thunder valley whisper").split()


def prose(seed: int, n_words: int = 300) -> str:
    """Distinct, letter-rich text: unrelated for different seeds."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) + rng.choice(["", "s", "ed", "ing"]) for _ in range(n_words)]
    lines = [" ".join(words[i : i + 12]).capitalize() + "." for i in range(0, n_words, 12)]
    return "\n".join(lines)


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def run(tmp_path: Path, sources: list[str], data: DataConfig | None = None, safety: SafetyConfig | None = None):
    return ingest(sources, data or DataConfig(), safety or SafetyConfig(), tmp_path, tmp_path / "out")


def jsonl(*records: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_every_format_and_its_gzip(tmp_path):
    texts = {i: prose(i) for i in range(12)}
    c = tmp_path / "corpus"
    write(c / "a.txt", texts[0])
    write(c / "b.md", texts[1])
    write(c / "c.jsonl", jsonl({"text": texts[2], "meta": 1}, {"text": texts[3]}))
    with open(c / "d.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "text"], [1, texts[4]], [2, texts[5]]])
    pq.write_table(pa.table({"text": [texts[6], texts[7]], "n": [1, 2]}), c / "e.parquet")
    write(c / "gz" / "f.txt.gz", gzip.compress(texts[8].encode()))
    write(c / "gz" / "g.jsonl.gz", gzip.compress(jsonl({"text": texts[9]}).encode()))
    write(c / "gz" / "h.md.gz", gzip.compress(texts[10].encode()))
    write(c / "gz" / "i.csv.gz", gzip.compress(f"text\n\"{texts[11]}\"\n".encode()))
    write(c / "image.png", b"\x89PNG\r\n\x1a\n\x00")
    write(c / ".hidden" / "x.txt", prose(99))  # hidden folders (.git, .lmops) are never read
    result = run(tmp_path, ["corpus"])
    assert [d.text for d in result.documents] == [texts[i] for i in range(12)]
    assert [d.source for d in result.documents] == [
        "corpus/a.txt", "corpus/b.md", "corpus/c.jsonl:1", "corpus/c.jsonl:2",
        "corpus/d.csv:2", f"corpus/d.csv:{3 + texts[4].count(chr(10))}",  # a CSV row is named by its first line
        "corpus/e.parquet:1", "corpus/e.parquet:2", "corpus/gz/f.txt.gz", "corpus/gz/g.jsonl.gz:1",
        "corpus/gz/h.md.gz", "corpus/gz/i.csv.gz:2",
    ]
    report = result.report
    assert report["skipped"] == [{"path": "corpus/image.png", "reason": "unsupported file type"}]
    assert [s["format"] for s in report["sources"]] == [
        "txt", "md", "jsonl", "csv", "parquet", "txt.gz", "jsonl.gz", "md.gz", "csv.gz"]
    assert all(len(s["sha256"]) == 64 for s in report["sources"])
    json.dumps(report)  # JSON-serialisable as it is
    Console(file=open(tmp_path / "table.txt", "w"), width=120).print(render_report(report))


def test_text_field_and_csv_column_settings(tmp_path):
    write(tmp_path / "a.jsonl", jsonl({"content": prose(1)}))
    write(tmp_path / "b.csv", f"body\n\"{prose(2)}\"\n")
    pq.write_table(pa.table({"content": [prose(3)]}), tmp_path / "c.parquet")
    result = run(tmp_path, ["a.jsonl", "b.csv", "c.parquet"], DataConfig(text_field="content", csv_column="body"))
    assert [d.text for d in result.documents] == [prose(1), prose(2), prose(3)]


def test_sources_globs_and_errors(tmp_path):
    write(tmp_path / "a" / "one.txt", prose(1))
    write(tmp_path / "a" / "two.txt", prose(2))
    write(tmp_path / "notes.docx", "x")
    assert [d.source for d in run(tmp_path, ["a/*.txt", "a/one.txt"]).documents] == ["a/one.txt", "a/two.txt"]
    assert [d.source for d in run(tmp_path, [str(tmp_path / "a" / "two.txt")]).documents] == ["a/two.txt"]
    for sources, message in [
        (["notes.docx"], "corpus file notes.docx has an unsupported type"),
        (["missing"], "corpus path missing not found"),
        (["*.nothing"], "matched no files"),
        ([], "no corpus sources given"),
    ]:
        with pytest.raises(LmopsError, match=message) as info:
            run(tmp_path, sources)
        assert "\n" not in str(info.value)


def test_cleaning():
    raw = "  Cafe\u0301 \x00bell\x07 ok \r\nline two   \t\r\n\r\n\r\n\r\n\r\nthird\ttab\rold mac  \n\n"
    assert clean_text(raw) == "Caf\u00e9 bell ok\nline two\n\n\nthird\ttab\nold mac"


def test_filters_are_counted_per_rule(tmp_path):
    docs = {
        "empty": " \n\t ",
        "short": "Too short.",
        "long": prose(1, 2000),
        "digits": "1234 5678 9012 " * 20,
        "repeats": "Buy now at the best price!\n" * 20 + "Once.",
        "blocked": prose(2) + " frobnicate",
        "good": prose(3),
    }
    write(tmp_path / "d.jsonl", jsonl(*({"text": t} for t in docs.values())))
    data = DataConfig(max_chars=5000, scrub_pii=False)
    result = run(tmp_path, ["d.jsonl"], data, SafetyConfig(blocklist=["Frobnicate"]))
    assert [d.text for d in result.documents] == [docs["good"]]
    assert result.report["removed"] == {
        "empty": 1, "min_chars": 1, "max_chars": 1, "min_alpha_fraction": 1, "max_repeated_line_fraction": 1,
        "blocklist": 1, "exact_duplicate": 0, "near_duplicate": 0,
    }
    assert result.report["documents_in"] == 7 and result.report["documents_out"] == 1


def test_pii_is_scrubbed_and_counted(tmp_path):
    text = prose(1) + "\nWrite to jane@example.com or call +1 555 123 4567 from 10.0.0.1 with key AKIAIOSFODNN7EXAMPLE."
    write(tmp_path / "a.txt", text)
    result = run(tmp_path, ["a.txt"])
    assert result.documents[0].text.endswith("Write to [EMAIL] or call [PHONE] from [IP] with key [SECRET].")
    assert result.report["pii"] == {"email": 1, "phone": 1, "ip": 1, "credit_card": 0, "secret": 1}
    kept = run(tmp_path, ["a.txt"], DataConfig(scrub_pii=False))
    assert kept.documents[0].text == text and sum(kept.report["pii"].values()) == 0
    only_ip = run(tmp_path, ["a.txt"], safety=SafetyConfig(pii_kinds=["ip"]))
    assert "jane@example.com" in only_ip.documents[0].text and "[IP]" in only_ip.documents[0].text


def edit_words(text: str, fraction: float, seed: int) -> str:
    words = text.split(" ")
    rng = random.Random(seed)
    for i in rng.sample(range(len(words)), max(1, int(len(words) * fraction))):
        words[i] = "CHANGED"
    return " ".join(words)


def test_exact_and_near_duplicates(tmp_path):
    base = prose(1, 3000)
    write(tmp_path / "c" / "1-base.txt", base)
    write(tmp_path / "c" / "2-copy.txt", base + "\n\n\n\n")  # the same once cleaned
    write(tmp_path / "c" / "3-edited.txt", edit_words(base, 0.01, seed=0))
    write(tmp_path / "c" / "4-other.txt", prose(2, 3000))  # same vocabulary, unrelated text
    result = run(tmp_path, ["c"])
    assert [d.source for d in result.documents] == ["c/1-base.txt", "c/4-other.txt"]
    dups = {d["source"]: d for d in result.report["duplicates"]}
    assert dups["c/2-copy.txt"]["rule"] == "exact_duplicate"
    assert dups["c/3-edited.txt"]["rule"] == "near_duplicate" and dups["c/3-edited.txt"]["similarity"] > 0.8
    assert {d["duplicate_of_source"] for d in dups.values()} == {"c/1-base.txt"}
    assert dups["c/3-edited.txt"]["duplicate_of"] == result.documents[0].id
    assert result.report["removed"]["exact_duplicate"] == 1 and result.report["removed"]["near_duplicate"] == 1
    assert result.report["duplicate_ratio"] == 0.5
    assert check_gates(result.report, DataConfig()) == []


def test_quarantine_keeps_going_and_says_why(tmp_path):
    c = tmp_path / "corpus"
    write(c / "good.txt", prose(1))
    write(c / "latin1.txt", prose(2).encode() + "caf\xe9".encode("latin-1"))
    write(c / "binary.txt", b"%PDF-1.4\x00\x01")
    write(c / "broken.txt.gz", gzip.compress(prose(3).encode())[:40])
    write(c / "notgzip.jsonl.gz", b"this is not gzip")
    bad_lines = b'{not json\n' + jsonl({"body": "x"}, [1, 2]).encode() + b'{"text": "caf\xe9"}\n'
    write(c / "lines.jsonl", jsonl({"text": prose(4)}).encode() + bad_lines + jsonl({"text": prose(5)}).encode())
    write(c / "bad.parquet", b"PAR1 not really parquet")
    write(c / "nocol.csv", "a,b\n1,2\n")
    result = run(tmp_path, ["corpus"])
    assert [d.source for d in result.documents] == ["corpus/good.txt", "corpus/lines.jsonl:1", "corpus/lines.jsonl:6"]
    reasons = {q["source"]: q["reason"] for q in result.report["quarantined"]}
    assert reasons == {
        "corpus/bad.parquet": reasons["corpus/bad.parquet"],
        "corpus/binary.txt": "binary, not text (NUL byte at offset 8)",
        "corpus/broken.txt.gz": reasons["corpus/broken.txt.gz"],
        "corpus/latin1.txt": f"not UTF-8 (byte 0xe9 at offset {len(prose(2)) + 3})",
        "corpus/lines.jsonl:2": "invalid JSON (Expecting property name enclosed in double quotes at column 2)",
        "corpus/lines.jsonl:3": "no string field 'text' (data.text_field)",
        "corpus/lines.jsonl:4": "no string field 'text' (data.text_field)",
        "corpus/lines.jsonl:5": "not UTF-8 (byte 0xe9 at column 14)",
        "corpus/nocol.csv": "no column 'text' (data.csv_column; columns: a, b)",
        "corpus/notgzip.jsonl.gz": reasons["corpus/notgzip.jsonl.gz"],
    }
    assert reasons["corpus/bad.parquet"].startswith("unreadable parquet")
    assert reasons["corpus/broken.txt.gz"].startswith("bad gzip")
    assert reasons["corpus/notgzip.jsonl.gz"].startswith("bad gzip")
    assert result.report["quarantined_count"] == 10
    q = tmp_path / "out" / "quarantine" / "corpus"
    assert (q / "latin1.txt").read_bytes() == (c / "latin1.txt").read_bytes()
    assert (q / "broken.txt.gz").read_bytes() == (c / "broken.txt.gz").read_bytes()
    assert (q / "lines.jsonl.bad-lines").read_bytes().splitlines() == (c / "lines.jsonl").read_bytes().splitlines()[1:5]


def test_gates(tmp_path):
    write(tmp_path / "a.txt", prose(1))
    write(tmp_path / "b.txt", prose(1))
    report = run(tmp_path, ["a.txt", "b.txt"]).report
    failures = check_gates(report, DataConfig(min_documents=2, max_duplicate_ratio=0.2))
    assert failures == [
        "1 document(s) kept, fewer than data.min_documents (2)",
        "duplicate ratio 0.50 is above data.max_duplicate_ratio (0.2): check for sources listed twice",
    ]
    assert check_gates(report, DataConfig()) == []


def test_empty_after_cleaning_names_the_rules(tmp_path):
    write(tmp_path / "d.jsonl", jsonl({"text": "   "}, {"text": "short"}, {"text": "1234567890 " * 5}))
    with pytest.raises(LmopsError) as info:
        run(tmp_path, ["d.jsonl"])
    assert str(info.value) == (
        "no documents left of 3 read: 1 empty after cleaning, 1 shorter than data.min_chars, "
        "1 fewer letters than data.min_alpha_fraction; relax those settings in lmops.yaml or add text"
    )
    write(tmp_path / "bad.txt", b"\xff\xfe")
    with pytest.raises(LmopsError, match=r"no documents could be read from 1 file\(s\): 1 quarantined \(first: bad.txt"):
        run(tmp_path, ["bad.txt"])


def test_output_folder_is_never_read(tmp_path):
    write(tmp_path / "a.txt", prose(1))
    write(tmp_path / "out" / "quarantine" / "old.txt", prose(2))
    assert [d.source for d in run(tmp_path, ["."]).documents] == ["a.txt"]
