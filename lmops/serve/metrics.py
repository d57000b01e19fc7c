"""Prometheus metrics of the server, named as vLLM's where they mean the same."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lmops.config import SafetyConfig
from lmops.safety import Moderation
from lmops.serve.engine import RequestHandle

# vLLM's buckets, with smaller ones added: a small model on a CPU answers in milliseconds.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)


class Metrics:
    """Prometheus metrics, named as vLLM's where they mean the same, in a registry of this app's own
    (several apps in one process, as in the tests, must not share counters)."""

    def __init__(self, stats: Callable[[], tuple[int, int]]):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("lmops:time_to_first_token_seconds", "From arrival at the engine to the first "
                              "token.", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("lmops:inter_token_latency_seconds", "Between consecutive output tokens, as the "
                             "server receives them.", buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("lmops:e2e_request_latency_seconds", "From arrival at the engine to the last "
                             "token.", buckets=E2E_BUCKETS, registry=r)
        self.queue = Histogram("lmops:request_queue_time_seconds", "Waiting for a batch slot.",
                               buckets=TTFT_BUCKETS, registry=r)
        running = Gauge("lmops:num_requests_running", "Requests in the running batch.", registry=r)
        waiting = Gauge("lmops:num_requests_waiting", "Requests waiting for a batch slot.", registry=r)
        running.set_function(lambda: stats()[0])
        waiting.set_function(lambda: stats()[1])
        self.prompt_tokens = Counter("lmops:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("lmops:generation_tokens", "Tokens generated.", registry=r)
        self.success = Counter("lmops:request_success", "Engine requests finished, by why.", ["finished_reason"],
                               registry=r)
        self.errors = Counter("lmops:request_errors", "Requests answered with an error, by its code.", ["reason"],
                              registry=r)
        self.moderation = Counter("lmops:moderation", "Moderation rules that found something.",
                                  ["rule", "action", "direction"], registry=r)
        self.shadow = Counter("lmops:shadow_jobs", "Answers queued for shadow scoring, by outcome (scored, dropped "
                              "when the queue was full, failed).", ["outcome"], registry=r)
        self.shadow_pending = Gauge("lmops:shadow_jobs_pending", "Answers queued for shadow scoring or being "
                                    "scored now.", registry=r)
        self.reloads = Counter("lmops:model_reloads", "Swaps to the version a followed alias moved to.",
                               ["result"], registry=r)

    def moderated(self, m: Moderation, cfg: SafetyConfig, direction: str) -> None:
        actions = {"pii": cfg.pii_action, "blocklist": cfg.blocklist_action, "injection": cfg.injection_action}
        for rule in m.hits:
            self.moderation.labels(rule, actions.get(rule, m.action), direction).inc()

    def finished(self, h: RequestHandle, gaps: list[float]) -> None:
        """A finished (or abandoned) engine request's timings and tokens."""
        if h.queued_at is not None:
            for value, metric in ((h.started_at, self.queue), (h.first_token_at, self.ttft),
                                  (h.finished_at, self.e2e)):
                if value is not None:
                    metric.observe(max(0.0, value - h.queued_at))
        for gap in gaps:
            self.itl.observe(gap)
        self.prompt_tokens.inc(h.prompt_tokens)
        self.generation_tokens.inc(h.completion_tokens)
