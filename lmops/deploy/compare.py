"""`lmops endpoint compare`: the answer scores of an endpoint summarised per deployment, pure over a list
of score records (lmops/store/scores.py), with 95% confidence intervals (Student's t on the mean).

Per deployment: rows (live and shadow), mean prompt_nll and answer_nll with their intervals, the share
of answers moderation flagged, answer length (tokens), the share of each stop reason (length, stop, ...),
time to first token and latency (each a mean with its interval), and for a shadow deployment the greedy
agreement rate with the live answer. Pairs (a shadow row and the live row of the same request) also give the paired
difference of answer_nll, shadow minus live, both scored by the one reference model: the sharpest
comparison, since each pair shares its prompt.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from lmops.errors import LmopsError

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str, what: str = "duration") -> timedelta:
    """'90s', '2m', '1.5h', '7d', '30' (seconds) -> timedelta; a clear error for anything else."""
    m = _DURATION.fullmatch(text or "")
    if not m or float(m[1]) <= 0:
        raise LmopsError(f"{what} {text!r}: write a positive number with a unit, e.g. 90s, 2m, 1h, 7d")
    return timedelta(seconds=float(m[1]) * _UNIT_S[m[2]])


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float | None  # None: fewer than two values, no interval
    high: float | None
    n: int

    def __str__(self) -> str:
        return self.format()

    def format(self, spec: str = ".3f") -> str:
        if self.low is None:
            return format(self.mean, spec)
        return f"{format(self.mean, spec)} ± {format((self.high - self.low) / 2, spec)}"


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Interval | None:
    """Mean with a Student's t confidence interval; None for no values."""
    n = len(values)
    if n == 0:
        return None
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, None, None, n)
    from scipy import stats

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def _rate(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _shares(values: Sequence[str]) -> dict[str, float]:
    counts: dict[str, int] = defaultdict(int)
    for v in values:
        counts[v] += 1
    return {k: c / len(values) for k, c in sorted(counts.items(), key=lambda kc: (-kc[1], kc[0]))}


@dataclass(frozen=True)
class DeploymentSummary:
    deployment: str
    rows: int
    live: int
    shadow: int  # = pairs, when its live rows were kept
    prompt_nll: Interval | None
    answer_nll: Interval | None
    answer_nll_vs_live: Interval | None  # paired: shadow minus live on the same requests
    flag_rate: float | None
    answer_tokens: Interval | None  # answer length (completion tokens)
    stop_reasons: dict[str, float]  # share of the answers per finish reason, largest first
    ttft_s: Interval | None  # time to first token
    latency_s: Interval | None
    agreement: float | None  # shadow rows whose greedy answer equalled the live one
    errors: int

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def summarise(scores: Iterable[Any]) -> list[DeploymentSummary]:
    """One summary per deployment, by name."""
    rows = list(scores)
    live_by_request = {r.request_id: r for r in rows if r.role == "live"}
    by: dict[str, list[Any]] = defaultdict(list)
    for r in rows:
        by[r.deployment].append(r)
    out = []
    for name in sorted(by):
        mine = by[name]
        shadow = [r for r in mine if r.role == "shadow"]
        diffs = [r.answer_nll - live_by_request[r.request_id].answer_nll for r in shadow
                 if r.answer_nll is not None and r.request_id in live_by_request
                 and live_by_request[r.request_id].answer_nll is not None]
        out.append(DeploymentSummary(
            deployment=name, rows=len(mine), live=len(mine) - len(shadow), shadow=len(shadow),
            prompt_nll=mean_ci([r.prompt_nll for r in mine if r.prompt_nll is not None]),
            answer_nll=mean_ci([r.answer_nll for r in mine if r.answer_nll is not None]),
            answer_nll_vs_live=mean_ci(diffs),
            flag_rate=_rate([bool(r.flagged) for r in mine if r.flagged is not None]),
            answer_tokens=mean_ci([float(r.completion_tokens) for r in mine if r.completion_tokens is not None]),
            stop_reasons=_shares([r.finish_reason for r in mine if r.finish_reason]),
            ttft_s=mean_ci([r.ttft_s for r in mine if r.ttft_s is not None]),
            latency_s=mean_ci([r.latency_s for r in mine if r.latency_s is not None]),
            agreement=_rate([bool(r.agree) for r in shadow if r.agree is not None]),
            errors=sum(1 for r in mine if r.error),
        ))
    return out


@dataclass(frozen=True)
class FeedbackSummary:
    deployment: str
    feedback: int  # feedback rows on its requests
    requests: int  # requests it answered in the window
    rate: float | None  # feedback per request (None: no requests)
    score: Interval | None  # mean score (0..1) with its interval

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def summarise_feedback(feedback: Iterable[Any], request_deployments: Iterable[str | None]) -> list[FeedbackSummary]:
    """Per deployment (by name): feedback rows (store.feedback) and requests of the same window (the
    deployment of each request_log row); deployments with neither are left out."""
    scores: dict[str, list[float]] = defaultdict(list)
    for f in feedback:
        scores[f.deployment or ""].append(float(f.score))
    requests: dict[str, int] = defaultdict(int)
    for d in request_deployments:
        requests[d or ""] += 1
    return [FeedbackSummary(name, len(scores.get(name, [])), requests.get(name, 0),
                            len(scores.get(name, [])) / requests[name] if requests.get(name) else None,
                            mean_ci(scores.get(name, [])))
            for name in sorted(scores.keys() | requests.keys())]
