"""Dataset versions: immutable, content-addressed snapshots of a cleaned corpus.

A version lives in out_root/datasets/<id>/: the documents as JSONL shards (shard-00000.jsonl, ...,
about 32 MB each, one {"id", "text", "source"} record a line), manifest.json (every shard with its
sha256, every document with its split, source and length, the totals) and report.json (what ingest
did to get there). The id is the sha256 of the manifest without its created_at, parent and lineage: the same
documents from the same sources give the same id on any machine, and any changed document gives
another. Lineage (parent, and `lineage`: e.g. the request-log window a version of production prompts
came from) and time are metadata; writing a version that exists already returns the existing one
untouched.

The train/validation split is decided per document by its id, never by position: adding documents
to a corpus never moves an old document from one split to the other, so validation losses of two
versions compare on the documents they share. A document longer than split_within characters is cut
in two first (its last val_fraction is validation, as nanoGPT splits its one file), each part a
document of its own: a corpus of one book still has both sides, and the cut depends on its text alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from lmops.errors import LmopsError
from lmops.util import canonical_json, remove_stale_temps, temp_name

DATASETS = "datasets"
MANIFEST = "manifest.json"
REPORT = "report.json"
SHARD_BYTES = 32 << 20  # big enough to keep file counts low, small enough to stream and checksum quickly
FORMAT = 1
NOT_HASHED = ("id", "created_at", "parent", "lineage")
TMP_PREFIX = ".tmp-"  # a version being written: .tmp-<pid>-<random>, renamed to its id when whole


@dataclass(frozen=True)
class Doc:
    id: str  # sha256 of text: the document's name in every version that holds it
    text: str
    source: str  # where it came from: a path relative to the workspace, with ":line" for rows


def doc_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_of(doc_id: str, val_fraction: float) -> str:
    """'val' or 'train', from the id alone: a uniform number in [0, 1) compared with val_fraction."""
    return "val" if int(doc_id[:16], 16) / 2**64 < val_fraction else "train"


CUT_SEARCH_CHARS = 2000  # how far past the split point a line break is looked for before cutting mid-line


def split_documents(docs: list[Doc], val_fraction: float, split_within: int) -> list[tuple[Doc, str]]:
    """(document, split) in order: short documents whole by split_of; a longer one as its head (train)
    and its last val_fraction (val), cut after the first line break past the split point."""
    out = []
    for d in docs:
        if len(d.text) <= split_within:
            out.append((d, split_of(d.id, val_fraction)))
            continue
        at = int(len(d.text) * (1 - val_fraction))
        nl = d.text.find("\n", at, at + CUT_SEARCH_CHARS)
        cut = nl + 1 if 0 <= nl < len(d.text) - 1 else at
        head, tail = d.text[:cut], d.text[cut:]
        out.append((Doc(doc_id(head), head, f"{d.source}[:{cut}]"), "train"))
        out.append((Doc(doc_id(tail), tail, f"{d.source}[{cut}:]"), "val"))
    return out


@dataclass(frozen=True)
class DatasetVersion:
    id: str
    path: Path
    manifest: dict

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def report(self) -> dict:
        return json.loads((self.path / REPORT).read_text(encoding="utf-8"))


def _canonical(obj: object) -> bytes:
    return canonical_json(obj).encode("utf-8")


def _version_id(manifest: dict) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in manifest.items() if k not in NOT_HASHED})).hexdigest()


def _write_shards(docs: list[Doc], folder: Path, shard_bytes: int) -> list[dict]:
    """Write docs as JSONL shards of about shard_bytes each; return their manifest entries."""
    shards: list[dict] = []
    f, digest = None, hashlib.sha256()
    for doc in docs:
        line = _canonical({"id": doc.id, "text": doc.text, "source": doc.source}) + b"\n"
        if f is None or shards[-1]["bytes"] + len(line) > shard_bytes:
            if f is not None:
                _close_shard(f, digest, shards[-1])
            shards.append({"file": f"shard-{len(shards):05d}.jsonl", "documents": 0, "bytes": 0})
            f, digest = open(folder / shards[-1]["file"], "wb"), hashlib.sha256()
        f.write(line)
        digest.update(line)
        shards[-1]["documents"] += 1
        shards[-1]["bytes"] += len(line)
    if f is not None:
        _close_shard(f, digest, shards[-1])
    return shards


def _close_shard(f: BinaryIO, digest: hashlib._Hash, entry: dict) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()
    entry["sha256"] = digest.hexdigest()


def write_dataset(
    docs: list[Doc], report: dict, out_root: Path, val_fraction: float, parent: str | None,
    shard_bytes: int = SHARD_BYTES, split_within: int = 32_768, splits: Mapping[str, str] | None = None,
    lineage: dict | None = None,
) -> DatasetVersion:
    """Store docs (in this order) as a dataset version under out_root/datasets; return it.

    splits: documents whose side is decided already (id -> 'train' or 'val', e.g. taken from another
    version), kept whole on that side; the others are split as usual. lineage: what the version was made
    from, beyond its parent, stored in the manifest (metadata, not part of the id).

    Written into a temporary folder that is renamed into place when complete, so a version folder
    is always whole (a writer killed mid-way leaves a temporary folder the next write removes). If a
    version with the same id exists, it is returned as it is.
    """
    if not 0 <= val_fraction < 1:
        raise LmopsError(f"data.val_fraction {val_fraction} must be at least 0 and below 1")
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        raise ValueError("documents must be unique (deduplicate them first, e.g. with lmops.data.ingest)")
    splits = splits or {}
    if bad := {s for s in splits.values() if s not in ("train", "val")}:
        raise ValueError(f"splits: 'train' or 'val', not {', '.join(sorted(bad))}")
    split = [pair for d in docs for pair in
             ([(d, splits[d.id])] if d.id in splits else split_documents([d], val_fraction, split_within))]
    docs = [d for d, _ in split]
    root = Path(out_root) / DATASETS
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(root, TMP_PREFIX)
    tmp = root / temp_name(TMP_PREFIX)
    tmp.mkdir()
    try:
        shards = _write_shards(docs, tmp, shard_bytes)
        documents = [{"id": d.id, "split": s, "source": d.source, "chars": len(d.text)} for d, s in split]
        totals = {"documents": len(docs), "chars": sum(len(d.text) for d in docs)}
        for split in ("train", "val"):
            rows = [r for r in documents if r["split"] == split]
            totals[split] = {"documents": len(rows), "chars": sum(r["chars"] for r in rows)}
        manifest = {
            "format": FORMAT, "val_fraction": val_fraction, "shards": shards, "totals": totals,
            "documents": documents,
        }
        version_id = _version_id(manifest)
        manifest = {"id": version_id, **manifest, "parent": parent, "created_at": datetime.now(timezone.utc).isoformat()}
        if lineage is not None:
            manifest["lineage"] = lineage
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / REPORT).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        final = root / version_id
        if not (final / MANIFEST).exists():
            try:
                os.rename(tmp, final)
            except OSError:  # written meanwhile by another process: theirs is the same content
                if not (final / MANIFEST).exists():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _open(final)


def _open(path: Path) -> DatasetVersion:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise LmopsError(f"{path / MANIFEST}: unreadable ({err}); delete the folder {path} and ingest again") from None
    return DatasetVersion(manifest["id"], path, manifest)


def list_datasets(out_root: Path) -> list[DatasetVersion]:
    """Every dataset version under out_root, oldest first."""
    root = Path(out_root) / DATASETS
    if not root.is_dir():
        return []
    found = [_open(p) for p in sorted(root.iterdir()) if not p.name.startswith(".") and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda v: (v.manifest.get("created_at", ""), v.id))


def load_dataset(out_root: Path, ref: str) -> DatasetVersion:
    """The version named by ref: a full id, a unique prefix of one, or 'latest' (the newest)."""
    versions = list_datasets(out_root)
    where = Path(out_root) / DATASETS
    if not versions:
        raise LmopsError(f"no dataset versions in {where}: ingest a corpus first")
    if ref == "latest":
        return versions[-1]
    matches = [v for v in versions if v.id.startswith(ref.lower())] if ref else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise LmopsError(f"no dataset {ref!r} in {where}: give an id or prefix of one listed there, or 'latest'")
    names = ", ".join(v.short_id for v in matches[:3])
    raise LmopsError(f"dataset prefix {ref!r} matches {len(matches)} versions ({names}...): give more characters")


def iter_documents(version: DatasetVersion, split: str | None = None) -> Iterator[tuple[str, str]]:
    """(id, text) of each document, in stored order; only those of split ('train' or 'val') if given."""
    if split not in (None, "train", "val"):
        raise ValueError(f"split must be None, 'train' or 'val', not {split!r}")
    wanted = None if split is None else {d["id"] for d in version.manifest["documents"] if d["split"] == split}
    for shard in version.manifest["shards"]:
        path = version.path / shard["file"]
        try:
            f = open(path, "rb")
        except OSError as err:
            raise LmopsError(f"{path}: {err.strerror or err}; the dataset is damaged, ingest again") from None
        with f:
            for line in f:
                record = json.loads(line)
                if wanted is None or record["id"] in wanted:
                    yield record["id"], record["text"]


def _metrics(report: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a report, flattened to 'a.b' keys (lists are left out)."""
    out: dict[str, float] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            out.update(_metrics(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = value
    return out


def diff_datasets(a: DatasetVersion, b: DatasetVersion) -> dict:
    """What changed from a to b: documents added and removed (by id), split sizes, report numbers."""
    docs_a = {d["id"]: d for d in a.manifest["documents"]}
    docs_b = {d["id"]: d for d in b.manifest["documents"]}
    added = [i for i in docs_b if i not in docs_a]
    removed = [i for i in docs_a if i not in docs_b]
    splits = {
        s: {"a": a.manifest["totals"][s]["documents"], "b": b.manifest["totals"][s]["documents"]}
        for s in ("train", "val")
    }
    ma, mb = _metrics(a.report), _metrics(b.report)
    report = {
        k: {"a": ma.get(k), "b": mb.get(k), "change": (mb[k] - ma[k]) if k in ma and k in mb else None}
        for k in sorted(ma.keys() | mb.keys())
        if ma.get(k) != mb.get(k)
    }
    return {
        "a": a.id, "b": b.id,
        "added": added, "removed": removed,
        "added_count": len(added), "removed_count": len(removed), "unchanged_count": len(docs_a) - len(removed),
        "splits": splits,
        "report": report,
    }
