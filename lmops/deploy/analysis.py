"""Canary analysis as data, after Argo Rollouts' AnalysisTemplate: measure the canary and the stable
deployment over one window, judge each metric by its success and failure conditions, and say whether
the step passed.

Metrics, per deployment over [since, until):

- error_rate       share of requests answered with a status >= 500 (request log)
- p95_ttft_s       95th percentile of the time to first token (request log)
- p95_latency_s    95th percentile of the end-to-end latency (request log)
- moderation_rate  share of requests moderation acted on or flagged (request log: moderation set)
- prompt_nll       mean NLL per token of the prompt under the model that answered (answer scores, role live)
- answer_nll       mean NLL per token of the answer under the reference model (answer scores, role live)

Each metric's outcome, from its conditions over `canary` and `stable` (lmops.yaml, rollout.metrics):
- inconclusive: fewer than min_samples values on either side (too little traffic to say anything), or
  neither condition holds (the canary is in the grey zone between good enough and clearly worse);
- failed: the failure condition holds (checked first: a clearly broken canary fails even when its
  success condition would also hold);
- successful: the success condition holds.
A metric with no values on either side (e.g. no answer scores because nothing scores answers) is
`skipped`: not measured here, so it cannot hold a rollout back.

Overall: any metric failed -> failed; else any inconclusive -> inconclusive; else successful.

Everything here but `measure_store` is pure, over lists of records.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from lmops.deploy.expr import parse_condition

if TYPE_CHECKING:
    from lmops.config import MetricCondition
    from lmops.store import Store

METRICS = ("error_rate", "p95_ttft_s", "p95_latency_s", "moderation_rate", "prompt_nll", "answer_nll")
SUCCESSFUL, FAILED, INCONCLUSIVE, SKIPPED = "successful", "failed", "inconclusive", "skipped"
READ_LIMIT = 1_000_000  # request-log rows read per analysis: far more than a window of a laptop server holds


@dataclass(frozen=True)
class Sample:
    """One metric's value for one deployment, and how many values it was computed from."""

    value: float | None
    n: int


def _share(flags: Sequence[bool]) -> Sample:
    return Sample(sum(flags) / len(flags) if flags else None, len(flags))


def _p95(values: Sequence[float]) -> Sample:
    if not values:
        return Sample(None, 0)
    ordered = sorted(values)
    # linear interpolation between closest ranks (numpy's default), without numpy
    pos = 0.95 * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return Sample(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo), len(ordered))


def _mean(values: Sequence[float]) -> Sample:
    return Sample(sum(values) / len(values) if values else None, len(values))


def deployment_samples(requests: Iterable[Any], scores: Iterable[Any], deployment: str) -> dict[str, Sample]:
    """Every metric for one deployment, from request-log records (status_code, ttft_s, latency_s,
    moderation, deployment) and answer-score records (role, prompt_nll, answer_nll, deployment)."""
    reqs = [r for r in requests if r.deployment == deployment]
    live = [s for s in scores if s.deployment == deployment and s.role == "live"]
    return {
        "error_rate": _share([r.status_code >= 500 for r in reqs]),
        "p95_ttft_s": _p95([r.ttft_s for r in reqs if r.ttft_s is not None]),
        "p95_latency_s": _p95([r.latency_s for r in reqs if r.latency_s is not None]),
        "moderation_rate": _share([r.moderation is not None for r in reqs]),
        "prompt_nll": _mean([s.prompt_nll for s in live if s.prompt_nll is not None]),
        "answer_nll": _mean([s.answer_nll for s in live if s.answer_nll is not None]),
    }


@dataclass(frozen=True)
class Measurement:
    metric: str
    canary: float | None
    stable: float | None
    canary_n: int
    stable_n: int
    outcome: str
    success: str
    failure: str
    why: str

    def line(self) -> str:
        """One line a person reads: the metric, both values, the outcome and why."""
        def fmt(x: float | None) -> str:
            return "-" if x is None else f"{x:.4g}"
        return (f"{self.metric}: canary {fmt(self.canary)} (n={self.canary_n}) vs stable {fmt(self.stable)} "
                f"(n={self.stable_n}): {self.outcome} ({self.why})")


@dataclass(frozen=True)
class AnalysisResult:
    outcome: str
    canary: str
    stable: str
    since: datetime
    until: datetime
    measurements: list[Measurement] = field(default_factory=list)

    @property
    def failed_metrics(self) -> list[Measurement]:
        return [m for m in self.measurements if m.outcome == FAILED]

    @property
    def inconclusive_metrics(self) -> list[Measurement]:
        return [m for m in self.measurements if m.outcome == INCONCLUSIVE]

    def summary(self) -> str:
        bad = self.failed_metrics or self.inconclusive_metrics
        if not bad:
            return f"{self.outcome}: every metric passed"
        return f"{self.outcome}: " + "; ".join(m.line() for m in bad)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (non-finite numbers as None): what the rollouts row and the audit log keep."""
        out = asdict(self)
        out["since"], out["until"] = self.since.isoformat(), self.until.isoformat()
        for m in out["measurements"]:
            for k in ("canary", "stable"):
                if isinstance(m[k], float) and not math.isfinite(m[k]):
                    m[k] = None
        return out


def judge(metric: str, canary: Sample, stable: Sample, success: str, failure: str, min_samples: int) -> Measurement:
    """One metric's outcome (see the module docstring)."""
    def out(outcome: str, why: str) -> Measurement:
        return Measurement(metric, canary.value, stable.value, canary.n, stable.n, outcome, success, failure, why)

    if canary.n == 0 and stable.n == 0:
        return out(SKIPPED, "no values on either side")
    if canary.n < min_samples or stable.n < min_samples or canary.value is None or stable.value is None:
        return out(INCONCLUSIVE, f"fewer than {min_samples} values on a side")
    if parse_condition(failure).holds(canary.value, stable.value):
        return out(FAILED, f"failure condition {failure!r} holds")
    if parse_condition(success).holds(canary.value, stable.value):
        return out(SUCCESSFUL, f"success condition {success!r} holds")
    return out(INCONCLUSIVE, f"neither {success!r} nor {failure!r} holds")


def overall(measurements: Iterable[Measurement]) -> str:
    outcomes = [m.outcome for m in measurements]
    if FAILED in outcomes:
        return FAILED
    if INCONCLUSIVE in outcomes:
        return INCONCLUSIVE
    return SUCCESSFUL


def analyse(canary_requests: Sequence[Any], canary_scores: Sequence[Any], stable_requests: Sequence[Any],
            stable_scores: Sequence[Any], canary: str, stable: str, metrics: Mapping[str, MetricCondition],
            min_requests: int, since: datetime, until: datetime) -> AnalysisResult:
    """The analysis of one window: canary's records against stable's (the records may be the same
    lists, filtered here by deployment)."""
    c = deployment_samples(canary_requests, canary_scores, canary)
    s = deployment_samples(stable_requests, stable_scores, stable)
    ms = [judge(name, c[name], s[name], cond.success, cond.failure,
                cond.min_samples if cond.min_samples is not None else min_requests)
          for name, cond in metrics.items()]
    return AnalysisResult(overall(ms), canary, stable, since, until, ms)


def measure_store(store: Store, endpoint: str, canary: str, stable: str, since: datetime, until: datetime,
                  metrics: Mapping[str, MetricCondition], min_requests: int,
                  baseline_since: datetime | None = None) -> AnalysisResult:
    """analyse() over the store's request log and answer scores of [since, until).

    When the stable deployment has too few values in the window for a metric the canary has enough
    of (the last step of a canary gives it 0%: a few requests it served while the change spread, and
    fewer answer scores, would otherwise hold the rollout inconclusive to the end of the step), its
    side is measured from baseline_since instead (the rollout's start), so the canary at 100% is
    still compared with how stable did before."""
    requests = store.requests.list(limit=READ_LIMIT, since=since, until=until, endpoint=endpoint)
    scores = store.scores.list(endpoint, since=since, until=until)
    stable_requests, stable_scores = requests, scores
    if baseline_since is not None and baseline_since < since and \
            _stable_short(requests, scores, canary, stable, metrics, min_requests):
        stable_requests = store.requests.list(limit=READ_LIMIT, since=baseline_since, until=until, endpoint=endpoint)
        stable_scores = store.scores.list(endpoint, since=baseline_since, until=until)
    return analyse(requests, scores, stable_requests, stable_scores, canary, stable, metrics, min_requests,
                   since, until)


def _stable_short(requests: Sequence[Any], scores: Sequence[Any], canary: str, stable: str,
                  metrics: Mapping[str, MetricCondition], min_requests: int) -> bool:
    """Whether some metric has enough canary values in the window but too few stable ones."""
    c = deployment_samples(requests, scores, canary)
    s = deployment_samples(requests, scores, stable)
    for name, cond in metrics.items():
        need = cond.min_samples if cond.min_samples is not None else min_requests
        if c[name].n >= need > s[name].n:
            return True
    return False
