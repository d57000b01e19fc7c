"""The monitoring commands: `lmops monitor run|watch|show|alerts`. Registered on lmops.cli's app when
it is imported; the work is in lmops/monitor, this is only its command line."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmops.cli import SetOpt, WorkspaceOpt, _store, app, console, friendly, log
from lmops.errors import LmopsError

monitor_app = typer.Typer(help="Drift, quality and operations of served models over the request log; alerts.",
                          no_args_is_help=True)
app.add_typer(monitor_app, name="monitor")

EndpointOpt = Annotated[Optional[str], typer.Option("--endpoint", "-e", help="Monitor this endpoint's deployments (default: every endpoint).")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Monitor the requests one model served without an endpoint (a registry reference or a path).")]
WindowOpt = Annotated[Optional[str], typer.Option("--window", help="How much request log to read, e.g. 15m, 1h, 1d (default: monitor.window_s).")]
ReferenceOpt = Annotated[Optional[str], typer.Option("--reference", help="training (the deployed version's validation split), log (the window before) or a dataset version id (default: monitor.reference).")]
ALERT_EXIT = 3  # --fail-on-alert: a run that alerted, told apart from an error (1)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _settings(overrides: list[str] | None, reference: str | None) -> list[str]:
    return [*(overrides or []), *([f"monitor.reference={reference}"] if reference else [])]


def _print_report(report) -> None:
    from rich.table import Table

    for g in report.groups:
        who = f"{g.endpoint}/{g.deployment}" if g.endpoint else f"model version {g.model_version}"
        table = Table("signal", "value", "threshold", "p", "n window", "n ref", "", title=f"{who}: {g.requests} requests",
                      title_justify="left")
        for r in g.results:
            mark = "[bold red]ALERT[/]" if r.alert else ""
            table.add_row(r.signal, _fmt(r.value), _fmt(r.threshold) + (f" ({r.rule})" if r.rule else ""),
                          _fmt(r.p_value), _fmt(r.n_window), _fmt(r.n_reference), mark)
        console.print(table)
        refs = sorted({r.reference for r in g.results if r.reference})
        if refs:
            log("reference: " + "; ".join(refs))
        for note in g.notes:
            log(f"note: {note}")
    log(f"run {report.run_id[:12]} over {report.since:%Y-%m-%d %H:%M:%S} .. {report.until:%H:%M:%S} UTC: "
        f"{len(report.alerts)} alert(s), {report.seconds:.1f} s")


def _one_run(ws, cfg, store, endpoint, model, window, models=None, progress=True):
    from lmops.monitor import alerts
    from lmops.monitor.run import run
    from lmops.store import default_actor

    status = console.status("monitoring") if progress else None
    if status:
        status.start()
    try:
        report = run(ws, cfg, store, endpoint, model, window, models=models,
                     progress=(lambda m: status.update(f"monitoring: {m}")) if status else None)
    finally:
        if status:
            status.stop()
    new, (delivered, undelivered) = alerts.notify(store, cfg, report, default_actor())
    return report, new, delivered, undelivered


def _window(text: str | None) -> timedelta | None:
    from lmops.deploy.compare import parse_duration

    return parse_duration(text, "--window") if text else None


@monitor_app.command("run")
@friendly
def monitor_run(endpoint: EndpointOpt = None, model: ModelOpt = None, window: WindowOpt = None,
                reference: ReferenceOpt = None,
                fail_on_alert: Annotated[bool, typer.Option("--fail-on-alert", help=f"Exit {ALERT_EXIT} when a signal alerted (for CI schedules).")] = False,
                workspace: WorkspaceOpt = None, overrides: SetOpt = None):
    """Compare a window of the request log, per deployment, with a reference: every signal, its
    calibrated threshold, alerts recorded and sent to monitor.webhook_url."""
    if endpoint and model:
        raise LmopsError("give --endpoint or --model, not both")
    ws, cfg, store = _store(workspace, _settings(overrides, reference))
    with store:
        report, new, delivered, undelivered = _one_run(ws, cfg, store, endpoint, model, _window(window))
        _print_report(report)
        if new:
            log(f"{len(new)} new alert(s) recorded" + (f"; {delivered} delivered, {undelivered} undelivered (kept)"
                                                      if cfg.monitor.webhook_url else ""))
    if fail_on_alert and report.alerts:
        raise typer.Exit(ALERT_EXIT)


@monitor_app.command("watch")
@friendly
def monitor_watch(endpoint: EndpointOpt = None, model: ModelOpt = None, window: WindowOpt = None,
                  reference: ReferenceOpt = None,
                  interval: Annotated[Optional[str], typer.Option("--interval", help="Between runs, e.g. 5m (default: monitor.interval_s, else 15m).")] = None,
                  runs: Annotated[Optional[int], typer.Option("--runs", help="Stop after this many runs (default: until interrupted).")] = None,
                  workspace: WorkspaceOpt = None, overrides: SetOpt = None):
    """Run the monitor on a schedule, as a process of its own (for a fleet of servers on one store)."""
    from lmops.deploy.compare import parse_duration
    from lmops.monitor.run import ModelCache

    ws, cfg, store = _store(workspace, _settings(overrides, reference))
    every = parse_duration(interval, "--interval").total_seconds() if interval else (cfg.monitor.interval_s or 900.0)
    models = ModelCache(ws, cfg)
    done = 0
    with store:
        try:
            while runs is None or done < runs:
                started = time.monotonic()
                report, new, _, undelivered = _one_run(ws, cfg, store, endpoint, model, _window(window), models,
                                                       progress=False)
                done += 1
                log(f"run {done}: {sum(len(g.results) for g in report.groups)} signals over {len(report.groups)} "
                    f"deployment(s), {len(report.alerts)} alerting, {len(new)} new alert(s), {report.seconds:.1f} s"
                    + (f", {undelivered} undelivered" if undelivered else ""))
                if runs is not None and done >= runs:
                    break
                time.sleep(max(0.0, every - (time.monotonic() - started)))
        except KeyboardInterrupt:
            log(f"stopped after {done} run(s)")


@monitor_app.command("show")
@friendly
def monitor_show(endpoint: EndpointOpt = None,
                 signal: Annotated[Optional[str], typer.Option("--signal", help="Only this signal, over time.")] = None,
                 since: Annotated[Optional[str], typer.Option("--since", help="How far back, e.g. 1d (default: 7d).")] = None,
                 plot: Annotated[Optional[Path], typer.Option("--plot", help="Also write a chart of each signal over time with its threshold: out.html (no dependency) or out.png (matplotlib).")] = None,
                 workspace: WorkspaceOpt = None):
    """The latest run (or one signal over time) as a table."""
    from rich.table import Table

    from lmops.deploy.compare import parse_duration
    from lmops.monitor.signals import SIGNALS
    from lmops.store import utcnow

    if signal is not None and signal not in SIGNALS:
        raise LmopsError(f"unknown signal {signal}; known: {', '.join(SIGNALS)}")
    _, _, store = _store(workspace)
    start = utcnow() - parse_duration(since or "7d", "--since")
    with store:
        if signal is None:
            rows = store.monitor.latest_run(endpoint)
            history = store.monitor.list(endpoint, since=start) if plot else rows
        else:
            rows = history = store.monitor.list(endpoint, signal=signal, since=start)
    if not rows:
        log("no monitor results yet: lmops monitor run")
        return
    table = Table("time (UTC)", "deployment", "signal", "value", "threshold", "p", "n", "")
    for r in rows:
        table.add_row(f"{r.ts:%Y-%m-%d %H:%M}", f"{r.endpoint}/{r.deployment}" if r.endpoint else (r.model_version or "-"),
                      r.signal, _fmt(r.value), _fmt(r.threshold), _fmt(r.p_value), _fmt(r.n_window),
                      "[bold red]ALERT[/]" if r.alert else "")
    console.print(table)
    if plot is not None:
        from lmops.monitor.charts import write_plot

        write_plot(history, plot)
        log(f"wrote {plot}")


@monitor_app.command("alerts")
@friendly
def monitor_alerts(endpoint: EndpointOpt = None,
                   undelivered: Annotated[bool, typer.Option("--undelivered", help="Only those no webhook has received.")] = False,
                   limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
                   workspace: WorkspaceOpt = None):
    """Alerts, newest first, with their delivery."""
    from rich.table import Table

    _, _, store = _store(workspace)
    with store:
        items = store.alerts.list(limit, endpoint=endpoint, undelivered=undelivered)
    if not items:
        log("no alerts")
        return
    table = Table("id", "time (UTC)", "signal", "message", "delivered")
    for a in items:
        delivered = f"{a.delivered_at:%H:%M:%S}" if a.delivered_at else (
            f"no ({a.attempts} attempts: {a.last_error})" if a.attempts else "no webhook" if not a.last_error else "no")
        table.add_row(str(a.id), f"{a.ts:%Y-%m-%d %H:%M:%S}", a.signal, a.message, delivered)
    console.print(table)
