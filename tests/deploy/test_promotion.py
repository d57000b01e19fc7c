"""A completed rollout moves the registry's champion alias (approval first where required); undo moves it
back. One tiny trained model, registered twice (tests/test_registry.py's fixture and helpers)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from test_registry import register, setup, trained, variant  # noqa: F401 - trained is a fixture

from lmops import registry
from lmops.config import override
from lmops.deploy import rollout
from lmops.deploy.models import resolve_deployment
from lmops.deploy.rollout import Driver, SmokeResult
from lmops.errors import LmopsError
from lmops.store import Store

def OK(endpoint, dep):
    return SmokeResult(True, "ok")


def endpoint_of_two_versions(trained, name, *sets):
    ws, cfg, run_id, ckpt, results = setup(trained, name, *sets)
    register(ws, cfg, run_id, ckpt, results)
    registry.promote(ws, cfg, "1")
    register(ws, cfg, run_id, variant(trained, f"{name}-2"), results)
    store = Store.for_workspace(ws, cfg)
    store.endpoints.create(name, "alice")
    store.endpoints.deploy(resolve_deployment(ws, cfg, name, "blue", f"{name}@champion"), "alice")
    green = resolve_deployment(ws, cfg, name, "green", f"{name}@challenger")
    assert (green.model_uri, green.model_version, green.model_ref) == (f"models:/{name}/2", "2", f"{name}@challenger")
    store.endpoints.deploy(green, "alice", traffic=0)
    return ws, cfg, store


def test_completion_moves_champion_and_undo_moves_it_back(trained):
    ws, cfg, store = endpoint_of_two_versions(trained, "rollprom")
    with store:
        rollout.start(store, cfg, "rollprom", "green", "alice", strategy="blue-green")
        [r] = Driver(store, cfg, smoke=OK, ws=ws, name="drv").run_once()
        assert r.status == "succeeded", r.message
        assert str(registry.resolve(ws, cfg, "rollprom@champion").version) == "2"
        assert (r.promoted_version, r.champion_before) == ("2", "1")
        promoted = store.audit.list(1, subject="model:rollprom/2", action="model.promoted")[0]
        assert promoted.actor == "drv" and promoted.details["previous_champion"] == "1"

        def restore(r):
            return registry.promote(ws, cfg, f"rollprom@{r.champion_before}", force_reason=f"undo of rollout {r.id}")
        rollout.undo(store, "rollprom", "bob", "v2 is worse", restore_champion=restore)
        assert str(registry.resolve(ws, cfg, "rollprom@champion").version) == "1"
        assert store.endpoints.get("rollprom").traffic == {"blue": 100, "green": 0}


def test_approval_first_where_the_registry_requires_it(trained):
    ws, cfg, store = endpoint_of_two_versions(trained, "rollappr")
    cfg = override(cfg, ["registry.require_approval=true"])
    with store:
        rollout.start(store, cfg, "rollappr", "green", "alice", strategy="blue-green")
        driver = Driver(store, cfg, smoke=OK, ws=ws, name="drv")
        [r] = driver.run_once()
        assert r.status == "awaiting_approval" and "lmops approve 2" in r.message
        assert store.endpoints.get("rollappr").traffic["green"] == 100
        assert str(registry.resolve(ws, cfg, "rollappr@champion").version) == "1"
        registry.approve(ws, cfg, "2", "dana")
        [r] = driver.run_once(r.analysed_at + timedelta(seconds=rollout.APPROVAL_POLL_S))
        assert r.status == "succeeded" and str(registry.resolve(ws, cfg, "rollappr@champion").version) == "2"


def test_an_unknown_reference_is_refused(trained):
    ws, cfg, run_id, ckpt, results = setup(trained, "rollunknown")
    with pytest.raises(LmopsError, match="no registered model 'rollunknown'"):
        resolve_deployment(ws, cfg, "e", "blue", "@champion")
