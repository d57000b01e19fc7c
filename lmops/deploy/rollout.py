"""Rollouts of a new deployment on an endpoint, canary or blue-green, decided from measurements.

A rollout is a row in the store (lmops/store/rollouts.py); `tick` advances it by one decision, as a pure
policy over the store with the clock passed in, so it is tested with a fake clock and a process that
dies between two ticks loses nothing. `Driver` is the loop a server runs in a background thread: each
tick it takes (or renews) the lease of every active rollout it can and ticks those, so exactly one
driver decides for a rollout however many servers share the database.

canary (Argo Rollouts' canary with an AnalysisRun per step): the target gets steps[0]% of the traffic
(the stable deployment the rest); after `window_s` the analysis (lmops/deploy/analysis.py) compares
target and stable over the step's requests so far:
- successful: the next step (or completion after the last);
- inconclusive: another window (the data keeps accumulating over the step); after
  rollout.inconclusive_limit of them in a row the rollout pauses for a person (`resume` gives it more
  windows, `abort` rolls back);
- failed: beyond rollout.failure_limit, traffic returns to the stable deployment at 100% and the
  rollout is aborted; the audit entry `rollout.aborted` names the failing metrics and their numbers;
- an error while measuring (the store unreachable, ...) is retried; more than
  rollout.consecutive_error_limit in a row aborts.

blue-green: the target keeps 0%, the smoke suite (the injected `smoke(endpoint, deployment)`, which
a server gives as lmops/serve/smoke.py over HTTP with the x-lmops-deployment header) runs against it;
a failing smoke aborts with traffic untouched, a passing one switches all traffic at once
(`rollout.switched`). The old deployment stays deployed, so `undo` switches back instantly.

Completion moves the registry's champion alias to the target's version (registry deployments only;
a local path has no registry version): through registry.promote, so evaluate.gates are checked
again. Where registry.require_approval says so and the version is not approved yet, the rollout
waits in status `awaiting_approval` with the traffic on the target and completes by itself once
`lmops approve VERSION` is done (checked every APPROVAL_POLL_S).

Writes are ordered traffic first, state second: a driver dying in between leaves a state whose next
decision repeats the same traffic change (idempotent), never a state ahead of the traffic.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from lmops.deploy.analysis import FAILED, INCONCLUSIVE, AnalysisResult, measure_store
from lmops.deploy.endpoints import Deployment
from lmops.errors import LmopsError
from lmops.store.db import utcnow
from lmops.store.rollouts import TERMINAL, Rollout

if TYPE_CHECKING:
    from lmops.config import Config
    from lmops.store import Store

logger = logging.getLogger("lmops.rollout")

APPROVAL_POLL_S = 10.0  # awaiting approval: seconds between checks of the registry
ERROR_RETRY_S = 5.0  # an error while measuring: seconds before the next try (at most one window)
MAX_ANALYSES = 100  # analyses kept in the row (the audit log keeps every decision)


@dataclass(frozen=True)
class SmokeResult:
    """What the smoke suite found: ok, and per prompt what was checked."""

    ok: bool
    message: str
    checks: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Promotion:
    """What completing a rollout did to the registry: promoted (champion moved), needs_approval (the
    rollout waits), skipped (not a registry deployment), refused (the registry said no: gates)."""

    status: str
    message: str
    version: str | None = None
    previous: str | None = None


Smoke = Callable[[str, str], SmokeResult]
Promote = Callable[[Deployment], Promotion]
Measure = Callable[..., AnalysisResult]


def registry_promoter(ws, cfg: Config, actor: str) -> Promote:
    """Promote a registry deployment's version to champion, as `lmops promote` would (gates checked,
    approval required where registry.require_approval), audited as `actor`."""
    def promote(dep: Deployment) -> Promotion:
        if not dep.model_uri.startswith("models:/"):
            return Promotion("skipped", f"{dep.name} serves a local path ({dep.model_uri}): no registry version to promote")
        from lmops import registry
        from lmops.store import Store

        ref = f"{dep.model_name}@{dep.model_version}"
        try:
            previous = str(registry.resolve(ws, cfg, f"{dep.model_name}@{registry.CHAMPION}").version)
        except LmopsError:
            previous = None
        if previous == dep.model_version:
            return Promotion("promoted", f"{dep.model_name} v{dep.model_version} is champion already",
                             dep.model_version, previous)
        mv = registry.resolve(ws, cfg, ref)
        missing = registry.approval_missing(cfg, mv)
        if missing:
            return Promotion("needs_approval", missing, None, previous)
        with Store.for_workspace(ws, cfg) as store:
            def audit(action, subject, details, reason=None):
                store.audit.append(actor, action, subject, details, reason)
            try:
                version = registry.promote(ws, cfg, ref, audit=audit)
            except LmopsError as err:
                return Promotion("refused", f"champion not moved: {err}", None, previous)
        return Promotion("promoted", f"{dep.model_name} v{version} is champion (was {previous or 'unset'})",
                         version, previous)
    return promote


# ----------------------------------------------------------------------------- starting and commands

def start(store: Store, cfg: Config, endpoint: str, target: str, actor: str, strategy: str | None = None,
          steps: list[int] | None = None, window_s: float | None = None, reason: str | None = None,
          now: datetime | None = None) -> Rollout:
    """A new rollout of `target` on `endpoint` (defaults from rollout: in lmops.yaml), refused with the
    reason when it cannot run. The first traffic change is the driver's first tick."""
    from lmops.config import _check_steps

    rc = cfg.rollout
    strategy = strategy or rc.strategy
    steps = list(steps or rc.steps)
    try:
        _check_steps(steps)
    except ValueError as err:
        raise LmopsError(f"--steps: {err}") from None
    if window_s is not None and window_s <= 0:
        raise LmopsError(f"--window {window_s}: a window is a positive duration, e.g. 2m")
    ep = store.endpoints.get(endpoint)
    if target not in ep.deployments:
        have = ", ".join(ep.deployments) or "none"
        raise LmopsError(f"endpoint '{endpoint}' has no deployment '{target}' (deployments: {have}); "
                         f"deploy it first: lmops deploy {target} --endpoint {endpoint} --model REF")
    stable = ep.stable
    if stable is None:
        raise LmopsError(f"nothing takes {endpoint}'s traffic yet, so there is no stable deployment to roll out from; "
                         f"send it all to {target}: lmops traffic set {endpoint} {target}=100")
    if stable == target or ep.traffic.get(target, 0) == 100:
        raise LmopsError(f"{target} takes {ep.traffic.get(target, 0)}% of {endpoint}'s traffic already, the most of "
                         "any deployment: there is nothing to roll out to it")
    r = store.rollouts.create(endpoint, target, stable, strategy, steps, rc.window_s if window_s is None else window_s,
                              actor, ep.traffic, reason, now)
    store.audit.append(actor, "rollout.started", f"endpoint:{endpoint}",
                       {"rollout": r.id, "target": target, "stable": stable, "strategy": strategy, "steps": steps,
                        "window_s": r.window_s, "version": ep.deployments[target].model_version}, reason)
    return r


def _person_change(store: Store, endpoint: str, what: str, allowed: tuple[str, ...], **changes: Any) -> Rollout:
    """A person's change to the endpoint's active rollout, retried if a driver wrote in between."""
    for _ in range(20):
        r = store.rollouts.latest(endpoint)
        if r is None:
            raise LmopsError(f"endpoint '{endpoint}' has no rollout; start one with `lmops rollout start {endpoint} --to NAME`")
        if r.status not in allowed:
            raise LmopsError(f"rollout {r.id} of {r.target} on {endpoint} is {r.status}: it cannot be {what}")
        now = utcnow()
        extra = {"finished_at": now} if changes.get("status") in TERMINAL else {}
        if (done := store.rollouts.advance(r, None, now, **changes, **extra)) is not None:
            return done
    raise LmopsError(f"rollout of {endpoint}: changed by its driver 20 times in a row; try again")


def pause(store: Store, endpoint: str, actor: str, reason: str | None = None) -> Rollout:
    r = _person_change(store, endpoint, "paused", ("running",), status="paused",
                       message=f"paused by {actor}" + (f": {reason}" if reason else ""))
    store.audit.append(actor, "rollout.paused", f"endpoint:{endpoint}", {"rollout": r.id, "step": r.step_index}, reason)
    return r


def resume(store: Store, endpoint: str, actor: str, reason: str | None = None) -> Rollout:
    """Run a paused rollout again: the inconclusive count starts over and the next analysis is a
    window from now (over the step's requests so far)."""
    r = _person_change(store, endpoint, "resumed", ("paused",), status="running", inconclusive=0, errors=0,
                       analysed_at=utcnow(), message=f"resumed by {actor}" + (f": {reason}" if reason else ""))
    store.audit.append(actor, "rollout.resumed", f"endpoint:{endpoint}", {"rollout": r.id, "step": r.step_index}, reason)
    return r


def abort(store: Store, endpoint: str, actor: str, reason: str | None = None) -> Rollout:
    """Stop the active rollout and send all traffic back to its stable deployment."""
    r = _person_change(store, endpoint, "aborted", ("running", "paused", "awaiting_approval"), status="aborted",
                       message=f"aborted by {actor}" + (f": {reason}" if reason else ""))
    traffic = _back_to_stable(store, r, actor, f"rollout {r.id} aborted by {actor}")
    store.audit.append(actor, "rollout.aborted", f"endpoint:{endpoint}",
                       {"rollout": r.id, "target": r.target, "by": "person", "traffic": traffic}, reason)
    return r


def undo(store: Store, endpoint: str, actor: str, reason: str | None = None,
         restore_champion: Callable[[Rollout], str | None] | None = None) -> Rollout:
    """Put the endpoint back as it was before its latest rollout: its traffic as it was then (at once:
    the old deployment is still deployed) and, when the rollout moved the champion alias, the alias back
    through restore_champion. An active rollout is stopped too."""
    latest = store.rollouts.latest(endpoint)
    if latest is None:
        raise LmopsError(f"endpoint '{endpoint}' has no rollout to undo")
    if latest.status == "undone":
        raise LmopsError(f"rollout {latest.id} of {latest.target} on {endpoint} is undone already")
    r = _person_change(store, endpoint, "undone", ("succeeded", "aborted", "running", "paused", "awaiting_approval"),
                       status="undone", message=f"undone by {actor}" + (f": {reason}" if reason else ""))
    ep = store.endpoints.get(endpoint)
    before = {d: w for d, w in r.previous_traffic.items() if w > 0}
    if before and before == {d: w for d, w in ep.traffic.items() if w > 0}:
        traffic = ep.traffic  # as it was already (an aborted rollout put it back)
    elif before and set(before) <= set(ep.deployments):
        traffic = store.endpoints.set_traffic(endpoint, actor, before, reason=f"undo of rollout {r.id}",
                                              action="rollout.undo").traffic
    else:
        traffic = _back_to_stable(store, r, actor, f"undo of rollout {r.id}")
    champion = restore_champion(r) if restore_champion and r.promoted_version and r.champion_before else None
    store.audit.append(actor, "rollout.undone", f"endpoint:{endpoint}",
                       {"rollout": r.id, "target": r.target, "was": latest.status, "traffic": traffic,
                        "champion": champion}, reason)
    return r


def _back_to_stable(store: Store, r: Rollout, actor: str, why: str) -> dict[str, int] | None:
    ep = store.endpoints.find(r.endpoint)
    if ep is None or r.stable not in ep.deployments:
        return None  # nothing to send it back to: the message says so
    if ep.traffic.get(r.stable) == 100:
        return ep.traffic
    return store.endpoints.set_traffic(r.endpoint, actor, {r.stable: 100}, reason=why, action="rollout.rolled_back").traffic


# ----------------------------------------------------------------------------- the policy

@dataclass
class _Tick:
    store: Store
    cfg: Config
    r: Rollout
    now: datetime
    driver: str
    smoke: Smoke | None
    promote: Promote | None
    measure: Measure

    @property
    def subject(self) -> str:
        return f"endpoint:{self.r.endpoint}"

    def audit(self, action: str, details: dict[str, Any], reason: str | None = None) -> None:
        self.store.audit.append(self.driver, action, self.subject,
                                {"rollout": self.r.id, "target": self.r.target, "stable": self.r.stable} | details, reason)

    def write(self, traffic_before: dict[str, int] | None = None, **changes: Any) -> Rollout | None:
        """Write the decision; on a conflict (a person paused or aborted meanwhile, or the lease went),
        read the row again and make the traffic agree with it: None then."""
        if changes.get("status") in TERMINAL:
            changes.setdefault("finished_at", self.now)
        new = self.store.rollouts.advance(self.r, self.driver, self.now, **changes)
        if new is not None:
            self.r = new
            return new
        current = self.store.rollouts.get(self.r.id)
        if traffic_before is not None:
            if current.status == "aborted":
                _back_to_stable(self.store, current, self.driver, f"rollout {current.id} was aborted")
            elif current.status == "paused":
                self.store.endpoints.set_traffic(current.endpoint, self.driver, traffic_before,
                                                 reason=f"rollout {current.id} was paused", action="rollout.step")
        self.r = current
        return None

    def set_traffic(self, traffic: dict[str, int], action: str, why: str) -> dict[str, int]:
        before = self.store.endpoints.get(self.r.endpoint).traffic
        if {d: w for d, w in before.items() if w} != {d: w for d, w in traffic.items() if w}:
            self.store.endpoints.set_traffic(self.r.endpoint, self.driver, traffic, reason=why, action=action)
        return before

    def abort(self, message: str, details: dict[str, Any], restore: bool = True) -> Rollout:
        before = None
        if restore:
            before = self.store.endpoints.get(self.r.endpoint).traffic
            _back_to_stable(self.store, self.r, self.driver, f"rollout {self.r.id}: {message}")
        if self.write(traffic_before=before, status="aborted", message=message) is not None:
            self.audit("rollout.aborted", details, message)
        return self.r

    # ------------------------------------------------------------------------- per state

    def run(self) -> Rollout:
        r = self.r
        if r.status == "paused" or r.status in TERMINAL:
            return r
        ep = self.store.endpoints.find(r.endpoint)
        if ep is None:
            return r  # the endpoint was deleted (its rollouts go with it)
        if r.target not in ep.deployments:
            return self.abort(f"{r.target} was undeployed during the rollout", {"by": "undeploy"})
        if r.stable not in ep.deployments:
            return self.abort(f"the stable deployment {r.stable} was undeployed during the rollout", {"by": "undeploy"},
                              restore=False)
        if r.status == "awaiting_approval":
            return self.await_approval(ep.deployments[r.target])
        return self.blue_green(ep.deployments[r.target]) if r.strategy == "blue-green" else self.canary(ep)

    def error(self, what: str, err: BaseException) -> Rollout:
        limit = self.cfg.rollout.consecutive_error_limit
        errors = self.r.errors + 1
        text = f"{what} failed ({type(err).__name__}: {err})"
        if errors > limit:
            return self.abort(f"{text}; {errors} errors in a row (rollout.consecutive_error_limit {limit})",
                              {"errors": errors, "error": str(err)})
        retry = min(ERROR_RETRY_S, self.r.window_s)
        self.write(errors=errors, analysed_at=self.now - timedelta(seconds=self.r.window_s - retry),
                   message=f"{text}; error {errors} of {limit} tolerated, retrying in {retry:g} s")
        return self.r

    def canary(self, ep) -> Rollout:
        r, rc = self.r, self.cfg.rollout
        i, n = r.step_index, len(r.steps)
        share = r.steps[i]
        if r.step_started_at is None:
            before = self.set_traffic(_split(r, share), "rollout.step",
                                      f"rollout {r.id}: step {i + 1}/{n}, {r.target} at {share}%")
            self.write(traffic_before=before, step_started_at=self.now, analysed_at=None, inconclusive=0,
                       message=f"step {i + 1}/{n}: {r.target} at {share}%, analysis after {r.window_s:g} s")
            return self.r
        due = (r.analysed_at or r.step_started_at) + timedelta(seconds=r.window_s)
        if self.now < due:
            return r
        try:
            result = self.measure(self.store, r.endpoint, r.target, r.stable, r.step_started_at, self.now,
                                  rc.metrics, rc.min_requests, baseline_since=r.started_at)
        except Exception as err:  # noqa: BLE001 - any failure to measure counts towards the error limit
            return self.error("measuring", err)
        record = result.to_dict() | {"step": i, "share": share, "at": self.now.isoformat()}
        analyses = [*r.analyses, record][-MAX_ANALYSES:]
        where = f"step {i + 1}/{n} ({r.target} at {share}%)"
        if result.outcome == FAILED:
            failures = r.failures + 1
            failed = [m.line() for m in result.failed_metrics]
            if failures > rc.failure_limit:
                message = f"analysis failed at {where}: {'; '.join(failed)}; traffic back on {r.stable}"
                before = self.store.endpoints.get(r.endpoint).traffic
                _back_to_stable(self.store, r, self.driver, f"rollout {r.id}: analysis failed")
                if self.write(traffic_before=before, status="aborted", failures=failures, errors=0, analyses=analyses,
                              analysed_at=self.now, message=message) is not None:
                    self.audit("rollout.aborted", {"step": i, "share": share, "failed_metrics":
                                                   [m["metric"] for m in record["measurements"] if m["outcome"] == FAILED],
                                                   "analysis": record}, message)
                return self.r
            self.write(failures=failures, errors=0, analyses=analyses, analysed_at=self.now,
                       message=f"analysis failed at {where} ({failures} of {rc.failure_limit} failures tolerated): "
                       + "; ".join(failed))
            return self.r
        if result.outcome == INCONCLUSIVE:
            count = r.inconclusive + 1
            lines = "; ".join(m.line() for m in result.inconclusive_metrics)
            if count >= rc.inconclusive_limit:
                message = (f"paused: {count} inconclusive analyses in a row at {where} ({lines}); "
                           f"`lmops rollout resume {r.endpoint}` for more windows or `abort` to roll back")
                if self.write(status="paused", inconclusive=count, errors=0, analyses=analyses, analysed_at=self.now,
                              message=message) is not None:
                    self.audit("rollout.paused", {"step": i, "share": share, "analysis": record}, message)
                return self.r
            self.write(inconclusive=count, errors=0, analyses=analyses, analysed_at=self.now,
                       message=f"inconclusive at {where} ({count} of {rc.inconclusive_limit}): {lines}; another window")
            return self.r
        if i + 1 < n:
            nxt = r.steps[i + 1]
            before = self.set_traffic(_split(r, nxt), "rollout.step",
                                      f"rollout {r.id}: analysis passed at step {i + 1}; step {i + 2}/{n}, "
                                      f"{r.target} at {nxt}%")
            self.write(traffic_before=before, step_index=i + 1, step_started_at=self.now, analysed_at=None,
                       inconclusive=0, errors=0, analyses=analyses,
                       message=f"step {i + 2}/{n}: {r.target} at {nxt}% (step {i + 1} passed)")
            return self.r
        return self.complete(ep.deployments[r.target], analyses=analyses)

    def blue_green(self, dep: Deployment) -> Rollout:
        r = self.r
        if self.smoke is None:
            return self.error("the smoke suite", LmopsError("this driver has no smoke runner (run it in a server)"))
        budget = len(self.cfg.rollout.smoke.prompts) * self.cfg.rollout.smoke.max_latency_s
        self.store.rollouts.acquire(r.id, self.driver, self.now, self.cfg.rollout.lease_s + budget)  # smoke takes time
        try:
            result = self.smoke(r.endpoint, r.target)
        except Exception as err:  # noqa: BLE001 - a smoke runner that cannot even run counts as an error
            return self.error("the smoke suite", err)
        record = {"smoke": {"ok": result.ok, "message": result.message, "checks": result.checks},
                  "at": self.now.isoformat()}
        analyses = [*r.analyses, record][-MAX_ANALYSES:]
        if not result.ok:
            message = f"smoke test of {r.target} failed: {result.message}; traffic not switched"
            if self.write(status="aborted", analyses=analyses, errors=0, message=message) is not None:
                self.audit("rollout.aborted", {"smoke": record["smoke"]}, message)
            return self.r
        before = self.set_traffic({r.target: 100}, "rollout.switched",
                                  f"rollout {r.id}: smoke test passed, all traffic to {r.target}")
        if self.write(traffic_before=before, step_index=1, step_started_at=self.now, errors=0, analyses=analyses,
                      message=f"smoke test passed; all traffic on {r.target}") is None:
            return self.r
        return self.complete(dep)

    def complete(self, dep: Deployment, **changes: Any) -> Rollout:
        p = self.promote(dep) if self.promote else Promotion("skipped", "no registry promoter in this driver")
        if p.status == "needs_approval":
            if self.write(status="awaiting_approval", analysed_at=self.now, champion_before=p.previous,
                          message=f"all traffic on {self.r.target}; {p.message}", **changes) is not None:
                self.audit("rollout.awaiting_approval", {"promotion": p.message})
            return self.r
        message = f"succeeded: all traffic on {self.r.target}; {p.message}"
        if self.write(status="succeeded", message=message, champion_before=p.previous,
                      promoted_version=p.version if p.status == "promoted" else None, **changes) is not None:
            self.audit("rollout.succeeded", {"promotion": {"status": p.status, "message": p.message,
                                                           "version": p.version, "previous": p.previous}})
        return self.r

    def await_approval(self, dep: Deployment) -> Rollout:
        if self.r.analysed_at and self.now < self.r.analysed_at + timedelta(seconds=APPROVAL_POLL_S):
            return self.r
        p = self.promote(dep) if self.promote else Promotion("skipped", "no registry promoter in this driver")
        if p.status == "needs_approval":
            self.write(analysed_at=self.now)
            return self.r
        message = f"succeeded: all traffic on {self.r.target}; {p.message}"
        if self.write(status="succeeded", message=message,
                      promoted_version=p.version if p.status == "promoted" else None) is not None:
            self.audit("rollout.succeeded", {"promotion": {"status": p.status, "message": p.message,
                                                           "version": p.version, "previous": p.previous}})
        return self.r


def _split(r: Rollout, share: int) -> dict[str, int]:
    return {r.stable: 100 - share, r.target: share} if share < 100 else {r.target: 100}


def tick(store: Store, cfg: Config, rollout: Rollout, now: datetime, *, driver: str, smoke: Smoke | None = None,
         promote: Promote | None = None, measure: Measure = measure_store) -> Rollout:
    """One decision for `rollout` at time `now`, by `driver` (who must hold its lease): returns the
    rollout as it is afterwards."""
    return _Tick(store, cfg, rollout, now, driver, smoke, promote, measure).run()


# ----------------------------------------------------------------------------- the loop

def driver_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Driver:
    """The rollout loop of one process: `start()` runs it in a daemon thread, `stop()` ends it and
    gives its leases up; `run_once()` is one pass (what the thread does every rollout.tick_interval_s).

    smoke: runs the blue-green smoke suite (lmops/serve/smoke.py, bound to the server's own URL);
    promote: completes a rollout in the registry (default: registry_promoter(ws, cfg) when ws is given);
    endpoint: drive only this endpoint's rollouts (None: all); name: this driver in leases and the audit
    log (default host:pid:random); clock: returns the time (tests pass a fake one); changed: called after
    a tick that changed a rollout (a server driving its own endpoint re-reads the traffic at once instead
    of at its next poll, so a rollback takes effect there within the tick)."""

    def __init__(self, store: Store, cfg: Config, *, smoke: Smoke | None = None, promote: Promote | None = None,
                 ws=None, endpoint: str | None = None, name: str | None = None,
                 clock: Callable[[], datetime] = utcnow, measure: Measure = measure_store,
                 changed: Callable[[], None] | None = None):
        self.store, self.cfg, self.smoke, self.endpoint, self.clock, self.measure = store, cfg, smoke, endpoint, clock, measure
        self.changed = changed
        self.name = name or f"rollout-driver@{driver_name()}"
        self.promote = promote if promote is not None or ws is None else registry_promoter(ws, cfg, self.name)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held: set[int] = set()

    def run_once(self, now: datetime | None = None) -> list[Rollout]:
        """Tick every active rollout this driver holds or can take; return them as they are after."""
        now = now or self.clock()
        out = []
        for r in self.store.rollouts.active(self.endpoint):
            if r.status == "paused":
                continue  # a person decides next; hold no lease meanwhile
            if not self.store.rollouts.acquire(r.id, self.name, now, self.cfg.rollout.lease_s):
                self._held.discard(r.id)
                continue
            self._held.add(r.id)
            r = before = self.store.rollouts.get(r.id)
            try:
                r = tick(self.store, self.cfg, r, now, driver=self.name, smoke=self.smoke, promote=self.promote,
                         measure=self.measure)
            except Exception:  # noqa: BLE001 - the loop must outlive any one rollout's trouble
                logger.exception("rollout %s of %s: tick failed", r.id, r.endpoint)
            if r != before and self.changed is not None:
                self.changed()
            if not r.active:
                self._held.discard(r.id)
            out.append(r)
        return out

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.rollout.tick_interval_s):
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - e.g. the store unreachable: try again next tick
                logger.exception("rollout driver %s: pass failed", self.name)

    def start(self) -> Driver:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="lmops-rollout-driver", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for rid in list(self._held):
            try:
                self.store.rollouts.release(rid, self.name)
            except Exception:  # noqa: BLE001 - stopping must not fail because the store is gone
                logger.warning("rollout %s: could not release the lease", rid)
        self._held.clear()
