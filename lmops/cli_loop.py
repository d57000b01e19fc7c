"""The loop's commands: `lmops loop run|watch|status|retrain|approve`. Registered on lmops.cli's app when it
is imported; the policy is lmops/loop.py, this is only its command line.

A retrain trains beside a live server on the same cores: these commands lower their own priority
(lmops/resources.py) before PyTorch starts, so serving keeps its share of the CPU."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from lmops.cli import SetOpt, WorkspaceOpt, _store, app, console, friendly, log
from lmops.errors import LmopsError

loop_app = typer.Typer(help="Close the loop: drift alerts -> retrain from the champion on production prompts -> "
                       "canary -> promoted or rolled back (loop: in lmops.yaml).", no_args_is_help=True)
app.add_typer(loop_app, name="loop")

DriveOpt = Annotated[bool, typer.Option(help="Also drive the canary's rollout from this process (a server "
                                        "serving the endpoint drives it too; one decides at a time).")]


def _batch_priority(cfg) -> None:
    from lmops.resources import background

    background(cfg.train.threads)


def _print_runs(runs) -> None:
    from rich.table import Table

    table = Table("id", "created", "trigger", "step", "status", "outcome", "version", "rollout", "reason",
                  title="loop runs", title_justify="left")
    for r in runs:
        d = r.details
        trigger = f"alert {r.alert_id} {r.signal}" if r.alert_id else "by hand"
        style = {"succeeded": "green", "stopped": "yellow", "failed": "red", "skipped": "dim"}.get(r.status)
        table.add_row(str(r.id), f"{r.created:%Y-%m-%d %H:%M}", trigger, r.step, r.status, r.outcome or "",
                      str(d.get("version") or ""), str(d.get("rollout") or ""), r.reason or "", style=style)
    console.print(table)


@loop_app.command("run")
@friendly
def loop_run(workspace: WorkspaceOpt = None, set_: SetOpt = None, drive: DriveOpt = True):
    """One pass: alerts new to the loop become loop runs (loop.on_alert decides what they do), and every
    active run moves on as far as it can now. A run a killed process left is continued from its step."""
    from lmops import loop
    from lmops.store import default_actor

    ws, cfg, store = _store(workspace, set_)
    _batch_priority(cfg)
    with store:
        runs = loop.tick(ws, cfg, store, default_actor(), log=log, drive=drive)
        if runs:
            _print_runs(runs)
        else:
            log("loop: nothing new (no alert on loop.signals, no run in progress)")


@loop_app.command("watch")
@friendly
def loop_watch(workspace: WorkspaceOpt = None, set_: SetOpt = None, drive: DriveOpt = True,
               interval: Annotated[Optional[str], typer.Option(help="Between passes, e.g. 30s (default: loop.interval_s).")] = None,
               runs: Annotated[Optional[int], typer.Option(min=1, help="Stop after this many passes (default: until Ctrl-C).")] = None):
    """`lmops loop run` every loop.interval_s: the loop as a long-running process (beside `lmops serve`
    and `lmops monitor watch`)."""
    from lmops import loop
    from lmops.deploy.compare import parse_duration
    from lmops.store import default_actor

    ws, cfg, store = _store(workspace, set_)
    _batch_priority(cfg)
    every = parse_duration(interval, "--interval").total_seconds() if interval else cfg.loop.interval_s
    done = 0
    with store:
        try:
            while True:
                for r in loop.tick(ws, cfg, store, default_actor(), log=log, drive=drive):
                    if not r.active:
                        log(f"loop run {r.id}: {r.status} ({r.outcome}): {r.reason}")
                done += 1
                if runs is not None and done >= runs:
                    return
                time.sleep(every)
        except KeyboardInterrupt:
            log("loop watch stopped; an active run continues at the next `lmops loop run`")


@loop_app.command("status")
@friendly
def loop_status(run_id: Annotated[Optional[int], typer.Argument(help="A loop run: its steps, outputs and audit trail.")] = None,
                workspace: WorkspaceOpt = None,
                limit: Annotated[int, typer.Option(min=1, help="Runs to list.")] = 20):
    """Where the loop stands and why: its runs, newest first (or one run in full)."""
    _, cfg, store = _store(workspace)
    with store:
        if run_id is None:
            runs = store.loop.list(limit)
            if not runs:
                log(f"no loop runs yet (loop.on_alert is {cfg.loop.on_alert})")
                return
            _print_runs(runs)
            return
        r = store.loop.get(run_id)
        entries = store.audit.list(1000, subject=f"loop:{r.id}")
    _print_runs([r])
    d = r.details
    if r.window_start:
        log(f"production prompts of {r.endpoint}: {r.window_start:%Y-%m-%d %H:%M:%S} .. {r.window_end:%H:%M:%S} UTC")
    for key, what in (("alerts", "alerts (lmops monitor alerts)"), ("base", "base model (lmops lineage)"),
                      ("dataset", "dataset (lmops data show)"), ("pipeline_run", "pipeline run (lmops pipeline status)"),
                      ("version", "challenger version (lmops lineage)"), ("rollout", "rollout (lmops rollout status)")):
        if d.get(key) is not None:
            log(f"  {what}: {d[key]}")
    ev = d.get("evaluation")
    if ev:
        for split in ("new", "old"):
            c, b = ev[split]["champion"], ev[split]["challenger"]
            log(f"  {split} {'traffic' if split == 'new' else 'validation split'} ({b['texts']} texts): bits per byte "
                f"challenger {b['val_bpb']:.4f}, champion {c['val_bpb']:.4f}")
    for e in entries[::-1]:
        log(f"  {e.timestamp} {e.action}" + (f": {e.reason}" if e.reason else ""))


@loop_app.command("retrain")
@friendly
def loop_retrain(workspace: WorkspaceOpt = None, set_: SetOpt = None, drive: DriveOpt = True,
                 endpoint: Annotated[Optional[str], typer.Option("--endpoint", "-e", help="Default: loop.endpoint.")] = None,
                 since: Annotated[str, typer.Option(help="Production prompts of this long back, e.g. 1h, 1d.")] = "1d",
                 wait: Annotated[bool, typer.Option(help="Advance it now as far as it goes (else the next `lmops loop run`).")] = True):
    """Start a retrain by hand, as an alert would (cool-down and daily cap do not apply to a person)."""
    from lmops import loop
    from lmops.deploy.compare import parse_duration
    from lmops.store import default_actor, utcnow

    ws, cfg, store = _store(workspace, [*(set_ or []), *([f"loop.endpoint={endpoint}"] if endpoint else [])])
    _batch_priority(cfg)
    until = utcnow()
    with store:
        name = loop.endpoint_of(cfg, store)
        active = store.loop.list(5, endpoint=name, active=True)
        if active:
            raise LmopsError(f"loop run {active[0].id} is retraining {name} already (step {active[0].step}); "
                             f"`lmops loop status {active[0].id}`")
        run = loop.start(ws, cfg, store, default_actor(), name, until - parse_duration(since, "--since"), until, log=log)
        if wait:
            run = loop.advance(ws, cfg, store, run.id, default_actor(), log=log, drive=drive)
        _print_runs([run])


@loop_app.command("approve")
@friendly
def loop_approve(run_id: Annotated[int, typer.Argument(help="A loop run waiting before its canary.")],
                 workspace: WorkspaceOpt = None,
                 as_: Annotated[Optional[str], typer.Option("--as", help="Approver name; default LMOPS_USER or your user name.")] = None):
    """Let a run waiting for approval (loop.approve_before_canary) go on to its canary at the next pass."""
    from lmops import loop
    from lmops.store import default_actor

    _, cfg, store = _store(workspace)
    who = as_ or default_actor()
    if cfg.registry.approvers and who not in cfg.registry.approvers:
        raise LmopsError(f"{who} is not in registry.approvers ({', '.join(cfg.registry.approvers)})")
    with store:
        run = loop.approve(store, run_id, who)
    log(f"loop run {run.id} approved by {who}; its canary starts at the next `lmops loop run`")
