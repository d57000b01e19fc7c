"""The endpoints and rollouts stores on SQLite and PostgreSQL: traffic rules, one active rollout per
endpoint, the driver lease (two drivers, one wins; an expired lease is taken over), versioned writes."""

from __future__ import annotations

from datetime import timedelta

import pytest

from lmops.errors import LmopsError

from .conftest import T0, blue_green_endpoint, deployment


def test_endpoint_rules_and_audit(store):
    blue_green_endpoint(store)
    with pytest.raises(LmopsError, match="sums to 110"):
        store.endpoints.set_traffic("chat", "bob", {"blue": 90, "green": 20})
    with pytest.raises(LmopsError, match="green takes live traffic"):
        store.endpoints.set_traffic("chat", "bob", {"blue": 90, "green": 10}, mirror={"green": 20})
    with pytest.raises(LmopsError, match="blue takes all of chat's traffic"):
        store.endpoints.undeploy("chat", "blue", "bob")
    ep = store.endpoints.set_traffic("chat", "bob", {"blue": 90, "green": 10}, reason="try green")
    assert ep.traffic == {"blue": 90, "green": 10} and ep.stable == "blue"
    entry = store.audit.list(1)[0]
    assert (entry.actor, entry.action, entry.reason) == ("bob", "endpoint.traffic", "try green")


def test_one_active_rollout_per_endpoint(store):
    ep = blue_green_endpoint(store)
    r = store.rollouts.create("chat", "green", "blue", "canary", [10, 100], 60, "alice", ep.traffic, now=T0)
    assert (r.status, r.step_index, r.share, r.started_by) == ("running", 0, 10, "alice")
    with pytest.raises(LmopsError, match=f"has rollout {r.id} of green running"):
        store.rollouts.create("chat", "green", "blue", "canary", [100], 60, "bob", ep.traffic)
    assert store.rollouts.advance(r, None, T0, status="aborted", finished_at=T0).status == "aborted"
    again = store.rollouts.create("chat", "green", "blue", "canary", [100], 60, "bob", ep.traffic)
    assert store.rollouts.latest("chat").id == again.id and [x.id for x in store.rollouts.active()] == [again.id]


def test_two_drivers_one_wins_and_an_expired_lease_is_taken_over(store):
    ep = blue_green_endpoint(store)
    r = store.rollouts.create("chat", "green", "blue", "canary", [100], 60, "alice", ep.traffic, now=T0)
    assert store.rollouts.acquire(r.id, "d1", T0, 10)
    assert not store.rollouts.acquire(r.id, "d2", T0 + timedelta(seconds=5), 10)
    assert store.rollouts.acquire(r.id, "d1", T0 + timedelta(seconds=5), 10)  # renewed: until T0 + 15
    assert not store.rollouts.acquire(r.id, "d2", T0 + timedelta(seconds=14), 10)
    assert store.rollouts.acquire(r.id, "d2", T0 + timedelta(seconds=16), 10)  # d1 stopped renewing
    assert store.rollouts.get(r.id).driver == "d2"
    assert not store.rollouts.acquire(r.id, "d1", T0 + timedelta(seconds=17), 10)
    store.rollouts.release(r.id, "d2")
    assert store.rollouts.acquire(r.id, "d1", T0 + timedelta(seconds=17), 10)


def test_a_write_needs_the_version_read_and_the_lease(store):
    ep = blue_green_endpoint(store)
    r = store.rollouts.create("chat", "green", "blue", "canary", [100], 60, "alice", ep.traffic, now=T0)
    store.rollouts.acquire(r.id, "d1", T0, 10)
    r = store.rollouts.get(r.id)
    assert store.rollouts.advance(r, "d2", T0, message="not mine") is None  # no lease
    paused = store.rollouts.advance(r, None, T0, status="paused", message="by a person")
    assert store.rollouts.advance(r, "d1", T0, message="stale") is None  # read before the pause
    assert store.rollouts.get(r.id).message == "by a person" and paused.version == r.version + 1
    with pytest.raises(ValueError, match="target cannot change"):
        store.rollouts.advance(paused, None, T0, target="blue")
    done = store.rollouts.advance(paused, None, T0, status="aborted", finished_at=T0)
    assert done.driver is None and not store.rollouts.acquire(r.id, "d1", T0, 10)  # finished: nothing to drive


def test_deleting_an_endpoint_deletes_its_rollouts(store):
    ep = blue_green_endpoint(store)
    store.rollouts.create("chat", "green", "blue", "canary", [100], 60, "alice", ep.traffic)
    store.endpoints.delete("chat", "alice")
    assert store.rollouts.latest("chat") is None
    store.endpoints.create("chat", "alice")
    store.endpoints.deploy(deployment("blue"), "alice")
