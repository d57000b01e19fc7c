"""A monitor run over a request log written here: in-distribution traffic raises no drift alert,
shifted traffic does (prompt perplexity and MMD among the signals), rules alert on operations,
alerts are recorded once and delivered to a webhook, or kept when it is down."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from lmops.config import override
from lmops.deploy.models import resolve_deployment
from lmops.monitor import alerts
from lmops.monitor.run import run
from lmops.store import Store, utcnow

from .conftest import heldout_lines, russian_lines

DRIFT = ("prompt_length_psi", "prompt_length_wasserstein", "prompt_tokens_js", "prompt_chars_js", "prompt_unmerged",
         "prompt_nll", "embedding_mmd", "embedding_auc")


@pytest.fixture
def monitored(corpus_model, tmp_path):
    """A fresh store with endpoint chat / deployment blue serving the corpus model; (ws, cfg, store, log)
    where log(prompts, start, seconds, status=200) writes requests spread over [start, start + seconds)."""
    ws, cfg, dataset, folder = corpus_model
    cfg = override(cfg, [f"store.database_url=sqlite:///{tmp_path / 'lmops.db'}", f"monitor.reference={dataset}"])
    store = Store.for_workspace(ws, cfg)
    store.endpoints.create("chat", "tests")
    dep = resolve_deployment(ws, cfg, "chat", "blue", str(folder))
    store.endpoints.deploy(dep, "tests", traffic=100)

    def log(prompts, start, seconds, status=200, answers=None):
        step = seconds / len(prompts)
        store.requests.log([dict(ts=start + timedelta(seconds=i * step), request_id=f"r{start.timestamp()}-{i}",
                                 route="/v1/completions", endpoint="chat", deployment="blue", model="model",
                                 model_version=dep.model_version, status_code=status, prompt=p,
                                 completion=(answers or prompts)[(i + 1) % len(prompts)][:40] if status < 400 else None,
                                 prompt_tokens=len(p), completion_tokens=20 if status < 400 else None,
                                 ttft_s=0.05, latency_s=0.3, finish_reason="length" if status < 400 else None)
                            for i, p in enumerate(prompts)])
    yield ws, cfg, store, log, heldout_lines(ws, dataset)
    store.close()


def _by(report):
    (group,) = report.groups
    return group, {r.signal: r for r in group.results}


def test_in_distribution_traffic_raises_no_drift_alert_and_every_signal_is_measured(monitored):
    ws, cfg, store, log, lines = monitored
    now = utcnow()
    log(lines[:120], now - timedelta(hours=2), 3000)  # the answers' reference: the log before the window
    log(lines[120:240], now - timedelta(minutes=50), 2900)
    for i, score in enumerate([1.0, 0.0, 1.0, 0.5]):  # as POST /v1/feedback stores them
        store.feedback.add({"ts": now - timedelta(minutes=40), "request_id": f"r{i}", "endpoint": "chat",
                            "deployment": "blue", "score": score})
    group, by = _by(run(ws, cfg, store, "chat", until=now))
    assert group.requests == 120
    assert by["feedback_rate"].value == pytest.approx(4 / 120) and by["feedback_score"].value == pytest.approx(0.625)
    missing = {"prompt_nll", "embedding_mmd", "embedding_auc", "answer_length", "answer_logprob",
               "request_rate", "error_rate", "ttft_p95_s", "feedback_rate"} - set(by)
    assert not missing, group.notes
    assert not [s for s in DRIFT if by[s].alert], [(s, by[s].value, by[s].threshold) for s in DRIFT]
    assert by["prompt_nll"].n_window == 64 and by["prompt_nll"].p_value is not None  # monitor.sample
    assert by["embedding_mmd"].p_value > 0.01
    assert "validation split" in by["prompt_nll"].reference
    rows = store.monitor.list("chat")
    assert {r.signal for r in rows} == set(by) and not any(r.alert for r in rows if r.signal in DRIFT)


def test_shifted_traffic_alerts_on_prompt_perplexity_and_mmd_in_the_first_window(monitored):
    ws, cfg, store, log, lines = monitored
    now = utcnow()
    log(lines[:120], now - timedelta(hours=2), 3000)
    # another language in another script; Latin, in this script, is at the edge of what the bigram test model
    # tells from its corpus on 64 prompts (prompt_nll 0.309 vs its threshold 0.310 on one draw)
    log(russian_lines(120), now - timedelta(minutes=50), 2900)
    group, by = _by(run(ws, cfg, store, "chat", until=now))
    for signal in ("prompt_nll", "embedding_mmd", "embedding_auc", "prompt_tokens_js"):
        assert by[signal].alert, (signal, by[signal].value, by[signal].threshold)
    assert by["embedding_mmd"].p_value < 0.01
    assert by["prompt_nll"].details["window_nll"] > by["prompt_nll"].details["reference_nll"]
    new = alerts.record(store, cfg, run(ws, cfg, store, "chat", until=now), "tests")
    assert {a.signal for a in new} >= {"prompt_nll", "embedding_mmd"}
    assert alerts.record(store, cfg, run(ws, cfg, store, "chat", until=now), "tests") == []  # within repeat_s
    assert [e.action for e in store.audit.list(100, subject="endpoint:chat")].count("monitor.alert") == len(new)


def test_a_local_model_without_lineage_is_compared_with_the_log(monitored):
    ws, cfg, store, log, lines = monitored
    cfg = override(cfg, ["monitor.reference=training"])
    now = utcnow()
    log(lines[:120], now - timedelta(hours=2), 3000)
    log(lines[120:240], now - timedelta(minutes=50), 2900)
    group, by = _by(run(ws, cfg, store, "chat", until=now))
    assert any("no training lineage" in n for n in group.notes)
    assert "log before the window" in by["prompt_nll"].reference


def test_the_error_rule_needs_every_minute_of_its_span(monitored):
    ws, cfg, store, log, lines = monitored
    now = utcnow()
    log(lines[:200], now - timedelta(minutes=6), 360)
    log(lines[:20], now - timedelta(minutes=6), 360, status=503)  # ~9% errors in every minute
    by = _by(run(ws, cfg, store, "chat", until=now))[1]
    assert by["error_rate"].alert and by["error_rate"].rule == "error_rate > 0.02 for 300 s"
    assert by["error_rate"].details["status"] == {"200": 200, "503": 20}
    # errors only in the last minute: not for 5 minutes
    log(lines[:20], now + timedelta(minutes=9), 50, status=503)
    log(lines[:300], now + timedelta(minutes=4), 360)
    by = _by(run(ws, cfg, store, "chat", until=now + timedelta(minutes=10), window=timedelta(minutes=6)))[1]
    assert by["error_rate"].value > 0.02 and not by["error_rate"].alert


class _Receiver(BaseHTTPRequestHandler):
    received: list = []
    status = 200

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_alerts_reach_the_webhook_and_a_dead_one_loses_none(monitored):
    ws, cfg, store, log, lines = monitored
    now = utcnow()
    log(lines[:100], now - timedelta(minutes=6), 360)
    log(lines[:10], now - timedelta(minutes=6), 360, status=500)
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/hook"
    try:
        _Receiver.status = 503  # the receiver fails: retried, then kept
        sleeps = []
        down = override(cfg, [f"monitor.webhook_url={url}", "monitor.webhook_retries=2"])
        new, (delivered, undelivered) = alerts.notify(store, down, run(ws, down, store, "chat", until=now), "tests",
                                                      sleep=sleeps.append)
        assert [a.signal for a in new] == ["error_rate"] and (delivered, undelivered) == (0, 1)
        assert len(_Receiver.received) == 3 and sleeps == [0.5, 1.0]  # retried with a doubling pause
        (kept,) = store.alerts.list(undelivered=True)
        assert kept.attempts == 1 and kept.last_error == "HTTP 503"
        _Receiver.status = 200  # back: the next delivery sends what was kept
        assert alerts.deliver(store, down, sleep=sleeps.append) == (1, 0)
        body = _Receiver.received[-1]
        assert body["alert"]["signal"] == "error_rate" and "error_rate" in body["text"]
        assert store.alerts.list(undelivered=True) == []
    finally:
        server.shutdown()
        server.server_close()
    # nobody listening at all: kept too
    gone = override(cfg, [f"monitor.webhook_url={url}", "monitor.webhook_retries=0", "monitor.repeat_s=0"])
    assert alerts.notify(store, gone, run(ws, gone, store, "chat", until=now), "tests")[1] == (0, 1)
    assert "ConnectError" in store.alerts.list(undelivered=True)[0].last_error
