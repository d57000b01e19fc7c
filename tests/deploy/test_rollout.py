"""The rollout state machine with an injected clock, over a real store with made-up traffic."""

from __future__ import annotations

from datetime import timedelta

import pytest

from lmops.deploy import rollout
from lmops.deploy.rollout import Driver, Promotion, SmokeResult
from lmops.errors import LmopsError

from .conftest import T0, blue_green_endpoint, config, deployment, minutes, traffic

W = 60.0  # the window of these tests, in seconds


class Promoter:
    def __init__(self, status="promoted"):
        self.status, self.calls = status, []

    def __call__(self, dep):
        self.calls.append(dep.name)
        if self.status == "needs_approval":
            return Promotion("needs_approval", "needs approval", None, "1")
        return Promotion(self.status, f"m v{dep.model_version} is champion", dep.model_version, "1")


def started(store, cfg, strategy="canary", steps=(10, 50, 100)):
    blue_green_endpoint(store)
    return rollout.start(store, cfg, "chat", "green", "alice", strategy=strategy, steps=list(steps), window_s=W,
                         reason="ship v2", now=T0)


def serve_window(store, since, good=True, n=40):
    """One window of traffic on both deployments, since `since`."""
    until = since + timedelta(seconds=W)
    traffic(store, "blue", since, until, n)
    traffic(store, "green", since, until, n, status=200 if good else 500)


def test_a_good_canary_is_promoted_step_by_step(sqlite_store):
    store, cfg, promote = sqlite_store, config(), Promoter()
    r = started(store, cfg)
    driver = Driver(store, cfg, promote=promote, name="d1")
    shares = []
    now = T0
    for _ in range(3):
        [r] = driver.run_once(now)  # the step's traffic is set
        shares.append(store.endpoints.get("chat").traffic)
        serve_window(store, now)
        now += timedelta(seconds=W)
        assert driver.run_once(now - timedelta(seconds=1))[0].step_index == r.step_index  # not due yet
        [r] = driver.run_once(now)  # analysis
    assert shares[0] == {"blue": 90, "green": 10}
    assert r.status == "succeeded", r.message
    assert store.endpoints.get("chat").traffic == {"blue": 0, "green": 100}
    assert promote.calls == ["green"] and r.promoted_version == "2" and r.champion_before == "1"
    assert [a["outcome"] for a in r.analyses] == ["successful"] * 3
    actions = [e.action for e in reversed(store.audit.list(50, subject="endpoint:chat"))]
    assert actions[actions.index("rollout.started"):] == \
        ["rollout.started", "rollout.step", "rollout.step", "rollout.step", "rollout.succeeded"]


def test_a_broken_canary_is_aborted_with_traffic_back_on_stable(sqlite_store):
    store, cfg, promote = sqlite_store, config(), Promoter()
    started(store, cfg)
    driver = Driver(store, cfg, promote=promote, name="d1")
    driver.run_once(T0)
    serve_window(store, T0, good=False)
    [r] = driver.run_once(T0 + timedelta(seconds=W))
    assert r.status == "aborted" and "error_rate" in r.message
    assert store.endpoints.get("chat").traffic == {"blue": 100, "green": 0}
    assert promote.calls == []
    entry = store.audit.list(1, action="rollout.aborted")[0]
    assert entry.details["failed_metrics"] == ["error_rate"] and entry.actor == "d1"
    failing = [m for m in entry.details["analysis"]["measurements"] if m["outcome"] == "failed"]
    assert failing[0]["canary"] == 1.0 and failing[0]["stable"] == 0.0
    assert store.audit.list(2)[1].action == "rollout.rolled_back"  # the traffic change, before the verdict
    assert driver.run_once(T0 + timedelta(seconds=2 * W)) == []  # nothing left to drive


def test_failures_within_the_limit_are_retried(sqlite_store):
    store, cfg = sqlite_store, config(failure_limit=1)
    started(store, cfg)
    driver = Driver(store, cfg, promote=Promoter(), name="d1")
    driver.run_once(T0)
    serve_window(store, T0, good=False)
    [r] = driver.run_once(T0 + timedelta(seconds=W))
    assert r.status == "running" and r.failures == 1 and "1 of 1 failures tolerated" in r.message
    [r] = driver.run_once(T0 + timedelta(seconds=2 * W))
    assert r.status == "aborted"


def test_inconclusive_waits_then_pauses_and_resume_continues(sqlite_store):
    store, cfg = sqlite_store, config(inconclusive_limit=2)
    started(store, cfg)
    driver = Driver(store, cfg, promote=Promoter(), name="d1")
    driver.run_once(T0)
    traffic(store, "green", T0, T0 + minutes(1), 3)  # far too few requests
    traffic(store, "blue", T0, T0 + minutes(1), 40)
    [r] = driver.run_once(T0 + timedelta(seconds=W))
    assert r.status == "running" and r.inconclusive == 1 and "another window" in r.message
    [r] = driver.run_once(T0 + timedelta(seconds=2 * W))
    assert r.status == "paused" and "2 inconclusive analyses" in r.message
    assert store.endpoints.get("chat").traffic == {"blue": 90, "green": 10}  # a person decides
    assert driver.run_once(T0 + timedelta(seconds=10 * W)) == []  # paused: not driven
    rollout.resume(store, "chat", "bob")
    serve_window(store, T0 + timedelta(seconds=2 * W))
    r = store.rollouts.latest("chat")
    [r] = driver.run_once(r.analysed_at + timedelta(seconds=W))
    assert r.status == "running" and r.step_index == 1, r.message  # the step's data so far passed


def test_a_new_driver_continues_after_the_first_dies(sqlite_store):
    store, cfg = sqlite_store, config(lease_s=10)
    started(store, cfg, steps=(10, 100))
    first = Driver(store, cfg, promote=Promoter(), name="first")
    first.run_once(T0)
    serve_window(store, T0)
    del first  # killed: no stop(), its lease stays until it expires
    second = Driver(store, cfg, promote=Promoter(), name="second")
    assert second.run_once(T0 + timedelta(seconds=5)) == []  # first's lease still holds
    now = T0 + timedelta(seconds=W)
    [r] = second.run_once(now)
    assert r.driver == "second" and r.step_index == 1 and store.endpoints.get("chat").traffic["green"] == 100
    serve_window(store, now)
    [r] = second.run_once(now + timedelta(seconds=W))
    assert r.status == "succeeded", r.message  # stable judged from the baseline before 100%


def test_measuring_errors_are_retried_then_abort(sqlite_store):
    store, cfg = sqlite_store, config(consecutive_error_limit=2)
    started(store, cfg)

    def broken(*args, **kwargs):
        raise ConnectionError("store unreachable")

    driver = Driver(store, cfg, promote=Promoter(), name="d1", measure=broken)
    driver.run_once(T0)
    now = T0 + timedelta(seconds=W)
    [r] = driver.run_once(now)
    assert r.status == "running" and r.errors == 1 and "store unreachable" in r.message
    [r] = driver.run_once(now + timedelta(seconds=1))
    assert r.errors == 1  # retried only after ERROR_RETRY_S
    [r] = driver.run_once(now + timedelta(seconds=rollout.ERROR_RETRY_S))
    [r] = driver.run_once(now + timedelta(seconds=2 * rollout.ERROR_RETRY_S))
    assert r.status == "aborted" and "3 errors in a row" in r.message
    assert store.endpoints.get("chat").traffic == {"blue": 100, "green": 0}


def test_blue_green_switches_after_the_smoke_test_and_undo_switches_back(sqlite_store):
    store, cfg, promote = sqlite_store, config(), Promoter()
    started(store, cfg, strategy="blue-green")
    smoked = []

    def smoke(endpoint, dep):
        smoked.append((endpoint, dep, dict(store.endpoints.get(endpoint).traffic)))
        return SmokeResult(True, "3 prompts answered")

    [r] = Driver(store, cfg, smoke=smoke, promote=promote, name="d1").run_once(T0)
    assert smoked == [("chat", "green", {"blue": 100, "green": 0})]  # smoked at 0%
    assert r.status == "succeeded" and store.endpoints.get("chat").traffic == {"blue": 0, "green": 100}
    assert store.audit.list(5, action="rollout.switched")
    restored = []
    rollout.undo(store, "chat", "bob", "v2 answers badly", restore_champion=lambda r: restored.append(r.id) or "1")
    assert store.endpoints.get("chat").traffic == {"blue": 100, "green": 0}
    assert store.rollouts.latest("chat").status == "undone" and restored == [r.id]
    assert store.audit.list(1)[0].action == "rollout.undone"
    with pytest.raises(LmopsError, match="undone already"):
        rollout.undo(store, "chat", "bob")


def test_blue_green_smoke_failure_refuses_to_switch(sqlite_store):
    store, cfg, promote = sqlite_store, config(), Promoter()
    started(store, cfg, strategy="blue-green")
    smoke = lambda endpoint, dep: SmokeResult(False, "prompt 'The': status 500")  # noqa: E731
    [r] = Driver(store, cfg, smoke=smoke, promote=promote, name="d1").run_once(T0)
    assert r.status == "aborted" and "status 500" in r.message and "not switched" in r.message
    assert store.endpoints.get("chat").traffic == {"blue": 100, "green": 0} and promote.calls == []
    assert store.audit.list(1)[0].action == "rollout.aborted"


def test_approval_needed_waits_with_traffic_on_the_target(sqlite_store):
    store, cfg, promote = sqlite_store, config(), Promoter("needs_approval")
    started(store, cfg, strategy="blue-green")
    driver = Driver(store, cfg, smoke=lambda e, d: SmokeResult(True, "ok"), promote=promote, name="d1")
    [r] = driver.run_once(T0)
    assert r.status == "awaiting_approval" and "needs approval" in r.message
    assert store.endpoints.get("chat").traffic["green"] == 100
    promote.status = "promoted"
    assert driver.run_once(T0 + timedelta(seconds=1))[0].status == "awaiting_approval"  # polled every 10 s
    [r] = driver.run_once(T0 + timedelta(seconds=rollout.APPROVAL_POLL_S))
    assert r.status == "succeeded" and r.promoted_version == "2"


def test_a_person_aborts_pauses_and_refusals(sqlite_store):
    store, cfg = sqlite_store, config()
    with pytest.raises(LmopsError, match="no endpoint 'chat'"):
        rollout.start(store, cfg, "chat", "green", "alice")
    store.endpoints.create("chat", "alice")
    store.endpoints.deploy(deployment("blue"), "alice")
    with pytest.raises(LmopsError, match="no deployment 'green'.*lmops deploy green"):
        rollout.start(store, cfg, "chat", "green", "alice")
    with pytest.raises(LmopsError, match="blue takes 100%"):
        rollout.start(store, cfg, "chat", "blue", "alice")
    store.endpoints.deploy(deployment("green", version="2"), "alice", traffic=0)
    with pytest.raises(LmopsError, match="--steps"):
        rollout.start(store, cfg, "chat", "green", "alice", steps=[50, 10])
    r = rollout.start(store, cfg, "chat", "green", "alice", window_s=W, now=T0)
    with pytest.raises(LmopsError, match="has rollout"):
        rollout.start(store, cfg, "chat", "green", "alice")
    Driver(store, cfg, name="d1").run_once(T0)
    assert store.endpoints.get("chat").traffic == {"blue": 90, "green": 10}
    with pytest.raises(LmopsError, match="cannot be resumed"):
        rollout.resume(store, "chat", "bob")
    assert rollout.pause(store, "chat", "bob", "lunch").status == "paused"
    assert rollout.abort(store, "chat", "bob", "changed my mind").status == "aborted"
    assert store.endpoints.get("chat").traffic == {"blue": 100, "green": 0}
    entry = store.audit.list(1)[0]
    assert (entry.action, entry.actor, entry.reason, entry.details["rollout"]) == \
        ("rollout.aborted", "bob", "changed my mind", r.id)
    with pytest.raises(LmopsError, match="is aborted: it cannot be paused"):
        rollout.pause(store, "chat", "bob")


def test_a_driver_whose_read_went_stale_puts_the_traffic_back(sqlite_store):
    """A person aborts between a driver's read and its write: the driver's step change is undone."""
    store, cfg = sqlite_store, config()
    r = started(store, cfg)
    store.rollouts.acquire(r.id, "d1", T0, 10)
    stale = store.rollouts.get(r.id)
    rollout.abort(store, "chat", "bob")
    after = rollout.tick(store, cfg, stale, T0, driver="d1")
    assert after.status == "aborted" and store.endpoints.get("chat").traffic == {"blue": 100, "green": 0}


def test_undeploying_the_target_aborts(sqlite_store):
    store, cfg = sqlite_store, config()
    started(store, cfg)
    store.endpoints.undeploy("chat", "green", "bob")
    [r] = Driver(store, cfg, name="d1").run_once(T0)
    assert r.status == "aborted" and "undeployed" in r.message


def test_the_driver_thread_drives_and_stops(sqlite_store):
    import time

    store, cfg = sqlite_store, config(tick_interval_s=0.05, lease_s=1)
    r = started(store, cfg, strategy="blue-green")
    driver = Driver(store, cfg, smoke=lambda e, d: SmokeResult(True, "ok"), promote=Promoter(), name="t").start()
    try:
        deadline = time.monotonic() + 10
        while store.rollouts.get(r.id).status == "running" and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        driver.stop()
    assert store.rollouts.get(r.id).status == "succeeded"
