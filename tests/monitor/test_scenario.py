"""The scenario of issue 12, end to end: a model served by a real server that runs the monitor on its own
schedule (child processes, as `lmops serve` does), in-distribution traffic (held-out text of its corpus)
for several windows raises no alert; then shifted traffic (another language, in Cyrillic): the prompt perplexity and
MMD signals alert in the first window of it, and the webhook (a local HTTP server) receives the alert;
the drift gauges show it on /metrics."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest

from lmops.config import override
from lmops.deploy.models import resolve_deployment
from lmops.serve.app import create_app
from lmops.store import Store

from serve.conftest import LiveServer  # tests/ is on sys.path (rootdir conftest), as in test_postgres_run
from .conftest import heldout_lines, russian_lines

# long enough, with two clients, for 40+ requests a window on a loaded machine (two test workers): the
# thresholds are calibrated on the deployment's earlier answers, and a handful of them calibrates poorly
WINDOW_S = 8


class Hook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        type(self).received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def _runs(store):
    rows = store.monitor.list("chat")
    runs: dict[str, list] = {}
    for r in rows:
        runs.setdefault(r.run_id, []).append(r)
    return sorted(runs.values(), key=lambda rs: rs[0].ts)


@pytest.mark.slow
def test_in_distribution_windows_stay_quiet_and_a_shift_alerts_in_its_first_window(corpus_model, tmp_path):
    ws, cfg, dataset, folder = corpus_model
    hook = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    cfg = override(cfg, [
        f"store.database_url=sqlite:///{tmp_path / 'lmops.db'}", f"monitor.reference={dataset}",
        f"monitor.window_s={WINDOW_S}", f"monitor.interval_s={WINDOW_S}",
        f"monitor.webhook_url=http://127.0.0.1:{hook.server_port}/alerts",
        # three quiet windows must not flake: a run's false alarm rate of 0.1% (the default 1% is per run too)
        "monitor.false_alarm_rate=0.001", "auth.rate_limit_per_s=100000", "auth.burst=100000"])
    store = Store.for_workspace(ws, cfg)
    store.endpoints.create("chat", "tests")
    store.endpoints.deploy(resolve_deployment(ws, cfg, "chat", "blue", str(folder)), "tests", traffic=100)
    _, secret = store.keys.create("traffic", "inference", "tests")
    _, ops = store.keys.create("prometheus", "deployer", "tests")
    server = LiveServer(create_app(cfg, None, store, endpoint="chat", ws=ws))
    prompts = [heldout_lines(ws, dataset)]
    stop = threading.Event()

    def traffic():
        i = 0
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {secret}"}, timeout=30) as http:
            while not stop.is_set():
                p = prompts[0][i % len(prompts[0])]
                i += 1
                r = http.post("/v1/completions", json={"model": "chat", "prompt": p, "max_tokens": 8, "temperature": 0})
                assert r.status_code == 200, r.text
                time.sleep(0.01)

    senders = [threading.Thread(target=traffic, daemon=True) for _ in range(2)]
    for sender in senders:
        sender.start()
    try:
        deadline = time.monotonic() + 120
        while len(_runs(store)) < 3:  # several in-distribution windows
            assert time.monotonic() < deadline and all(t.is_alive() for t in senders), "fewer than 3 monitor runs"
            time.sleep(0.5)
        quiet = _runs(store)
        assert all(r.n_window and r.n_window >= 20 for rs in quiet for r in rs if r.signal == "prompt_nll")
        assert [r.signal for rs in quiet for r in rs if r.alert] == [], [(r.signal, r.value, r.threshold)
                                                                        for rs in quiet for r in rs if r.alert]
        assert Hook.received == []
        switched = time.time()
        prompts[0] = russian_lines(500)
        while True:  # the first run whose whole window is shifted traffic
            shifted = [rs for rs in _runs(store) if rs[0].window_start.timestamp() >= switched]
            if shifted:
                break
            assert time.monotonic() < deadline + 60 and all(t.is_alive() for t in senders), "no run after the shift"
            time.sleep(0.5)
        alerting = {r.signal for r in shifted[0] if r.alert}
        assert {"prompt_nll", "embedding_mmd"} <= alerting, alerting
        while not {a["alert"]["signal"] for a in Hook.received} >= {"prompt_nll", "embedding_mmd"}:
            assert time.monotonic() < deadline + 90, Hook.received
            time.sleep(0.2)
        server.server.monitoring.refresh()
        metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {ops}"}).text
        assert 'lmops:monitor_alert{deployment="blue",signal="prompt_nll"} 1.0' in metrics
        assert 'lmops:drift_score{deployment="blue",signal="embedding_mmd"}' in metrics
    finally:
        stop.set()
        for sender in senders:
            sender.join(30)
        server.stop()
        hook.shutdown()
        hook.server_close()
        store.close()
