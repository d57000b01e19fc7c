"""New data from production: the prompts of the request log as a new dataset version, mixed with the corpus.

`lmops data ingest --from-requests` (and the loop, through ingest_requests) reads the request log of a
window ([since, until), one endpoint or all) and keeps a prompt only when:
- moderation did not block it (the `moderation` column: an input or output action "block"): a blocked
  prompt is never used, whatever else holds;
- its request was answered 200, and it has a prompt (as logged: redacted by the server's policy first;
  a chat request's prompt is the rendered transcript the model read);
- with where="drifted", it arrived inside the window of a monitor run that raised a prompt drift alert
  for its endpoint (a result of kind prompts or embeddings, both measured on the prompts, over its
  threshold).

The prompts then go through the data pipeline's own steps (lmops/data/ingest.py): cleaning, the
filters, PII scrubbing (always, whatever data.scrub_pii: the prompts are users' data) and
deduplication, among themselves and against the corpus. Each becomes a document whose source is
`requests:<request_id>` (PRODUCTION_SOURCE, is_production), so evaluation can tell production
documents from corpus ones (production_texts: those of the validation split).

The corpus side is the newest dataset version made from data.corpus as it is now (ingested first when
there is none). Each split keeps its side (corpus documents keep the split they had, so validation
losses still compare), and within each split whichever side is too large is subsampled (whole
documents, in an order given by their ids: deterministic, never a document twice) so that production
prompts make up data.mix of the characters. The version's parent is that corpus version, and its
manifest's `lineage` records the window, the counts and the mix reached.

Refused (LmopsError, nothing written) while data.use_production_prompts is false, and when fewer
than data.min_documents prompts are left.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from lmops.config import Config, DataConfig, SafetyConfig
from lmops.data.dataset import (
    DatasetVersion,
    Doc,
    doc_id,
    iter_documents,
    load_dataset,
    split_documents,
    write_dataset,
)
from lmops.data.ingest import (
    RULES,
    _lengths,
    clean_text,
    deduplicate,
    filter_rule,
    source_files,
)
from lmops.errors import LmopsError
from lmops.safety import PII_KINDS, redact_pii

PRODUCTION_SOURCE = "requests:"  # a production document's source: requests:<request_id>
DEFAULT_SINCE = "24h"
WHERE = ("drifted",)
DRIFT_KINDS = ("prompts", "embeddings")  # the monitor's signals measured on the prompts
COLUMNS = ("ts", "request_id", "endpoint", "status_code", "prompt", "moderation")
MIX_TOLERANCE = 0.01  # share of characters: close enough to data.mix to stop subsampling
FILTER_RULES = tuple(r for r in RULES if not r.endswith("_duplicate"))


def is_production(source: str) -> bool:
    """True for a document made from a logged prompt (its source is requests:<request_id>...)."""
    return source.startswith(PRODUCTION_SOURCE)


def production_texts(version: DatasetVersion, split: str | None = "val") -> list[str]:
    """The texts of a version's production documents (of split: 'val' by default, 'train', or None for
    both), in stored order: what the model is evaluated on to see how it does on the new traffic."""
    mine = {d["id"] for d in version.manifest["documents"] if is_production(d["source"])}
    return [text for i, text in iter_documents(version, split) if i in mine]


def request_id_of(source: str) -> str:
    """The request id in a production document's source (a long prompt's pieces end in [:cut] / [cut:])."""
    return source[len(PRODUCTION_SOURCE):].split("[", 1)[0]


# ---- the window ------------------------------------------------------------------------------------


def parse_time(value: str | datetime | timedelta | None, what: str, now: datetime) -> datetime | None:
    """A duration back from now ('90s', '30m', '1h', '7d', as the other commands take, or a timedelta),
    an ISO time (naive: UTC), or a datetime, as an aware UTC datetime; None stays None."""
    from lmops.deploy.compare import parse_duration

    if isinstance(value, timedelta):
        return now - value
    if value is None or isinstance(value, datetime):
        return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)
    try:
        return now - parse_duration(value, what)
    except LmopsError:
        pass
    try:
        t = datetime.fromisoformat(value.strip())
    except ValueError:
        raise LmopsError(f"{what} {value!r}: give a duration back from now (90s, 30m, 1h, 7d) or an ISO time "
                         "(2026-12-03T14:00:00Z)") from None
    return t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)


def window_bounds(since, until, now: datetime) -> tuple[datetime, datetime]:
    """[since, until): since defaults to the last 24 hours, until to now."""
    start = parse_time(since if since is not None else DEFAULT_SINCE, "--since", now)
    end = parse_time(until, "--until", now) or now
    if start >= end:
        raise LmopsError(f"--since {start:%Y-%m-%d %H:%M:%S} is not before --until {end:%Y-%m-%d %H:%M:%S} (UTC)")
    return start, end


@dataclass(frozen=True)
class DriftWindow:
    """The window of one monitor run that raised a prompt drift alert for an endpoint."""

    run_id: str
    endpoint: str | None
    start: datetime
    end: datetime
    signals: tuple[str, ...]

    def holds(self, endpoint: str | None, ts: datetime) -> bool:
        return endpoint == self.endpoint and self.start <= ts < self.end


def drifted_windows(store, endpoint: str | None, since: datetime, until: datetime) -> list[DriftWindow]:
    """Monitor runs whose window overlaps [since, until) and that flagged a prompt signal (DRIFT_KINDS)
    over its threshold, one per run and endpoint, oldest first."""
    found: dict[tuple[str, str | None], list] = {}
    for r in store.monitor.list(endpoint=endpoint, since=since, limit=10_000_000):  # ts: the run's window end
        if r.alert and r.kind in DRIFT_KINDS and r.window_start < until and r.window_end > since:
            found.setdefault((r.run_id, r.endpoint), []).append(r)
    windows = [DriftWindow(run_id, ep, rs[0].window_start, rs[0].window_end, tuple(sorted({r.signal for r in rs})))
               for (run_id, ep), rs in found.items()]
    return sorted(windows, key=lambda w: (w.start, w.run_id))


def _blocked(moderation: dict | None) -> bool:
    """Moderation blocked the prompt (input) or what it made the model say (output)."""
    return any(isinstance(v, dict) and v.get("action") == "block" for v in (moderation or {}).values())


# ---- the prompts -----------------------------------------------------------------------------------


def production_documents(store, endpoint: str | None, since: datetime, until: datetime, where: str | None,
                         data: DataConfig, safety: SafetyConfig) -> tuple[list[Doc], dict]:
    """The usable prompts of [since, until) as documents (oldest first, deduplicated among themselves),
    and the window: what was read and why each request left out was left out (JSON-serialisable)."""
    docs, window, _ = _production_documents(store, endpoint, since, until, where, data, safety)
    return docs, window


def _production_documents(store, endpoint: str | None, since: datetime, until: datetime, where: str | None,
                          data: DataConfig, safety: SafetyConfig) -> tuple[list[Doc], dict, list[dict]]:
    """production_documents, and a record of each duplicate removed (as ingest's report keeps them)."""
    if where is not None and where not in WHERE:
        raise LmopsError(f"--where {where!r}: the only filter is 'drifted' (requests inside monitor runs that "
                         "raised a prompt drift alert); leave it out for every request of the window")
    drift = drifted_windows(store, endpoint, since, until) if where == "drifted" else None
    rows = store.requests.rows(since=since, until=until, endpoint=endpoint, columns=COLUMNS)
    counts = {"blocked": 0, "not_ok": 0, "no_prompt": 0, "outside_drift": 0}
    removed = {rule: 0 for rule in RULES}
    pii = {kind: 0 for kind in PII_KINDS}
    candidates: list[Doc] = []
    eligible = 0
    for row in rows:
        if _blocked(row.moderation):
            counts["blocked"] += 1
        elif row.status_code != 200:
            counts["not_ok"] += 1
        elif not row.prompt:
            counts["no_prompt"] += 1
        elif drift is not None and not any(w.holds(row.endpoint, row.ts) for w in drift):
            counts["outside_drift"] += 1
        else:
            eligible += 1
            text = clean_text(row.prompt)
            if rule := filter_rule(text, data, safety.blocklist):
                removed[rule] += 1
                continue
            text, found = redact_pii(text, safety.pii_kinds)
            for kind, n in found.items():
                pii[kind] += n
            candidates.append(Doc(doc_id(text), text, PRODUCTION_SOURCE + row.request_id))
    kept, duplicates = deduplicate(candidates, data.near_dup_threshold)
    for d in duplicates:
        removed[d["rule"]] += 1
    window = {
        "endpoint": endpoint, "since": since.isoformat(), "until": until.isoformat(), "where": where,
        "requests_read": len(rows), **counts, "prompts_eligible": eligible,
        "prompts_after_filters": len(candidates), "prompts": len(kept), "removed": removed,
        "duplicates": len(duplicates), "pii": pii,
    }
    if drift is not None:
        window["drift_windows"] = [{"run_id": w.run_id, "endpoint": w.endpoint, "start": w.start.isoformat(),
                                    "end": w.end.isoformat(), "signals": list(w.signals)} for w in drift]
    return kept, window, duplicates


def _too_few(window: dict, found: int, need: int) -> LmopsError:
    drifted = window["where"] == "drifted"
    where = f" inside the {len(window['drift_windows'])} monitor window(s) with a prompt drift alert" if drifted else ""
    filtered = sum(window["removed"][r] for r in FILTER_RULES)
    outside = f"{window['outside_drift']} outside those windows, " if drifted else ""
    return LmopsError(
        f"{found} usable prompt(s) in the request log of {window['endpoint'] or 'every endpoint'} from "
        f"{window['since']} to {window['until']}{where}, fewer than data.min_documents ({need}): "
        f"{window['requests_read']} request(s) read, {window['blocked']} blocked by moderation, {window['not_ok']} "
        f"not answered 200, {window['no_prompt']} without a prompt, {outside}{filtered} removed by the data "
        f"filters, {window['duplicates'] + window.get('duplicates_of_corpus', 0)} duplicates. No dataset version "
        "of them was written: widen --since, drop --where, or wait for more traffic"
    )


# ---- the corpus side -------------------------------------------------------------------------------


def corpus_version(ws, cfg: Config, store, actor: str, progress: bool = False) -> DatasetVersion:
    """The newest dataset version in the store made from the files of data.corpus as they are now (not
    one mixed with production prompts); when there is none, data.corpus is ingested (lmops.stages.ingest)."""
    from lmops.util import sha256_file

    files, _ = source_files(cfg.data.corpus, ws.root, exclude=ws.state)
    wanted = sorted(sha256_file(p) for p in files)
    for record in reversed(store.datasets.list()):
        try:
            version = load_dataset(ws.state, record.id)
        except LmopsError:  # its folder is gone
            continue
        if "lineage" in version.manifest:
            continue
        if sorted(str(s.get("sha256")) for s in version.report.get("sources", [])) == wanted:
            return version
    from lmops import stages

    return stages.ingest(ws, cfg, store, actor, progress=progress)


def corpus_documents(version: DatasetVersion) -> list[tuple[Doc, str]]:
    """(document, split) of a version, in its order."""
    texts = dict(iter_documents(version))
    return [(Doc(d["id"], texts[d["id"]], d["source"]), d["split"]) for d in version.manifest["documents"]]


# ---- mixing ----------------------------------------------------------------------------------------


def _chars(docs: list[Doc]) -> int:
    return sum(len(d.text) for d in docs)


def sample(docs: list[Doc], target: float) -> list[Doc]:
    """Whole documents of docs (in their order) adding up to about target characters: taken in the order
    of a hash of their ids (deterministic; not the split's order) when each brings the total closer to
    target. Never empty: if every document is too long, the shortest."""
    order = sorted(docs, key=lambda d: hashlib.sha256(b"mix:" + d.id.encode()).digest())
    chosen, total = set(), 0
    for d in order:
        if len(d.text) < 2 * (target - total):
            chosen.add(d.id)
            total += len(d.text)
    if not chosen and docs:
        chosen.add(min(docs, key=lambda d: (len(d.text), d.id)).id)
    return [d for d in docs if d.id in chosen]


def balance(corpus: list[Doc], production: list[Doc], mix: float) -> tuple[list[Doc], list[Doc]]:
    """Subsets of both sides in which production makes up about `mix` of the characters: the larger side
    is subsampled, then, if whole documents left it short of its target, the other side once."""
    for _ in range(2):
        c, p = _chars(corpus), _chars(production)
        if not c or not p or abs(p / (p + c) - mix) <= MIX_TOLERANCE:
            break
        if p / (p + c) > mix:
            production = sample(production, mix / (1 - mix) * c)
        else:
            corpus = sample(corpus, (1 - mix) / mix * p)
    return corpus, production


def mix_documents(corpus: list[tuple[Doc, str]], production: list[tuple[Doc, str]],
                  mix: float) -> tuple[list[tuple[Doc, str]], dict]:
    """(document, split) of the mixed version, corpus first, each side in its order, balanced within each
    split (a split with nothing on one side is kept as it is); and, per split, what it holds."""
    corpus_ids = {d.id for d, _ in corpus}
    production = [(d, s) for d, s in production if d.id not in corpus_ids]
    kept: set[str] = set()
    info: dict = {"target": mix}
    for split in ("train", "val"):
        c, p = balance([d for d, s in corpus if s == split], [d for d, s in production if s == split], mix)
        kept |= {d.id for d in c} | {d.id for d in p}
        cc, pc = _chars(c), _chars(p)
        info[split] = {"corpus_documents": len(c), "corpus_chars": cc, "production_documents": len(p),
                       "production_chars": pc, "production_share": round(pc / (pc + cc), 4) if pc + cc else None}
    return [(d, s) for d, s in [*corpus, *production] if d.id in kept], info


# ---- the stage -------------------------------------------------------------------------------------


def _report(window: dict, fresh: list[Doc], duplicates: list[dict], mixed: list[tuple[Doc, str]],
            corpus: DatasetVersion, mix_info: dict, cfg: Config) -> dict:
    """A report in ingest's shape (render_report, check_gates and diff read it) of what was done to the
    prompts (documents_in: those that reached the filters; documents_out: those kept, before the mix),
    with the window, the corpus and the mix (the manifest's totals count the version)."""
    docs = [d for d, _ in mixed]
    return {
        "documents_in": window["prompts_eligible"],
        "documents_after_filters": window["prompts_after_filters"],
        "documents_out": len(fresh),
        "removed": window["removed"],
        "duplicate_ratio": round(len(duplicates) / window["prompts_after_filters"], 6),
        "duplicates": duplicates,
        "pii": window["pii"],
        "chars_out": _chars(fresh),
        "lengths": _lengths(fresh),
        "quarantined_count": 0, "quarantined": [], "skipped_count": 0, "skipped": [],
        "sources": [*corpus.report.get("sources", []),
                    {"path": "request_log", "format": "requests", "bytes": None, "sha256": None,
                     "documents": window["used"], "window": {k: window[k] for k in ("endpoint", "since", "until",
                                                                                     "where")}}],
        "settings": {
            **cfg.data.model_dump(mode="json", include={
                "min_chars", "max_chars", "min_alpha_fraction", "max_repeated_line_fraction", "near_dup_threshold",
                "mix"}),
            "scrub_pii": True, "pii_kinds": list(cfg.safety.pii_kinds), "blocklist_terms": len(cfg.safety.blocklist),
        },
        "requests": window,
        "corpus": {"dataset": corpus.id, "documents": corpus.manifest["totals"]["documents"],
                   "used": sum(not is_production(d.source) for d in docs)},
        "mix": mix_info,
    }


def ingest_requests(ws, cfg: Config, store, actor: str, endpoint: str | None = None, since=None, until=None,
                    where: str | None = None, progress: bool = False) -> DatasetVersion:
    """The prompts of the request log's window [since, until) (durations back from now such as '24h' or
    timedeltas, ISO times or datetimes; default the last 24 hours) of endpoint (None: all), where=None or 'drifted',
    mixed with the corpus into a dataset version whose parent is the corpus version; recorded in the store
    and the audit log (dataset.created, with the window). See the module docstring."""
    from rich.console import Console

    from lmops.data.ingest import render_report
    from lmops.store import utcnow

    if not cfg.data.use_production_prompts:
        raise LmopsError(
            "data.use_production_prompts is false: the request log's prompts are your users' data, and "
            "training on them needs their consent or a data-use policy that allows it. Once it does, set "
            "data.use_production_prompts: true in lmops.yaml (or --set data.use_production_prompts=true)"
        )
    start, end = window_bounds(since, until, utcnow())
    prompts, window, duplicates = _production_documents(store, endpoint, start, end, where, cfg.data, cfg.safety)
    need = max(cfg.data.min_documents, 1)
    if len(prompts) < need:
        raise _too_few(window, len(prompts), need)

    corpus = corpus_version(ws, cfg, store, actor, progress)
    corpus_docs = corpus_documents(corpus)
    kept, against = deduplicate([d for d, _ in corpus_docs] + prompts, cfg.data.near_dup_threshold)  # corpus first
    against = [r for r in against if is_production(r["source"])]
    mine = set(prompts)
    fresh = [d for d in kept if d in mine]
    for r in against:
        window["removed"][r["rule"]] += 1
    window["duplicates_of_corpus"] = len(against)
    duplicates += against
    if len(fresh) < need:
        raise _too_few(window, len(fresh), need)

    production = split_documents(fresh, cfg.data.val_fraction, cfg.data.split_within_chars)
    mixed, mix_info = mix_documents(corpus_docs, production, cfg.data.mix)
    used = list(dict.fromkeys(request_id_of(d.source) for d, _ in mixed if is_production(d.source)))
    window.update(used=len(used), left_out_by_mix=len(fresh) - len(used),
                  first_request_id=used[0] if used else None, last_request_id=used[-1] if used else None)
    report = _report(window, fresh, duplicates, mixed, corpus, mix_info, cfg)
    lineage = {"corpus": corpus.id, "requests": window, "mix": mix_info}
    version = write_dataset([d for d, _ in mixed], report, ws.state, cfg.data.val_fraction, parent=corpus.id,
                            split_within=cfg.data.split_within_chars, splits={d.id: s for d, s in mixed},
                            lineage=lineage)
    Console(stderr=True).print(render_report(version.report))
    known = {d.id for d in store.datasets.list()}
    n = version.manifest["totals"]["documents"]
    summary = {k: report[k] for k in ("documents_in", "documents_out", "duplicate_ratio", "pii")}
    store.datasets.add(version.id, version.short_id, str(version.path), corpus.id, n, actor,
                       {**summary, "requests": _brief(window)})
    if version.id not in known:
        store.audit.append(actor, "dataset.created", f"dataset:{version.short_id}",
                           {"id": version.id, "documents": n, "parent": corpus.id, "requests": _brief(window)})
    return version


def _brief(window: dict) -> dict:
    """The window as the store and the audit log record it."""
    keys = ("endpoint", "since", "until", "where", "requests_read", "used", "blocked", "duplicates",
            "duplicates_of_corpus", "first_request_id", "last_request_id")
    return {k: window.get(k) for k in keys}


def describe(version: DatasetVersion) -> list[str]:
    """Lines saying where a version's production prompts came from ([] for a version without them)."""
    lineage = version.manifest.get("lineage") or {}
    w = lineage.get("requests")
    if not w:
        return []

    def when(iso: str) -> str:
        return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")

    drifted = w.get("where") == "drifted"
    where = f", where drifted ({len(w.get('drift_windows', []))} monitor window(s) with a prompt drift alert)" \
        if drifted else ""
    left_out = [f"{w['blocked']} blocked by moderation (never used)", f"{w['not_ok']} not answered 200",
                f"{w['no_prompt']} without a prompt", *([f"{w['outside_drift']} outside drift"] if drifted else []),
                f"{w['prompts_eligible'] - w['prompts_after_filters']} removed by the data filters",
                f"{w['duplicates']} duplicates", f"{w.get('duplicates_of_corpus', 0)} duplicates of the corpus",
                f"{w.get('left_out_by_mix', 0)} left out by data.mix"]
    lines = [
        f"from the request log: endpoint {w.get('endpoint') or '(all)'}, {when(w['since'])} .. {when(w['until'])} UTC"
        + where,
        f"  {w['requests_read']} request(s) read, {w['used']} used; " + ", ".join(left_out),
        f"  requests {w.get('first_request_id')} .. {w.get('last_request_id')}",
    ]
    mix = lineage.get("mix") or {}
    shares = ", ".join(f"{mix[s]['production_share']:.1%} of the {name} characters" for s, name in
                       (("train", "training"), ("val", "validation")) if mix.get(s, {}).get("production_share") is not None)
    lines.append(f"  mixed with corpus dataset {str(lineage.get('corpus'))[:12]}: production prompts {shares or '-'} "
                 f"(data.mix {mix.get('target')})")
    return lines

