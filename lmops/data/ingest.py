"""Ingest: raw files -> clean, filtered, PII-scrubbed, deduplicated documents, and a report.

Sources are files, folders (recursive; hidden files and folders such as .git and .lmops are not read)
and globs, relative to the workspace. Formats: .txt and .md (a file is a document), .jsonl (a line is
a document, text in data.text_field), .csv (a row, text in data.csv_column), .parquet (a row, text in
data.text_field), each optionally gzipped (.jsonl.gz). A file is read whole into memory.

Each document then goes through, in order:
1. cleaning: Unicode NFC, line ends to \\n, control characters dropped (\\n and \\t kept), trailing
   spaces cut, runs of 3+ blank lines cut to 2, outer whitespace stripped;
2. filters, each counted: empty, data.min_chars, data.max_chars, data.min_alpha_fraction,
   data.max_repeated_line_fraction, safety.blocklist;
3. PII scrubbing (lmops.safety.redact_pii) when data.scrub_pii;
4. exact deduplication by sha256 of the text (which is also the document's id), then near-duplicate
   removal with MinHash LSH over word 5-grams (datasketch). The first document seen is kept and each
   removed one records which kept document it duplicates.

Nothing is dropped silently and nothing corrupt stops the run: a file that is not UTF-8, a broken gzip
or parquet file, or a JSONL line that is not valid JSON is quarantined, i.e. copied (for a bad line,
the line itself written) under out_root/quarantine/ with its reason in the report.
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import io
import json
import re
import statistics
import sys
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasketch import MinHash, MinHashLSH
from rich.markup import escape
from rich.table import Table

from lmops.config import DataConfig, SafetyConfig
from lmops.data.dataset import Doc, doc_id
from lmops.errors import LmopsError
from lmops.safety import PII_KINDS, blocklist_hits, redact_pii
from lmops.util import first_line

FORMATS = (".txt", ".md", ".jsonl", ".csv", ".parquet")
QUARANTINE = "quarantine"
SHINGLE_WORDS = 5  # word 5-grams: long enough that shared phrases are rare, short enough that an edit spoils few
NUM_PERM = 128  # MinHash permutations: Jaccard estimates within about +-0.09 (1/sqrt(128))
MINHASH_BATCH = 8192  # shingles per update_batch call: bounds its (batch x NUM_PERM) work array to 4 MB
BOM = "\ufeff"

# Why a document was dropped, in the order the checks run, each with the setting to change.
RULES = {
    "empty": "empty after cleaning",
    "min_chars": "shorter than data.min_chars",
    "max_chars": "longer than data.max_chars",
    "min_alpha_fraction": "fewer letters than data.min_alpha_fraction",
    "max_repeated_line_fraction": "more repeated lines than data.max_repeated_line_fraction",
    "blocklist": "a term of safety.blocklist",
    "exact_duplicate": "exact duplicate",
    "near_duplicate": "near duplicate (data.near_dup_threshold)",
}

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]+")  # Unicode Cc except \t (\x09) and \n (\x0a)
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n{4,}")  # 3+ blank lines
_NON_LETTER = re.compile(r"[\W\d_]+")
_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+")


@dataclass
class IngestResult:
    documents: list[Doc]  # kept, in the order read
    report: dict  # JSON-serialisable: see ingest()


# ---- files -----------------------------------------------------------------------------------------


def file_format(path: Path) -> tuple[str, bool] | None:
    """(format, gzipped) of a file by its name, e.g. ('.jsonl', True) for a.jsonl.gz; None if unsupported."""
    name = path.name.lower()
    gz = name.endswith(".gz")
    suffix = Path(name[:-3] if gz else name).suffix
    return (suffix, gz) if suffix in FORMATS else None


def _label(path: Path, root: Path) -> str:
    """How reports name a file: relative to the workspace when inside it."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def _is_hidden(path: Path, folder: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(folder).parts)


def source_files(sources: list[str], root: Path, exclude: Path | None = None) -> tuple[list[Path], list[dict]]:
    """The files named by sources (each once, in order) and the files skipped for their type.

    A file named explicitly must have a supported type; in folders and globs other files are skipped
    and reported. Anything under exclude (the output folder) is never read.
    """
    if not sources:
        raise LmopsError("no corpus sources given: list files, folders or globs under data.corpus in lmops.yaml")
    files: list[Path] = []
    skipped: list[dict] = []
    excluded = exclude.resolve() if exclude else None
    for source in sources:
        path = Path(source) if Path(source).is_absolute() else root / source
        if path.is_file():
            if file_format(path) is None:
                raise LmopsError(
                    f"corpus file {source} has an unsupported type: use .txt, .md, .jsonl, .csv or .parquet "
                    "(optionally .gz), or remove it from data.corpus in lmops.yaml"
                )
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not _is_hidden(p, path))
        elif any(c in source for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not found:
                raise LmopsError(f"corpus pattern {source} matched no files: check data.corpus in lmops.yaml")
        else:
            raise LmopsError(f"corpus path {source} not found (relative to {root}): check data.corpus in lmops.yaml")
        if excluded:
            found = [p for p in found if not p.resolve().is_relative_to(excluded)]
        supported = [p for p in found if file_format(p)]
        skipped += [{"path": _label(p, root), "reason": "unsupported file type"} for p in found if not file_format(p)]
        if not supported:
            raise LmopsError(
                f"corpus source {source} has no .txt, .md, .jsonl, .csv or .parquet files: add some, or fix "
                "data.corpus in lmops.yaml"
            )
        files.extend(supported)
    seen: set[Path] = set()
    unique = []
    for p in files:  # a file named twice (a folder and a file in it) would be read twice
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique, skipped


# ---- reading ---------------------------------------------------------------------------------------


class _Quarantine:
    """Where unreadable data goes: out_root/quarantine/<file as the report names it>, with reasons."""

    def __init__(self, out_root: Path) -> None:
        self.folder = Path(out_root) / QUARANTINE
        self.records: list[dict] = []

    def _dest(self, label: str, suffix: str = "") -> Path:
        dest = self.folder / (label.lstrip("/").replace(":", "_") + suffix)
        dest.parent.mkdir(parents=True, exist_ok=True)
        return dest

    def file(self, label: str, data: bytes | None, reason: str) -> None:
        dest = None
        if data is not None:
            dest = self._dest(label)
            dest.write_bytes(data)
        self.records.append({"source": label, "reason": reason, "saved_to": str(dest) if dest else None})

    def lines(self, label: str, bad: list[tuple[int, bytes, str]]) -> None:
        if not bad:
            return
        dest = self._dest(label, ".bad-lines")
        dest.write_bytes(b"".join(raw + b"\n" for _, raw, _ in bad))
        self.records += [{"source": f"{label}:{n}", "reason": reason, "saved_to": str(dest)} for n, _, reason in bad]


def _decode(data: bytes) -> str:
    """UTF-8 text (a leading BOM dropped), or ValueError with the reason it is not text."""
    nul = data.find(b"\x00")
    if nul != -1:
        raise ValueError(f"binary, not text (NUL byte at offset {nul})")
    try:
        return data.decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start})") from None


def _jsonl(data: bytes, label: str, field: str, quarantine: _Quarantine) -> list[tuple[str, str]]:
    docs, bad = [], []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8").removeprefix(BOM)
        except UnicodeDecodeError as err:
            bad.append((n, raw, f"not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            bad.append((n, raw, f"invalid JSON ({err.msg} at column {err.colno})"))
            continue
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            bad.append((n, raw, f"no string field {field!r} (data.text_field)"))
            continue
        docs.append((record[field], f"{label}:{n}"))
    quarantine.lines(label, bad)
    return docs


def _csv(text: str, label: str, column: str) -> list[tuple[str, str]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # documents are longer than csv's 128 KB default
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, [])
    if column not in header:
        raise ValueError(f"no column {column!r} (data.csv_column; columns: {', '.join(header[:10]) or 'none'})")
    i, docs = header.index(column), []
    start = reader.line_num + 1  # a record can span lines: name it by the line it starts on
    for row in reader:
        docs.append((row[i] if i < len(row) else "", f"{label}:{start}"))
        start = reader.line_num + 1
    return docs


def _parquet(data: bytes, label: str, field: str) -> list[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        names = pf.schema_arrow.names
        if field not in names:
            raise ValueError(f"no column {field!r} (data.text_field; columns: {', '.join(names[:10])})")
        column = pf.read(columns=[field]).column(field)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise ValueError(f"column {field!r} holds {column.type}, not text")
        values = column.to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"unreadable parquet ({first_line(err)})") from None
    return [(v or "", f"{label}:{i}") for i, v in enumerate(values, start=1)]


def read_file(path: Path, label: str, cfg: DataConfig, quarantine: _Quarantine) -> tuple[list[tuple[str, str]], dict]:
    """(text, source) of each document in path, and the file's entry for the report.

    Whatever cannot be read goes to quarantine instead of raising.
    """
    fmt, gz = file_format(path)
    entry = {"path": label, "format": fmt[1:] + (".gz" if gz else ""), "bytes": None, "sha256": None, "documents": 0}
    try:
        raw = path.read_bytes()
    except OSError as err:
        quarantine.file(label, None, f"unreadable ({err.strerror or err})")
        return [], entry
    entry.update(bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest())
    try:
        data = gzip.decompress(raw) if gz else raw
    except (OSError, EOFError, zlib.error) as err:
        quarantine.file(label, raw, f"bad gzip ({err})")
        return [], entry
    try:
        if fmt == ".jsonl":
            docs = _jsonl(data, label, cfg.text_field, quarantine)
        elif fmt == ".parquet":
            docs = _parquet(data, label, cfg.text_field)
        elif fmt == ".csv":
            docs = _csv(_decode(data), label, cfg.csv_column)
        else:
            docs = [(_decode(data), label)]
    except (ValueError, csv.Error) as err:  # csv.Error: e.g. a quote never closed
        quarantine.file(label, raw, str(err) if isinstance(err, ValueError) else f"bad CSV ({err})")
        return [], entry
    entry["documents"] = len(docs)
    return docs, entry


# ---- cleaning and filters --------------------------------------------------------------------------


def clean_text(text: str) -> str:
    """NFC, \\n line ends, no control characters but \\n and \\t, no trailing spaces, at most 2 blank
    lines in a row, no outer whitespace."""
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # a lone \r is an old Mac line end
    text = _CONTROL.sub("", text)
    text = _TRAILING.sub("", text)
    text = _BLANK_LINES.sub("\n\n\n", text)
    return text.strip()


def alpha_fraction(text: str) -> float:
    """Letters / non-whitespace characters."""
    visible = len(_SPACE.sub("", text))
    return len(_NON_LETTER.sub("", text)) / visible if visible else 0.0


def repeated_line_fraction(text: str) -> float:
    """Share of the characters of non-blank lines that are in lines repeating an earlier line."""
    lines = [line.strip() for line in text.split("\n")]
    counts = Counter(line for line in lines if line)
    total = sum(len(line) * n for line, n in counts.items())
    repeated = sum(len(line) * (n - 1) for line, n in counts.items())
    return repeated / total if total else 0.0


def filter_rule(text: str, cfg: DataConfig, blocklist: list[str]) -> str | None:
    """The first RULES entry that drops this cleaned text, or None to keep it."""
    if not text:
        return "empty"
    if len(text) < cfg.min_chars:
        return "min_chars"
    if len(text) > cfg.max_chars:
        return "max_chars"
    if alpha_fraction(text) < cfg.min_alpha_fraction:
        return "min_alpha_fraction"
    if repeated_line_fraction(text) > cfg.max_repeated_line_fraction:
        return "max_repeated_line_fraction"
    if blocklist and blocklist_hits(text, blocklist):
        return "blocklist"
    return None


# ---- near duplicates -------------------------------------------------------------------------------


def _identity(x: int) -> int:
    return x


def minhash(text: str) -> MinHash:
    """MinHash of the set of lowercased word 5-grams of text.

    Each distinct word is hashed once (crc32: stable across processes, unlike hash()), and the 5-gram
    hashes are combined in numpy, so a 1 MB document takes tens of milliseconds.
    """
    words = _WORD.findall(text.lower())
    hashes = {w: zlib.crc32(w.encode("utf-8")) for w in dict.fromkeys(words)}
    word_hash = np.fromiter(map(hashes.__getitem__, words), dtype=np.uint64, count=len(words))
    n = max(len(words) - SHINGLE_WORDS + 1, 1)
    h = np.zeros(n, dtype=np.uint64)
    for k in range(min(SHINGLE_WORDS, len(words))):
        h = h * np.uint64(1_000_003) + word_hash[k : k + n]  # wraps mod 2**64, as wanted
    # Repeated shingles are left in: a minimum does not change when a value comes twice.
    shingles = (((h >> np.uint64(32)) ^ h) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    m = MinHash(num_perm=NUM_PERM, hashfunc=_identity)
    for i in range(0, len(shingles), MINHASH_BATCH):
        m.update_batch(shingles[i : i + MINHASH_BATCH])
    return m


def deduplicate(docs: list[Doc], threshold: float) -> tuple[list[Doc], list[dict]]:
    """docs without exact and near duplicates (first seen kept), and a record of each one removed."""
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    sketches: dict[str, MinHash] = {}
    sources: dict[str, str] = {}
    kept: list[Doc] = []
    removed: list[dict] = []
    for doc in docs:
        if doc.id in sources:
            removed.append({"source": doc.source, "id": doc.id, "rule": "exact_duplicate", "duplicate_of": doc.id,
                            "duplicate_of_source": sources[doc.id], "similarity": 1.0})
            continue
        m = minhash(doc.text)
        scores = [(m.jaccard(sketches[key]), key) for key in lsh.query(m)]
        best = max((s for s in scores if s[0] >= threshold), default=None, key=lambda s: s[0])
        if best:
            removed.append({"source": doc.source, "id": doc.id, "rule": "near_duplicate", "duplicate_of": best[1],
                            "duplicate_of_source": sources[best[1]], "similarity": round(best[0], 4)})
            continue
        lsh.insert(doc.id, m)
        sketches[doc.id] = m
        sources[doc.id] = doc.source
        kept.append(doc)
    return kept, removed


# ---- the run ---------------------------------------------------------------------------------------


def _read_all(files: list[Path], root: Path, quarantine: _Quarantine, cfg: DataConfig,
              progress: bool) -> Iterator[tuple[list[tuple[str, str]], dict]]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("ingest {task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True, disable=not progress) as bar:
        task = bar.add_task("", total=len(files))
        for path in files:
            label = _label(path, root)
            bar.update(task, description=label)
            yield read_file(path, label, cfg, quarantine)
            bar.advance(task)


def _lengths(docs: list[Doc]) -> dict:
    chars = [len(d.text) for d in docs]
    if not chars:
        return {"min": 0, "median": 0, "mean": 0, "max": 0}
    return {"min": min(chars), "median": statistics.median(chars), "mean": round(statistics.fmean(chars), 1),
            "max": max(chars)}


def _nothing_left(removed: dict[str, int], n_read: int, n_files: int, quarantined: list[dict]) -> LmopsError:
    if n_read == 0:
        first = f" (first: {quarantined[0]['source']}: {quarantined[0]['reason']})" if quarantined else ""
        return LmopsError(
            f"no documents could be read from {n_files} file(s): {len(quarantined)} quarantined{first}; "
            "fix the files or data.text_field / data.csv_column in lmops.yaml"
        )
    why = ", ".join(f"{n} {RULES[rule]}" for rule, n in removed.items() if n)
    return LmopsError(f"no documents left of {n_read} read: {why}; relax those settings in lmops.yaml or add text")


def ingest(sources: list[str], cfg: DataConfig, safety: SafetyConfig, root: Path, out_root: Path,
           progress: bool = False) -> IngestResult:
    """Read, clean, filter, scrub and deduplicate the documents of sources (see the module docstring).

    The report: documents_in / documents_after_filters / documents_out, removed (count per RULES entry),
    duplicate_ratio (exact + near removed / documents_after_filters) and duplicates (each with the kept
    document it duplicates), pii (count per kind), chars_out and lengths (min/median/mean/max), quarantined
    and skipped files with reasons, sources (path, format, bytes, sha256, documents), and settings.
    Raises LmopsError naming the rules when nothing is left.
    """
    root, out_root = Path(root), Path(out_root)
    files, skipped = source_files(sources, root, exclude=out_root)
    quarantine = _Quarantine(out_root)
    removed = {rule: 0 for rule in RULES}
    pii = {kind: 0 for kind in PII_KINDS}
    entries: list[dict] = []
    candidates: list[Doc] = []
    n_read = 0
    for docs, entry in _read_all(files, root, quarantine, cfg, progress):
        entries.append(entry)
        n_read += len(docs)
        for raw, source in docs:
            text = clean_text(raw)
            rule = filter_rule(text, cfg, safety.blocklist)
            if rule:
                removed[rule] += 1
                continue
            if cfg.scrub_pii:
                text, counts = redact_pii(text, safety.pii_kinds)
                for kind, n in counts.items():
                    pii[kind] += n
            candidates.append(Doc(doc_id(text), text, source))
    if not candidates:
        raise _nothing_left(removed, n_read, len(files), quarantine.records)
    kept, duplicates = deduplicate(candidates, cfg.near_dup_threshold)
    for d in duplicates:
        removed[d["rule"]] += 1
    report = {
        "documents_in": n_read,
        "documents_after_filters": len(candidates),
        "documents_out": len(kept),
        "removed": removed,
        "duplicate_ratio": round(len(duplicates) / len(candidates), 6),
        "duplicates": duplicates,
        "pii": pii,
        "chars_out": sum(len(d.text) for d in kept),
        "lengths": _lengths(kept),
        "quarantined_count": len(quarantine.records),
        "quarantined": quarantine.records,
        "skipped_count": len(skipped),
        "skipped": skipped,
        "sources": entries,
        "settings": {
            **cfg.model_dump(mode="json", include={
                "text_field", "csv_column", "min_chars", "max_chars", "min_alpha_fraction",
                "max_repeated_line_fraction", "scrub_pii", "near_dup_threshold"}),
            "pii_kinds": list(safety.pii_kinds), "blocklist_terms": len(safety.blocklist),
        },
    }
    return IngestResult(kept, report)


def check_gates(report: dict, cfg: DataConfig) -> list[str]:
    """The data gates the report fails, one line each (empty when it passes)."""
    failures = []
    if report["documents_out"] < cfg.min_documents:
        failures.append(f"{report['documents_out']} document(s) kept, fewer than data.min_documents ({cfg.min_documents})")
    if report["duplicate_ratio"] > cfg.max_duplicate_ratio:
        failures.append(
            f"duplicate ratio {report['duplicate_ratio']:.2f} is above data.max_duplicate_ratio "
            f"({cfg.max_duplicate_ratio}): check for sources listed twice"
        )
    return failures


def render_report(report: dict) -> Table:
    """The report as a terminal table: the document funnel, duplicates, PII, lengths, problems."""
    table = Table(title="ingest", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column()
    table.add_row("documents read", f"{report['documents_in']:,}", "")
    for rule, n in report["removed"].items():
        if n:
            table.add_row("  removed", f"-{n:,}", RULES[rule])
    table.add_row("documents kept", f"{report['documents_out']:,}", f"{report['chars_out']:,} characters")
    table.add_row("duplicate ratio", f"{report['duplicate_ratio']:.1%}", "exact + near, of those passing the filters")
    pii = ", ".join(f"{kind} {n:,}" for kind, n in report["pii"].items() if n)
    table.add_row("PII redacted", f"{sum(report['pii'].values()):,}", pii)
    lengths = report["lengths"]
    table.add_row("length (chars)", f"{lengths['median']:,}", f"median; min {lengths['min']:,}, mean "
                  f"{lengths['mean']:,}, max {lengths['max']:,}")
    table.add_row("source files", f"{len(report['sources']):,}", f"{report['skipped_count']:,} skipped (unsupported type)")
    table.add_row("quarantined", f"{report['quarantined_count']:,}", "")
    for q in report["quarantined"][:10]:
        table.add_row("", "", f"[yellow]{escape(q['source'])}[/]: {escape(q['reason'])}")
    if report["quarantined_count"] > 10:
        table.add_row("", "", f"... and {report['quarantined_count'] - 10} more (see the report)")
    return table
