"""The loop: a drift alert -> new data from production -> a challenger trained from the champion ->
evaluated against it -> canaried on the endpoint -> promoted or rolled back, every hop audited.

Policy over the metadata store and the registry, no HTTP (the canary's traffic is the servers' business;
its analysis is lmops/deploy/rollout.py's). `tick` is one pass: `decide` turns alerts new to the loop
into loop runs (lmops/store/loop.py), then `advance` moves each active run as far as it can go now.
A run's steps, each recorded (outputs in the row's details, an audit entry `loop.<step>` on subject
`loop:<id>` naming the alert) before the next starts:

    triggered  production prompts of the alert's window -> a dataset version mixed with the corpus
               (lmops/data/production.py; data.use_production_prompts must allow it)
    ingested   the pipeline on that dataset: tokenize with the champion's tokenizer, train from the
               champion's weights (train.init_from pinned to its version), evaluate (gates against the
               champion on the same split), register -> the challenger
    trained    the challenger and the champion on the champion's own validation split and on the
               held-out new traffic (the production prompts of the new validation split): better on the
               new by loop.min_gain, no worse on the old than loop.max_regression, the evaluate gates
               passed -> else stopped, the champion keeps serving, the reason audited
    evaluated  (loop.approve_before_canary: waits for `lmops loop approve ID`) -> the challenger deployed
               at 0% on the endpoint and a canary started (loop.steps)
    canary     the rollout drives itself (a server's driver, or this process's); succeeded with the
               champion moved -> promoted; aborted -> rolled_back (traffic back on the stable deployment)

Nothing runs twice when a process dies mid-way: the dataset is content-addressed, the pipeline skips
its done steps and resumes training from its checkpoint, registering a run again returns its version,
deploying the same version again changes nothing, and the rollout id is recorded before it is driven.
A run owned by a process that is gone (same host: its pid; elsewhere: no heartbeat for LEASE_S) is
taken over by the next `lmops loop run`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from lmops.config import Config, override
from lmops.errors import LmopsError
from lmops.store import Store, utcnow
from lmops.store.loop import LoopRun
from lmops.util import first_line, pid_alive
from lmops.workspace import Workspace

Log = Callable[[str], None]
LEASE_S = 3600.0  # a run owned elsewhere whose owner wrote nothing for this long is taken over
PIPELINE_STEPS = ["ingest", "validate", "tokenize", "train", "evaluate", "register"]


def owner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def endpoint_of(cfg: Config, store: Store) -> str:
    """loop.endpoint, or the store's only endpoint."""
    if cfg.loop.endpoint:
        store.endpoints.get(cfg.loop.endpoint)  # refused clearly when missing
        return cfg.loop.endpoint
    names = [e.name for e in store.endpoints.list()]
    if len(names) != 1:
        raise LmopsError(f"loop.endpoint is not set and the store has {len(names)} endpoints "
                         f"({', '.join(names) or 'none'}): set loop.endpoint in lmops.yaml")
    return names[0]


def _audit(store: Store, actor: str, run: LoopRun, action: str, details: dict, reason: str | None = None) -> None:
    store.audit.append(actor, f"loop.{action}", f"loop:{run.id}",
                       {"alert": run.alert_id, "endpoint": run.endpoint, **details}, reason)


# ----------------------------------------------------------------------------- deciding

def decide(ws: Workspace, cfg: Config, store: Store, actor: str, log: Log = print) -> list[LoopRun]:
    """A loop run for each monitor run whose alerts are new to the loop and name a loop.signals signal on
    the loop's endpoint: retraining (on_alert retrain, outside the cool-down and the daily cap, nothing
    else running) or recorded as skipped with the reason. Returns the runs made."""
    lc = cfg.loop
    if lc.on_alert == "none":
        return []
    endpoint = endpoint_of(cfg, store)
    seen = store.loop.last_alert_id()
    new = [a for a in store.alerts.list(1000, endpoint=endpoint)[::-1]
           if a.id > seen and a.signal in lc.signals]
    by_run: dict[str, list] = {}
    for a in new:
        by_run.setdefault(a.run_id or f"alert-{a.id}", []).append(a)
    made = []
    for alerts in by_run.values():
        made.append(_decide_one(ws, cfg, store, actor, endpoint, alerts, log))
    return made


def _window(cfg: Config, store: Store, alert) -> tuple:
    """The production prompts a retrain reads: loop.window_s before the alert, else its monitor window."""
    if cfg.loop.window_s:
        return alert.ts - timedelta(seconds=cfg.loop.window_s), alert.ts
    rows = store.monitor.list(run_id=alert.run_id) if alert.run_id else []
    if rows:
        return rows[0].window_start, rows[0].window_end
    return alert.ts - timedelta(seconds=cfg.monitor.window_s), alert.ts


def _decide_one(ws, cfg: Config, store: Store, actor: str, endpoint: str, alerts: list, log: Log) -> LoopRun:
    lc, first = cfg.loop, alerts[0]
    since, until = _window(cfg, store, first)
    signals = sorted({a.signal for a in alerts})
    common = {"alert_id": max(a.id for a in alerts), "signal": ",".join(signals), "window_start": since,
              "window_end": until, "details": {"alerts": [a.id for a in alerts], "messages": [a.message for a in alerts]}}

    def skipped(outcome: str, reason: str) -> LoopRun:
        run = store.loop.add(endpoint, actor, "decided", "skipped", outcome=outcome, reason=reason, **common)
        _audit(store, actor, run, "skipped", {"alerts": common["details"]["alerts"], "outcome": outcome}, reason)
        log(f"loop run {run.id}: alert {first.id} ({run.signal}) not retrained: {reason}")
        return run

    if lc.on_alert == "notify":
        return skipped("notified", "loop.on_alert is notify: people decide (the alert went to monitor.webhook_url); "
                       "`lmops loop retrain` starts a retrain")
    now = utcnow()
    recent = [r for r in store.loop.list(200, endpoint=endpoint, since=now - timedelta(days=1)) if r.step != "decided"]
    busy = store.loop.list(10, endpoint=endpoint, active=True)
    if busy:
        return skipped("busy", f"loop run {busy[0].id} is retraining already (step {busy[0].step})")
    if recent and (now - recent[0].created).total_seconds() < lc.cooldown_s:
        return skipped("cooldown", f"loop run {recent[0].id} started {_ago(now - recent[0].created)} ago, within "
                       f"loop.cooldown_s ({lc.cooldown_s:g} s)")
    if len(recent) >= lc.max_retrains_per_day:
        return skipped("daily_cap", f"{len(recent)} retrains in the last 24 hours (loop.max_retrains_per_day "
                       f"{lc.max_retrains_per_day})")
    return start(ws, cfg, store, actor, endpoint, since, until, log, **common)


def _ago(d: timedelta) -> str:
    s = d.total_seconds()
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def start(ws: Workspace, cfg: Config, store: Store, actor: str, endpoint: str, since, until, log: Log = print,
          **common: Any) -> LoopRun:
    """A retrain of endpoint from the champion on the production prompts of [since, until)."""
    from lmops import registry

    try:
        champion = registry.resolve(ws, cfg, f"{cfg.registry.model_name}@{registry.CHAMPION}")
    except LmopsError as err:
        raise LmopsError(f"the loop retrains from the champion, and there is none: {err}") from None
    common.setdefault("window_start", since)
    common.setdefault("window_end", until)
    details = {**common.pop("details", {}), "base": f"{champion.name}@{champion.version}"}
    run = store.loop.add(endpoint, actor, "triggered", "running", details=details, **common)
    _audit(store, actor, run, "triggered", {"signal": run.signal, "window": [_iso(since), _iso(until)],
                                            "base": details["base"]})
    log(f"loop run {run.id}: retraining {champion.name} v{champion.version} on {endpoint}'s prompts of "
        f"{_iso(since)} .. {_iso(until)}" + (f" (alert {run.alert_id}: {run.signal})" if run.alert_id else ""))
    return run


def _iso(t) -> str | None:
    return t.isoformat(timespec="seconds") if t is not None else None


# ----------------------------------------------------------------------------- advancing

def _takeover(run: LoopRun) -> bool:
    """True when run's owner is gone: a dead pid on this host, or no heartbeat for LEASE_S."""
    host, _, pid = (run.owner or "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        return not pid_alive(int(pid))
    return run.heartbeat is None or (utcnow() - run.heartbeat).total_seconds() > LEASE_S


def advance(ws: Workspace, cfg: Config, store: Store, run_id: int, actor: str, log: Log = print,
            drive: bool = True) -> LoopRun:
    """Move run_id through every step it can take now; return it as it stands. drive: tick the canary's
    rollout from this process too (its lease keeps one driver deciding when a server drives it as well)."""
    me = owner_name()
    run = store.loop.claim(run_id, me, _takeover)
    if run is None:
        return store.loop.get(run_id)
    try:
        while run.active:
            step = STEP[run.step]
            try:
                nxt = step(ws, cfg, store, run, actor, me, log, drive)
            except LmopsError as err:
                nxt = _finish(store, actor, run, me, "failed", "failed", f"{run.step}: {err}", log)
            except BaseException as err:
                if not isinstance(err, Exception):
                    raise  # Ctrl-C: the run stays where it was; the next `lmops loop run` continues it
                nxt = _finish(store, actor, run, me, "failed", "failed", f"{run.step}: {type(err).__name__}: "
                              f"{first_line(err)}", log)
            if nxt.step == run.step and nxt.status == run.status:
                return nxt  # waiting: for a person or the canary
            run = nxt
        return run
    finally:
        store.loop.release(run_id, me)


def _finish(store: Store, actor: str, run: LoopRun, me: str, status: str, outcome: str, reason: str,
            log: Log, **details: Any) -> LoopRun:
    done = store.loop.update(run.id, me, status=status, outcome=outcome, reason=reason, details=details)
    _audit(store, actor, done, outcome, {"step": run.step, **details}, reason)  # loop.promoted, loop.rolled_back, ...
    log(f"loop run {run.id}: {outcome}: {reason}")
    return done


def _step_ingest(ws, cfg, store, run, actor, me, log, drive) -> LoopRun:
    from lmops.data.production import ingest_requests

    version = ingest_requests(ws, cfg, store, actor, endpoint=run.endpoint, since=run.window_start,
                              until=run.window_end)
    requests = (version.manifest.get("lineage") or {}).get("requests") or {}
    _audit(store, actor, run, "ingested", {"dataset": version.id, "window": [_iso(run.window_start),
                                                                              _iso(run.window_end)],
                                           "prompts_used": requests.get("used")})
    log(f"loop run {run.id}: dataset {version.short_id} ({version.manifest['totals']['documents']} documents)")
    return store.loop.update(run.id, me, step="ingested", details={"dataset": version.id})


def _step_train(ws, cfg, store, run, actor, me, log, drive) -> LoopRun:
    from lmops import registry, tracking
    from lmops.pipeline import run_pipeline

    base = run.details["base"]
    train_cfg = override(cfg, [f"train.init_from={base.rsplit('@', 1)[1]}"])
    result = run_pipeline(ws, train_cfg, log=log, steps=PIPELINE_STEPS, dataset=run.details["dataset"],
                          again=f"lmops loop run (loop run {run.id})")
    version = result.outputs["register"]["version"]
    evaluation = result.outputs["evaluate"]
    name = cfg.registry.model_name
    c = tracking.client(ws, cfg)
    c.set_model_version_tag(name, version, "lmops.loop_run", str(run.id))
    if cfg.loop.approve_before_promotion:
        c.set_model_version_tag(name, version, registry.TAG_NEEDS_APPROVAL, f"loop.approve_before_promotion, loop run {run.id}")
    details = {"version": version, "run_dir": result.outputs["train"]["run_dir"], "pipeline_run": result.run_id,
               "gates_passed": evaluation["passed"],
               "gates_failed": [g["name"] for g in evaluation["gates"] if not g["passed"]]}
    _audit(store, actor, run, "trained", {"version": version, "base": base, "dataset": run.details["dataset"],
                                          "pipeline_run": result.run_id, "gates_passed": evaluation["passed"]})
    return store.loop.update(run.id, me, step="trained", details=details)


def _step_evaluate(ws, cfg, store, run, actor, me, log, drive) -> LoopRun:
    from lmops import tracking

    d = run.details
    verdict = compare(ws, cfg, d["base"], f"{cfg.registry.model_name}@{d['version']}", d["dataset"])
    if not d["gates_passed"]:
        verdict["failed"].insert(0, f"evaluate.gates failed: {', '.join(d['gates_failed'])}")
    client = tracking.client(ws, cfg)
    mv = client.get_model_version(cfg.registry.model_name, d["version"])
    for split, side in (("old", "challenger"), ("new", "challenger"), ("old", "champion"), ("new", "champion")):
        client.log_metric(mv.run_id, f"loop.{split}_val_bpb.{side}", verdict[split][side]["val_bpb"])
    run = store.loop.update(run.id, me, details={"evaluation": verdict})
    if verdict["failed"]:
        return _finish(store, actor, run, me, "stopped", "gates_failed",
                       f"v{d['version']} not deployed, {d['base']} keeps serving: " + "; ".join(verdict["failed"]), log)
    _audit(store, actor, run, "evaluated", {"version": d["version"], "old": verdict["old"], "new": verdict["new"]})
    log(f"loop run {run.id}: v{d['version']} bits per byte on new traffic {verdict['new']['challenger']['val_bpb']:.4f} "
        f"(champion {verdict['new']['champion']['val_bpb']:.4f}), on the old split "
        f"{verdict['old']['challenger']['val_bpb']:.4f} (champion {verdict['old']['champion']['val_bpb']:.4f})")
    return store.loop.update(run.id, me, step="evaluated")


def _step_canary(ws, cfg, store, run, actor, me, log, drive) -> LoopRun:
    """Deploy the challenger at 0% and start its canary (after a person's approval where asked)."""
    from lmops.deploy import rollout
    from lmops.deploy.models import resolve_deployment

    d = run.details
    if cfg.loop.approve_before_canary and not d.get("canary_approved_by"):
        if run.status != "waiting":
            log(f"loop run {run.id}: v{d['version']} passed; waiting for `lmops loop approve {run.id}` before its canary")
            return store.loop.update(run.id, me, status="waiting",
                                     reason=f"waiting for approval before the canary: lmops loop approve {run.id}")
        return run
    name = f"v{d['version']}"
    ep = store.endpoints.get(run.endpoint)
    why = f"loop run {run.id}" + (f" (alert {run.alert_id})" if run.alert_id else "")
    if name not in ep.deployments:
        dep = resolve_deployment(ws, cfg, run.endpoint, name, f"{cfg.registry.model_name}@{d['version']}")
        store.endpoints.deploy(dep, actor, 0, why)
    if not d.get("rollout"):
        r = rollout.start(store, cfg, run.endpoint, name, actor, strategy="canary", steps=cfg.loop.steps, reason=why)
        run = store.loop.update(run.id, me, details={"rollout": r.id, "deployment": name})
        _audit(store, actor, run, "canary", {"version": d["version"], "deployment": name, "rollout": r.id,
                                             "steps": cfg.loop.steps})
        log(f"loop run {run.id}: {name} deployed on {run.endpoint}; canary rollout {r.id} started ({cfg.loop.steps})")
    return store.loop.update(run.id, me, step="canary", status="waiting", reason=None)


def _step_watch(ws, cfg, store, run, actor, me, log, drive) -> LoopRun:
    """The canary's verdict, once its rollout ends."""
    from lmops.deploy import rollout

    d = run.details
    if drive:
        rollout.Driver(store, cfg, ws=ws, endpoint=run.endpoint).run_once()
    r = store.rollouts.get(d["rollout"])
    if r.status == "succeeded":
        if r.promoted_version == d["version"]:
            return _finish(store, actor, run, me, "succeeded", "promoted",
                           f"v{d['version']} is champion and takes all of {run.endpoint}'s traffic (rollout {r.id})",
                           log, step="done")
        return _finish(store, actor, run, me, "stopped", "not_promoted", f"rollout {r.id}: {r.message}", log)
    if r.status == "aborted":
        return _finish(store, actor, run, me, "stopped", "rolled_back",
                       f"rollout {r.id} rolled back, {run.endpoint}'s traffic is on {r.stable} again: {r.message}", log)
    reason = f"canary rollout {r.id}: {r.status}" + (f" ({r.message})" if r.message else "")
    return store.loop.update(run.id, me, reason=reason) if reason != run.reason else run


STEP = {"triggered": _step_ingest, "ingested": _step_train, "trained": _step_evaluate, "evaluated": _step_canary,
        "canary": _step_watch}


# ----------------------------------------------------------------------------- comparing

def compare(ws: Workspace, cfg: Config, champion_ref: str, challenger_ref: str, dataset_id: str) -> dict:
    """Both models on the champion's own validation split ('old') and on the production prompts of the new
    dataset's validation split ('new'): {old, new: {champion, challenger: {val_loss, val_bpb, texts}},
    failed: [reasons]} by loop.min_gain and loop.max_regression."""
    import torch

    from lmops import registry
    from lmops.checkpoint import Checkpoint
    from lmops.data.dataset import iter_documents, load_dataset
    from lmops.data.production import production_texts
    from lmops.evaluate import texts_loss
    from lmops.tokenizer import load_tokenizer
    from lmops.train import resolve_device

    lc = cfg.loop
    new = load_dataset(ws.state, dataset_id)
    new_texts = production_texts(new, "val")
    old_id = registry.lineage(ws, cfg, champion_ref)["dataset"]["id"]
    if not old_id:
        raise LmopsError(f"{champion_ref} records no dataset: its validation split cannot be read")
    old_texts = [t for _, t in iter_documents(load_dataset(ws.state, old_id), "val")]
    if not new_texts:
        raise LmopsError(f"dataset {new.short_id} holds no production prompt in its validation split "
                         f"(data.val_fraction {cfg.data.val_fraction}): too little new traffic to judge the challenger on")
    device = resolve_device(cfg.train.device)
    out: dict = {"old": {}, "new": {}, "old_dataset": old_id, "failed": []}
    for side, ref in (("champion", champion_ref), ("challenger", challenger_ref)):
        path = registry.download_checkpoint(ws, cfg, ref)
        model = Checkpoint(path).model(device).float().eval()
        tok = load_tokenizer(path.parent)
        with torch.no_grad():
            for split, texts in (("old", old_texts), ("new", new_texts)):
                got = texts_loss(model, tok, texts, cfg.evaluate.batch_size, device)
                out[split][side] = {"val_loss": got["val_loss"], "val_bpb": got["val_bpb"], "texts": len(texts)}
    new_c, new_b = out["new"]["champion"]["val_bpb"], out["new"]["challenger"]["val_bpb"]
    old_c, old_b = out["old"]["champion"]["val_bpb"], out["old"]["challenger"]["val_bpb"]
    if not new_b <= new_c * (1 - lc.min_gain):
        out["failed"].append(f"new traffic: {new_b:.4f} bits per byte, not {lc.min_gain:.0%} below the champion's "
                             f"{new_c:.4f} (loop.min_gain)")
    if not old_b <= old_c * (1 + lc.max_regression):
        out["failed"].append(f"old validation split: {old_b:.4f} bits per byte, more than {lc.max_regression:.0%} above "
                             f"the champion's {old_c:.4f} (loop.max_regression)")
    return out


# ----------------------------------------------------------------------------- one pass

def tick(ws: Workspace, cfg: Config, store: Store, actor: str, log: Log = print, drive: bool = True) -> list[LoopRun]:
    """decide, then advance every active run; return the runs touched."""
    made = decide(ws, cfg, store, actor, log)
    active = sorted({r.id for r in store.loop.list(50, active=True)} | {r.id for r in made if r.active})
    return [*[r for r in made if not r.active], *[advance(ws, cfg, store, i, actor, log, drive) for i in active]]


def approve(store: Store, run_id: int, approver: str) -> LoopRun:
    """A person's approval of a run waiting before its canary."""
    run = store.loop.get(run_id)
    if not (run.status == "waiting" and run.step == "evaluated"):
        raise LmopsError(f"loop run {run_id} is not waiting for an approval (step {run.step}, {run.status})")
    run = store.loop.update(run_id, details={"canary_approved_by": approver}, status="running", reason=None)
    _audit(store, approver, run, "approved", {"version": run.details.get("version")})
    return run
