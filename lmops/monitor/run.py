"""One monitor run: a window of the request log, per deployment, against a reference; every signal of
lmops/monitor/signals.py measured, judged against its threshold, stored, and alerted on.

The reference (monitor.reference):
- training (default): lines of the validation split of the dataset the deployed version was trained
  on, found through the registry's lineage; a model without lineage (a local checkpoint) falls back to
  the log;
- log: the deployment's requests before the window (as many as monitor.reference_size);
- a dataset version id.
Answers have no reference in a corpus: the answer signals always compare with the log before the
window.

Thresholds are calibrated on the reference itself: the statistic between two disjoint samples of the
reference, each of the window's size, over monitor.calibration_rounds draws; the threshold is its
(1 - alpha) quantile, alpha being monitor.false_alarm_rate split evenly over the drift signals (so a
run on traffic like the reference alerts with about that probability, whatever the model, tokenizer,
window size or number of signals; beyond the draws' reach the tail is a fitted normal).
monitor.thresholds fixes one instead. The domain classifier's AUC has a known null (Mann-Whitney's)
and is calibrated from it.
Statistics are computed on samples of bounded size (the window and the reference both subsampled),
so a run over 100k requests costs about what one over 2k does; the sizes are in each result.

Operations and feedback signals are values of the window, judged by monitor.rules (e.g. error_rate
above 0.02 for 300 s).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import torch
from scipy.stats import norm

from lmops.config import AlertRule, Config
from lmops.errors import LmopsError
from lmops.monitor import features as F
from lmops.monitor import stats
from lmops.monitor.signals import SIGNALS
from lmops.store import Store, utcnow

log = logging.getLogger("lmops.monitor")

COLUMNS = ("ts", "request_id", "endpoint", "deployment", "model", "model_version", "status_code", "prompt",
           "completion", "prompt_tokens", "completion_tokens", "ttft_s", "latency_s", "moderation", "finish_reason")
SEED = 0  # samples are drawn reproducibly: the same log and reference give the same numbers


@dataclass
class Result:
    signal: str
    value: float | None
    threshold: float | None = None
    p_value: float | None = None
    n_reference: int | None = None
    n_window: int | None = None
    alert: bool = False
    reference: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    rule: str | None = None

    @property
    def kind(self) -> str:
        return SIGNALS[self.signal].kind


@dataclass
class GroupReport:
    """One deployment's window and its results."""

    endpoint: str | None
    deployment: str | None
    model_version: str | None
    requests: int
    reference: str
    results: list[Result]
    notes: list[str] = field(default_factory=list)

    @property
    def alerts(self) -> list[Result]:
        return [r for r in self.results if r.alert]


@dataclass
class Report:
    run_id: str
    since: datetime
    until: datetime
    groups: list[GroupReport]
    seconds: float = 0.0

    @property
    def alerts(self) -> list[tuple[GroupReport, Result]]:
        return [(g, r) for g in self.groups for r in g.alerts]


# ------------------------------------------------------------------------------------- the target


@dataclass
class Target:
    """What is monitored: the requests of one deployment (or of one model without an endpoint), the model
    that answered them and where its reference comes from."""

    endpoint: str | None
    deployment: str | None
    source: str  # a ModelSource reference
    version: str | None
    registered: str | None  # NAME@VERSION for lineage, None for a local model


def targets(ws, cfg: Config, store: Store, endpoint: str | None, model: str | None) -> list[Target]:
    if model is not None:
        from lmops.serve.source import ModelSource

        src = ModelSource(ws, cfg, model)
        version = src.version()
        registered = None if src.path is not None else f"{src.registered}@{version}"
        return [Target(None, None, model, version, registered)]
    endpoints = [store.endpoints.get(endpoint)] if endpoint is not None else store.endpoints.list()
    if not endpoints:
        raise LmopsError("no endpoint to monitor: create one (lmops endpoint create), or name a model with --model")
    out = []
    for ep in endpoints:
        for d in ep.deployments.values():
            registered = f"{d.model_name}@{d.model_version}" if d.model_uri.startswith("models:/") else None
            out.append(Target(ep.name, d.name, d.model_uri, d.model_version, registered))
    return out


def _rows_of(rows: list, t: Target) -> list:
    if t.endpoint is not None:
        return [r for r in rows if r.endpoint == t.endpoint and r.deployment == t.deployment]
    return [r for r in rows if r.endpoint is None and r.model_version == t.version]


# ------------------------------------------------------------------------------------ references


def training_prompts(ws, cfg: Config, t: Target, size: int, rng: np.random.Generator) -> tuple[list[str], str] | None:
    """Lines of the validation split of the dataset a registered version was trained on."""
    dataset = cfg.monitor.reference if cfg.monitor.reference not in ("training", "log") else None
    if dataset is None:
        if t.registered is None:
            return None
        from lmops import registry

        dataset = registry.lineage(ws, cfg, t.registered)["dataset"].get("id")
        if not dataset:
            return None
    return dataset_prompts(ws, dataset, size, rng)


def dataset_prompts(ws, dataset: str, size: int, rng: np.random.Generator) -> tuple[list[str], str]:
    from lmops.data.dataset import iter_documents, load_dataset

    version = load_dataset(ws.state, dataset)
    lines = [ln.strip() for _, text in iter_documents(version, "val") for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise LmopsError(f"dataset {version.short_id} has no validation text to compare prompts with; "
                         "set monitor.reference to log")
    if len(lines) > size:
        lines = [lines[i] for i in sorted(rng.choice(len(lines), size, replace=False))]
    return lines, f"dataset {version.short_id} validation split ({len(lines)} lines)"


# ---------------------------------------------------------------------------------- calibration


def signal_alpha(cfg: Config) -> float:
    """Each drift signal's share of the run's false alarm rate (Bonferroni: the run alerts on traffic
    like the reference with probability at most monitor.false_alarm_rate, whatever the number of signals)."""
    judged = [s for s in (cfg.monitor.signals or SIGNALS) if SIGNALS[s].drift and s not in cfg.monitor.thresholds]
    return cfg.monitor.false_alarm_rate / max(1, len(judged))


def _quantile(null: list[float], cfg: Config) -> float:
    """The (1 - alpha) quantile of the statistic between reference samples: empirical when the draws
    reach that far into the tail (5 or more beyond it), else a normal tail fitted to the draws, never
    below their maximum."""
    x, alpha = np.asarray(null, float), signal_alpha(cfg)
    if len(x) * alpha >= 5:
        return float(np.quantile(x, 1 - alpha))
    return float(max(x.max(), x.mean() + norm.isf(alpha) * x.std(ddof=1)))


def _pairs(pool: int, m: int, rounds: int, rng: np.random.Generator):
    """Disjoint index pairs (a, b), each of m, from range(pool)."""
    for _ in range(rounds):
        perm = rng.permutation(pool)
        yield perm[:m], perm[m:2 * m]


def _judged(results: list[Result], cfg: Config, n_window: int) -> list[Result]:
    fixed = cfg.monitor.thresholds
    for r in results:
        if r.signal in fixed:
            r.threshold, r.details["calibrated"] = fixed[r.signal], False
        r.alert = (r.value is not None and r.threshold is not None and n_window >= cfg.monitor.min_requests
                   and math.isfinite(r.value) and r.value > r.threshold)
    return results


# --------------------------------------------------------------------------------- the signals


def prompt_signals(ref: F.PromptFeatures, win: F.PromptFeatures, cfg: Config, rng: np.random.Generator,
                   reference: str) -> list[Result]:
    """Distribution signals of prompts (no model): the window against a reference sample of its size."""
    m = min(len(win), len(ref) // 2)
    if m < 2:
        return []
    win = win.take(rng.choice(len(win), m, replace=False)) if len(win) > m else win

    def measures(a: F.PromptFeatures, b: F.PromptFeatures) -> dict[str, float]:
        return {
            "prompt_length_psi": stats.psi(a.lengths, b.lengths),
            "prompt_length_wasserstein": stats.wasserstein(a.lengths, b.lengths),
            "prompt_tokens_js": stats.js(np.asarray(a.tokens.sum(0)).ravel(), np.asarray(b.tokens.sum(0)).ravel()),
            "prompt_chars_js": stats.js(a.chars.sum(0), b.chars.sum(0)),
            "prompt_unmerged": abs(float(b.unmerged.mean() - a.unmerged.mean())),
        }

    pairs = list(_pairs(len(ref), m, cfg.monitor.calibration_rounds, rng))
    ref_sample = ref.take(pairs[0][0])
    observed = measures(ref_sample, win)
    null = [measures(ref.take(a), ref.take(b)) for a, b in pairs]
    return [Result(name, value, _quantile([n[name] for n in null], cfg), None, m, m, reference=reference,
                   details={"calibrated": True})
            for name, value in observed.items()]


def model_signals(ref: F.ModelFeatures, win: F.ModelFeatures, cfg: Config, rng: np.random.Generator,
                  reference: str) -> list[Result]:
    """prompt_nll, embedding_mmd and embedding_auc: the window sample against half the reference sample,
    calibrated on the reference's own halves."""
    m = min(len(win), len(ref) // 2)
    if m < 4:
        return []
    gen = torch.Generator().manual_seed(SEED)
    pairs = list(_pairs(len(ref), m, cfg.monitor.calibration_rounds, rng))
    a0 = pairs[0][0]
    out = []
    # prompt_nll: how much more the model is surprised by the window than by its own validation text, as
    # the difference of medians (a prompt's loss is heavy-tailed: a few tables or lists of numbers would
    # move a mean more than a change of language does); the means, its perplexity, are in the details
    rn, wn = ref.prompt_nll, win.prompt_nll[:m]
    ok = ~np.isnan(rn)
    if ok.sum() >= 4 and (~np.isnan(wn)).sum() >= 2:
        def diff(a, b):
            return float(np.nanmedian(b) - np.nanmedian(a))
        value = diff(rn[a0], wn)
        null = [diff(rn[a], rn[b]) for a, b in pairs]
        out.append(Result("prompt_nll", value, _quantile(null, cfg),
                          stats.mean_diff_p(rn[a0][~np.isnan(rn[a0])], wn[~np.isnan(wn)]), m, m, reference=reference,
                          details={"calibrated": True, "window_nll": float(np.nanmean(wn)),
                                   "reference_nll": float(np.nanmean(rn[a0])),
                                   "window_perplexity": float(np.exp(np.nanmean(wn)))}))
    # embeddings: MMD with a permutation test; the kernel's bandwidth from the reference
    re_, we = ref.embeddings, win.embeddings[:m]
    bw = stats.rbf_bandwidth(re_.double())
    value, p = stats.mmd_test(re_[a0], we, bw, cfg.monitor.permutations, gen)
    k = stats.kernel(re_.double(), bw)
    a_side = torch.zeros(len(pairs), len(re_), dtype=torch.float64)
    b_side = torch.zeros_like(a_side)
    for i, (a, b) in enumerate(pairs):
        a_side[i, a], b_side[i, b] = 1, 1
    null = stats.mmd2_splits(k, a_side, b_side).tolist()
    out.append(Result("embedding_mmd", value, _quantile(null, cfg), p, m, m, reference=reference,
                      details={"calibrated": True, "bandwidth": bw, "permutations": cfg.monitor.permutations}))
    auc, p_auc = stats.domain_auc(re_[a0], we, seed=SEED)
    out.append(Result("embedding_auc", auc, stats.auc_threshold(m, m, signal_alpha(cfg)), p_auc, m, m,
                      reference=reference, details={"calibrated": True, "null": "Mann-Whitney"}))
    return out


def answer_signals(ref: F.AnswerFeatures, win: F.AnswerFeatures, ref_conf: np.ndarray | None,
                   win_conf: np.ndarray | None, cfg: Config, rng: np.random.Generator, reference: str) -> list[Result]:
    m = min(len(win), len(ref) // 2)
    if m < 2:
        return []
    pick = rng.choice(len(win), m, replace=False) if len(win) > m else np.arange(len(win))
    w = win.take(pick)

    def measures(a: F.AnswerFeatures, b: F.AnswerFeatures) -> dict[str, float]:
        return {
            "answer_length": stats.wasserstein(a.lengths, b.lengths),
            "answer_stop_js": stats.js(np.bincount(a.stops, minlength=len(F.STOPS)),
                                       np.bincount(b.stops, minlength=len(F.STOPS))),
            "answer_repetition": abs(float(b.repetition.mean() - a.repetition.mean())),
            "answer_moderation_rate": abs(float(b.moderated.mean() - a.moderated.mean())),
        }

    pairs = list(_pairs(len(ref), m, cfg.monitor.calibration_rounds, rng))
    observed = measures(ref.take(pairs[0][0]), w)
    null = [measures(ref.take(a), ref.take(b)) for a, b in pairs]
    out = [Result(name, value, _quantile([n[name] for n in null], cfg), None, m, m, reference=reference,
                  details={"calibrated": True}) for name, value in observed.items()]
    if ref_conf is not None and win_conf is not None:
        rc, wc = ref_conf[~np.isnan(ref_conf)], win_conf[~np.isnan(win_conf)]
        k = min(len(wc), len(rc) // 2)
        if k >= 2:
            cpairs = list(_pairs(len(rc), k, cfg.monitor.calibration_rounds, rng))
            # less confident than before: positive; medians, as for prompt_nll
            value = float(np.median(rc[cpairs[0][0]]) - np.median(wc[:k]))
            cnull = [float(np.median(rc[a]) - np.median(rc[b])) for a, b in cpairs]
            out.append(Result("answer_logprob", value, _quantile(cnull, cfg),
                              stats.mean_diff_p(-rc[cpairs[0][0]], -wc[:k]), k, k, reference=reference,
                              details={"calibrated": True, "window_logprob": float(wc[:k].mean())}))
    return out


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def operations(rows: list, seconds: float) -> dict[str, float | None]:
    n = len(rows)
    ttft = [r.ttft_s for r in rows if r.ttft_s is not None]
    lat = [r.latency_s for r in rows if r.latency_s is not None]
    per_token = [(r.latency_s - r.ttft_s) / (r.completion_tokens - 1) for r in rows
                 if r.latency_s is not None and r.ttft_s is not None and (r.completion_tokens or 0) > 1]
    return {
        "request_rate": n / seconds if seconds > 0 else None,
        "error_rate": sum(r.status_code >= 500 for r in rows) / n if n else None,
        "client_error_rate": sum(400 <= r.status_code < 500 for r in rows) / n if n else None,
        "ttft_p50_s": _pct(ttft, 50), "ttft_p95_s": _pct(ttft, 95), "ttft_p99_s": _pct(ttft, 99),
        "latency_p50_s": _pct(lat, 50), "latency_p95_s": _pct(lat, 95), "latency_p99_s": _pct(lat, 99),
        "token_latency_p50_s": _pct(per_token, 50), "token_latency_p95_s": _pct(per_token, 95),
    }


def _status_counts(rows: list) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[str(r.status_code)] = out.get(str(r.status_code), 0) + 1
    return out


def rule_holds(rule: AlertRule, value: float | None) -> bool:
    if value is None or not math.isfinite(value):
        return False
    return value > rule.above if rule.above is not None else value < rule.below


def apply_rules(results: list[Result], rows: list, cfg: Config, until: datetime) -> None:
    """Alert rules: over the run's value, or, with for_s, over each minute of the last for_s (every
    minute with requests must break the rule, and at least one minute has them)."""
    by = {r.signal: r for r in results}
    for rule in cfg.monitor.rules:
        r = by.get(rule.signal)
        if r is None:
            continue
        if rule.for_s and SIGNALS[rule.signal].kind == "operations":
            start = until - timedelta(seconds=rule.for_s)
            minutes: dict[int, list] = {}
            for row in rows:
                if row.ts >= start:
                    minutes.setdefault(int((row.ts - start).total_seconds() // 60), []).append(row)
            values = [operations(m, 60.0)[rule.signal] for m in minutes.values()]
            held = bool(values) and all(rule_holds(rule, v) for v in values)
        else:
            held = rule_holds(rule, r.value)
        if held:
            r.alert, r.rule = True, rule.text()
            r.threshold = rule.above if rule.above is not None else rule.below


# ------------------------------------------------------------------------------------------ a run


class ModelCache:
    """Models loaded during a run (and across runs of one process: `lmops monitor watch`, the server)."""

    def __init__(self, ws, cfg: Config):
        self.ws, self.cfg = ws, cfg
        self.loaded: dict[tuple[str, str | None], Any] = {}

    def get(self, source: str, version: str | None):
        key = (source, version)
        if key not in self.loaded:
            from lmops.serve.source import ModelSource

            self.loaded[key] = ModelSource(self.ws, self.cfg, source).load(version)
        return self.loaded[key]


def monitor_group(ws, cfg: Config, store: Store, t: Target, rows: list, since: datetime, until: datetime,
                  models: ModelCache, progress: Callable[[str], None] | None = None) -> GroupReport:
    mc = cfg.monitor
    rng = np.random.default_rng(SEED)
    wanted = set(mc.signals or SIGNALS)
    seconds = (until - since).total_seconds()
    results: list[Result] = []
    notes: list[str] = []
    statuses = _status_counts(rows)
    for name, value in operations(rows, seconds).items():
        details = {"status": statuses} if name in ("error_rate", "client_error_rate") else {}
        results.append(Result(name, value, None, None, None, len(rows), details=details))
    if t.endpoint is not None:
        fb = [f for f in store.feedback.list(t.endpoint, since=since, until=until) if f.deployment == t.deployment]
        results.append(Result("feedback_rate", len(fb) / len(rows) if rows else None, n_window=len(fb)))
        results.append(Result("feedback_score", float(np.mean([f.score for f in fb])) if fb else None,
                              n_window=len(fb)))
    answered = [r for r in rows if r.status_code < 400 and r.prompt]
    reference = None

    def sample(items: list, n: int) -> list:
        """At most n of items, drawn without replacement: features are computed for no more than are compared."""
        return [items[i] for i in rng.choice(len(items), n, replace=False)] if len(items) > n else items

    if answered and wanted & {s for s, v in SIGNALS.items() if v.kind in ("prompts", "embeddings", "answers")}:
        served = models.get(t.source, t.version)
        tok, model = served.tokenizer, served.model
        ref_texts = None
        if mc.reference != "log":
            found = training_prompts(ws, cfg, t, mc.reference_size, rng)
            if found is None:
                notes.append("no training lineage for this model (a local checkpoint): prompts compared with the log "
                             "before the window")
            else:
                ref_texts, reference = found
        history = _history(store, t, since, mc.reference_size)
        if ref_texts is None:
            ref_texts = [r.prompt for r in history if r.status_code < 400 and r.prompt]
            reference = f"the log before the window ({len(ref_texts)} prompts)"
        wf = None  # the window's model features: for the model signals and the answers' confidence
        if wanted & {"prompt_nll", "embedding_mmd", "embedding_auc", "answer_logprob"}:
            if progress:
                progress(f"{t.deployment or t.source}: model signals")
            win = sample(answered, mc.sample)
            wf = F.model_features(model, tok, [r.prompt for r in win], [r.completion for r in win],
                                  max_tokens=mc.max_tokens)
        if len(ref_texts) < 2 * mc.min_requests:
            notes.append(f"reference too small ({len(ref_texts)} prompts, {2 * mc.min_requests} needed): prompt "
                         "drift not measured")
        else:
            if progress:
                progress(f"{t.deployment or t.source}: prompts")
            results += prompt_signals(F.prompt_features(ref_texts, tok), F.prompt_features(
                [r.prompt for r in sample(answered, len(ref_texts) // 2)], tok), cfg, rng, reference)
            if wf is not None:
                rf = F.model_features(model, tok, sample(ref_texts, 2 * mc.sample), max_tokens=mc.max_tokens)
                results += model_signals(rf, wf, cfg, rng, reference)
        # answers: compared with the deployment's own earlier answers, whatever the prompts' reference
        past = [r for r in history if r.status_code < 400]
        if len(past) >= 2 * mc.min_requests:
            ref_conf = win_conf = None
            said = [r for r in past if r.prompt and r.completion]
            if wf is not None and said:
                said = sample(said, 2 * mc.sample)
                ref_conf = F.model_features(model, tok, [r.prompt for r in said], [r.completion for r in said],
                                            max_tokens=mc.max_tokens).answer_logprob
                win_conf = wf.answer_logprob
            results += answer_signals(F.answer_features(past), F.answer_features(sample(answered, len(past) // 2)),
                                      ref_conf, win_conf, cfg, rng, f"the log before the window ({len(past)} answers)")
        else:
            notes.append(f"{len(past)} answers before the window ({2 * mc.min_requests} needed): answer drift "
                         "not measured")
    elif not answered:
        notes.append("no answered prompts in the window")
    results = [r for r in results if r.signal in wanted]
    _judged(results, cfg, len(answered))
    apply_rules(results, rows, cfg, until)
    return GroupReport(t.endpoint, t.deployment, t.version, len(rows), reference or "-", results, notes)


def _history(store: Store, t: Target, before: datetime, size: int) -> list:
    """The target's requests before the window, newest first, up to size (the answers' reference)."""
    out: list = []
    until, step = before, timedelta(days=1)
    earliest = before - timedelta(days=30)
    while len(out) < size and until > earliest:
        rows = store.requests.rows(since=until - step, until=until, endpoint=t.endpoint, columns=COLUMNS, newest=True)
        out += _rows_of(rows, t)
        until -= step
        step *= 2
    return out[:size]


def run(ws, cfg: Config, store: Store, endpoint: str | None = None, model: str | None = None,
        window: timedelta | None = None, until: datetime | None = None, models: ModelCache | None = None,
        progress: Callable[[str], None] | None = None, record: bool = True) -> Report:
    """Measure, store (one row per deployment and signal) and return the report; alerts are recorded
    and delivered by lmops/monitor/alerts.py (the caller's choice: `notify`)."""
    import time

    started = time.perf_counter()
    until = until or utcnow()
    since = until - (window or timedelta(seconds=cfg.monitor.window_s))
    models = models or ModelCache(ws, cfg)
    rows = store.requests.rows(since=since, until=until, endpoint=endpoint, columns=COLUMNS)
    groups = [monitor_group(ws, cfg, store, t, _rows_of(rows, t), since, until, models, progress)
              for t in targets(ws, cfg, store, endpoint, model)]
    report = Report(uuid.uuid4().hex, since, until, groups, time.perf_counter() - started)
    if record:
        store.monitor.add([
            {"run_id": report.run_id, "ts": until, "endpoint": g.endpoint, "deployment": g.deployment,
             "model_version": g.model_version, "signal": r.signal, "kind": r.kind, "value": _finite(r.value),
             "threshold": _finite(r.threshold), "p_value": _finite(r.p_value), "n_reference": r.n_reference,
             "n_window": r.n_window, "window_start": since, "window_end": until, "reference": r.reference,
             "alert": r.alert, "details": {**r.details, **({"rule": r.rule} if r.rule else {})} or None}
            for g in groups for r in g.results])
    return report


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None
