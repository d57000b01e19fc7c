"""The stores the shadow scorer, the monitor, feedback and the loop write, on SQLite and on PostgreSQL (the
`store` fixture runs each test on both): what goes in comes back, filtered and ordered as their readers need."""

from __future__ import annotations

from datetime import timedelta

import pytest

from lmops.errors import LmopsError
from lmops.store import utcnow


def test_answer_scores_round_trip(store):
    now = utcnow()
    rows = [{"ts": now - timedelta(minutes=m), "request_id": f"r{m}", "endpoint": "chat", "deployment": dep,
             "role": "live", "prompt_tokens": 5, "completion_tokens": 12, "prompt_nll": 2.5 + m, "answer_nll": None,
             "finish_reason": "length", "flagged": False, "ttft_s": 0.125, "latency_s": 0.5, "agree": None}
            for m, dep in ((3, "blue"), (2, "green"), (1, "blue"))]
    assert store.scores.add(rows) == 3
    got = store.scores.list("chat")
    assert [s.request_id for s in got] == ["r3", "r2", "r1"]  # oldest first
    assert got[0].prompt_nll == 5.5 and got[0].flagged is False and got[0].ttft_s == 0.125
    assert [s.request_id for s in store.scores.list("chat", deployment="blue", since=now - timedelta(minutes=2))] == ["r1"]
    assert store.scores.list("other") == []
    with pytest.raises(ValueError, match="no column"):
        store.scores.add([{"role": "live", "nonsense": 1}])


def test_monitor_results_and_the_latest_run(store):
    now = utcnow()

    def result(run, signal, value, alert, minutes):
        return {"run_id": run, "ts": now - timedelta(minutes=minutes), "endpoint": "chat", "deployment": "blue",
                "model_version": "1", "signal": signal, "kind": "prompts", "value": value, "threshold": 0.5,
                "p_value": 0.01, "n_reference": 500, "n_window": 200, "window_start": now - timedelta(hours=1),
                "window_end": now, "reference": "validation", "alert": alert, "details": {"bins": [1, 2]}}

    store.monitor.add([result("a", "prompt_nll", 0.1, False, 20), result("a", "embedding_mmd", 0.2, False, 20)])
    store.monitor.add([result("b", "prompt_nll", 0.9, True, 5)])
    latest = store.monitor.latest_run("chat")
    assert [(r.run_id, r.signal, r.alert) for r in latest] == [("b", "prompt_nll", True)]
    assert latest[0].details == {"bins": [1, 2]} and latest[0].p_value == 0.01
    assert [r.run_id for r in store.monitor.list(signal="prompt_nll")] == ["a", "b"]  # oldest first
    assert [r.run_id for r in store.monitor.list(signal="prompt_nll", limit=1)] == ["b"]  # of the newest rows
    assert store.monitor.latest_run("other") == []


def test_alerts_and_their_delivery(store):
    now = utcnow()
    a = store.alerts.add({"ts": now, "run_id": "b", "endpoint": "chat", "deployment": "blue", "signal": "prompt_nll",
                          "value": 0.9, "threshold": 0.5, "message": "prompt_nll of chat/blue is 0.9"})
    assert a.attempts == 0 and a.delivered_at is None
    store.alerts.attempted(a.id, "HTTP 503")
    [undelivered] = store.alerts.list(undelivered=True)
    assert (undelivered.attempts, undelivered.last_error) == (1, "HTTP 503")
    store.alerts.attempted(a.id, None)
    assert store.alerts.list(undelivered=True) == []
    [done] = store.alerts.list(endpoint="chat")
    assert done.attempts == 2 and done.delivered_at is not None and done.last_error is None


def test_feedback_round_trip_and_its_bounds(store):
    now = utcnow()
    for i, score in enumerate((1.0, 0.0, 0.5)):
        store.feedback.add({"ts": now - timedelta(minutes=3 - i), "request_id": f"r{i}", "key_id": None,
                            "endpoint": "chat", "deployment": "blue", "model_version": "1", "score": score,
                            "comment": "ok" if i else None})
    got = store.feedback.list(endpoint="chat")
    assert [(f.request_id, f.score, f.comment) for f in got] == [("r0", 1.0, None), ("r1", 0.0, "ok"), ("r2", 0.5, "ok")]
    assert [f.request_id for f in store.feedback.list(request_id="r1")] == ["r1"]
    with pytest.raises(ValueError, match="between 0 and 1"):
        store.feedback.add({"request_id": "r9", "score": 1.5})


def test_loop_runs_are_claimed_by_one_owner(store):
    run = store.loop.add("chat", "loop", "triggered", "running", signal="prompt_nll", owner="host:1",
                         details={"alert": 7})
    assert run.active and run.owner == "host:1" and run.details == {"alert": 7}
    assert store.loop.claim(run.id, "host:2", takeover_if=lambda r: False) is None  # a live owner keeps it
    taken = store.loop.claim(run.id, "host:2", takeover_if=lambda r: True)  # judged gone: taken over
    assert taken is not None and taken.owner == "host:2"
    with pytest.raises(LmopsError, match="taken over"):
        store.loop.update(run.id, owner="host:1", step="trained")
    done = store.loop.update(run.id, owner="host:2", details={"version": "2"}, step="done", status="succeeded")
    assert done.details == {"alert": 7, "version": "2"} and not done.active
    store.loop.release(run.id, "host:2")
    assert store.loop.get(run.id).owner is None
    assert [r.id for r in store.loop.list(endpoint="chat")] == [run.id]
