"""Dataset versions: content-addressed ids, stable splits, shards, loading by reference, diffs."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys

import pytest

from lmops.config import DataConfig, SafetyConfig
from lmops.data.dataset import (
    Doc, diff_datasets, doc_id, iter_documents, list_datasets, load_dataset, split_of, write_dataset,
)
from lmops.data.ingest import ingest
from lmops.errors import LmopsError


def doc(text: str, source: str = "corpus/a.txt") -> Doc:
    return Doc(doc_id(text), text, source)


def docs(n: int, start: int = 0) -> list[Doc]:
    return [doc(f"document number {i} " + "x" * (i % 7), f"corpus/{i}.txt") for i in range(start, start + n)]


REPORT = {"documents_out": 0, "duplicate_ratio": 0.0}


def test_same_input_same_id_and_idempotent(tmp_path):
    a = write_dataset(docs(20), REPORT, tmp_path, 0.2, None)
    b = write_dataset(docs(20), REPORT, tmp_path, 0.2, parent=a.id)  # parent and time are not content
    assert a.id == b.id and b.manifest["parent"] is None and len(a.id) == 64 and a.short_id == a.id[:12]
    assert [v.id for v in list_datasets(tmp_path)] == [a.id]
    assert not [p for p in (tmp_path / "datasets").iterdir() if p.name.startswith(".")]  # no temp folder left
    other_root = write_dataset(docs(20), REPORT, tmp_path / "elsewhere", 0.2, None)
    assert other_root.id == a.id


@pytest.mark.parametrize("change", ["text", "source", "order", "val_fraction", "dropped"])
def test_id_changes_with_content(tmp_path, change):
    base = docs(10)
    changed, val = list(base), 0.2
    if change == "text":
        changed[3] = doc(base[3].text + "!", base[3].source)
    elif change == "source":
        changed[3] = doc(base[3].text, "corpus/other.txt")
    elif change == "order":
        changed.reverse()
    elif change == "val_fraction":
        val = 0.3
    else:
        changed.pop()
    assert write_dataset(base, REPORT, tmp_path, 0.2, None).id != write_dataset(changed, REPORT, tmp_path, val, None).id


def test_layout_manifest_and_shards(tmp_path):
    items = docs(50)
    v = write_dataset(items, {"note": "kept as is"}, tmp_path, 0.2, None, shard_bytes=1000)
    assert v.path == tmp_path / "datasets" / v.id
    shards = v.manifest["shards"]
    assert len(shards) > 1 and all(s["bytes"] <= 1000 for s in shards)
    assert [s["file"] for s in shards] == [f"shard-{i:05d}.jsonl" for i in range(len(shards))]
    for s in shards:
        data = (v.path / s["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data.splitlines()) == s["documents"]
    first = json.loads((v.path / "shard-00000.jsonl").read_bytes().splitlines()[0])
    assert first == {"id": items[0].id, "text": items[0].text, "source": items[0].source}
    m = v.manifest
    assert m["totals"]["documents"] == 50 and m["totals"]["train"]["documents"] + m["totals"]["val"]["documents"] == 50
    assert [d["id"] for d in m["documents"]] == [d.id for d in items]
    assert all(d["split"] == split_of(d["id"], 0.2) and d["chars"] > 0 for d in m["documents"])
    assert v.report == {"note": "kept as is"}
    assert list(iter_documents(v)) == [(d.id, d.text) for d in items]
    val = list(iter_documents(v, "val"))
    assert 0 < len(val) < 50 and all(split_of(i, 0.2) == "val" for i, _ in val)
    assert len(val) + len(list(iter_documents(v, "train"))) == 50


def test_split_by_hash_is_stable_when_documents_are_added(tmp_path):
    old = write_dataset(docs(200), REPORT, tmp_path, 0.1, None)
    new = write_dataset(docs(300, start=0)[::-1], REPORT, tmp_path, 0.1, parent=old.id)  # more, reordered
    old_split = {d["id"]: d["split"] for d in old.manifest["documents"]}
    new_split = {d["id"]: d["split"] for d in new.manifest["documents"]}
    assert all(new_split[i] == s for i, s in old_split.items())
    assert 5 < sum(s == "val" for s in new_split.values()) < 60  # about 10%
    assert new.manifest["parent"] == old.id


def test_load_by_id_prefix_and_latest(tmp_path):
    with pytest.raises(LmopsError, match="no dataset versions in .*: ingest a corpus first"):
        load_dataset(tmp_path, "latest")
    a = write_dataset(docs(5), REPORT, tmp_path, 0.2, None)
    b = write_dataset(docs(6), REPORT, tmp_path, 0.2, a.id)
    assert load_dataset(tmp_path, a.id).id == a.id
    assert load_dataset(tmp_path, b.id[:8].upper()).id == b.id
    assert load_dataset(tmp_path, "latest").id == b.id
    assert [v.id for v in list_datasets(tmp_path)] == [a.id, b.id]
    with pytest.raises(LmopsError, match="no dataset 'zzz'"):
        load_dataset(tmp_path, "zzz")
    for i in range(20):  # with 22 versions, some pair shares its first hex digit
        write_dataset(docs(1, start=100 + i), REPORT, tmp_path, 0.2, None)
    firsts = [v.id[0] for v in list_datasets(tmp_path)]
    shared = next(c for c in firsts if firsts.count(c) > 1)
    with pytest.raises(LmopsError, match=f"dataset prefix '{shared}' matches .* give more characters"):
        load_dataset(tmp_path, shared)


def test_duplicate_documents_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        write_dataset([doc("same"), doc("same", "corpus/b.txt")], REPORT, tmp_path, 0.1, None)


def prose(seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega", "sigma", "theta"]) for _ in range(200))


def test_ingest_twice_gives_the_same_version_and_a_changed_doc_a_new_one(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(prose(i))

    def version():
        result = ingest(["corpus"], DataConfig(), SafetyConfig(), tmp_path, tmp_path / "out")
        return write_dataset(result.documents, result.report, tmp_path / "out", 0.25, None)

    first = version()
    assert version().id == first.id
    (corpus / "2.txt").write_text(prose(20))
    (corpus / "4.txt").write_text(prose(40))
    (corpus / "0.txt").unlink()
    second = version()
    assert second.id != first.id
    diff = diff_datasets(first, second)
    ids = {i: doc_id(prose(i)) for i in (0, 2, 20, 40)}
    assert diff["a"] == first.id and diff["b"] == second.id
    assert set(diff["added"]) == {ids[20], ids[40]} and set(diff["removed"]) == {ids[0], ids[2]}
    assert (diff["added_count"], diff["removed_count"], diff["unchanged_count"]) == (2, 2, 2)
    assert set(diff["splits"]) == {"train", "val"}
    assert sum(s["a"] for s in diff["splits"].values()) == 4
    changed = diff["report"]  # report numbers that differ, e.g. chars_out or lengths.max
    assert changed and all(v["a"] != v["b"] and v["change"] == v["b"] - v["a"] for v in changed.values())
    assert "documents_out" not in changed  # 4 both times: unchanged numbers are left out


def test_a_long_document_is_split_inside_itself_and_short_ones_by_hash(tmp_path):
    from lmops.data.dataset import split_documents

    book = "".join(f"line {i} of a long book\n" for i in range(2000))  # 45K characters: past split_within
    short = docs(30)
    parts = split_documents([*short, doc(book, "corpus/book.txt")], 0.1, split_within=32_768)
    assert [(d.id, s) for d, s in parts[:30]] == [(d.id, split_of(d.id, 0.1)) for d in short]
    (head, hs), (tail, ts) = parts[30:]
    assert (hs, ts) == ("train", "val") and head.text + tail.text == book
    assert head.text.endswith("\n") and abs(len(tail.text) - len(book) * 0.1) < 30, "cut at the line break after 90%"
    assert (head.source, tail.source) == (f"corpus/book.txt[:{len(head.text)}]", f"corpus/book.txt[{len(head.text)}:]")
    again = split_documents([doc(book, "elsewhere.txt")], 0.1, 32_768)
    assert [(d.id, s) for d, s in again] == [(head.id, "train"), (tail.id, "val")], "the cut depends on the text alone"
    version = write_dataset([doc(book, "corpus/book.txt")], REPORT, tmp_path, 0.1, None, split_within=32_768)
    assert {s: version.manifest["totals"][s]["documents"] for s in ("train", "val")} == {"train": 1, "val": 1}
    assert "".join(t for _, t in iter_documents(version, "train")) == head.text


def test_a_killed_writer_leaves_nothing_behind(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    root = tmp_path / "datasets"
    (root / f".tmp-{dead.stdout.strip()}-abcd").mkdir(parents=True)  # what a writer killed mid-write leaves
    (root / f".tmp-{dead.stdout.strip()}-abcd" / "shard-00000.jsonl").write_text("{}\n")
    mine = root / f".tmp-{os.getpid()}-live"  # a live writer's folder is left alone
    mine.mkdir()
    write_dataset(docs(5), REPORT, tmp_path, 0.2, None)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == [mine.name]
