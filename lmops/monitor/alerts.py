"""Alerts: a monitor run's crossed signals recorded, audited, logged, and POSTed to monitor.webhook_url.

- One alert per deployment and signal while it stays past its threshold: a signal that alerted within
  monitor.repeat_s is not raised again (the result row still says `alert`).
- Delivery: a JSON POST, retried monitor.webhook_retries times with a pause from 0.5 s doubling; an
  alert no attempt delivered stays in the store as undelivered (attempts, last_error) and every later
  `notify` tries it again first, so a dead webhook loses no alert.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import httpx

from lmops.config import Config
from lmops.monitor.run import Report
from lmops.store import Alert, Store
from lmops.util import first_line

log = logging.getLogger("lmops.monitor")

RETRY_FIRST_S = 0.5


def message(group, r) -> str:
    who = f"{group.endpoint}/{group.deployment}" if group.endpoint else f"model version {group.model_version}"
    if r.rule:
        return f"{who}: {r.signal} = {r.value:.4g} ({r.rule})"
    p = f", p = {r.p_value:.3g}" if r.p_value is not None else ""
    return (f"{who}: {r.signal} = {r.value:.4g} above its threshold {r.threshold:.4g}{p} "
            f"(window {r.n_window} vs reference {r.n_reference}; {r.reference})")


def record(store: Store, cfg: Config, report: Report, actor: str) -> list[Alert]:
    """The report's new alerts in the store and the audit log; those raised within repeat_s skipped."""
    recent = store.alerts.list(1000, since=report.until - timedelta(seconds=cfg.monitor.repeat_s)) \
        if cfg.monitor.repeat_s else []
    raised = {(a.endpoint, a.deployment, a.signal) for a in recent}
    out = []
    for group, r in report.alerts:
        if (group.endpoint, group.deployment, r.signal) in raised:
            continue
        alert = store.alerts.add({"ts": report.until, "run_id": report.run_id, "endpoint": group.endpoint,
                                  "deployment": group.deployment, "signal": r.signal, "value": r.value,
                                  "threshold": r.threshold, "rule": r.rule, "message": message(group, r)})
        subject = f"endpoint:{group.endpoint}" if group.endpoint else f"model:{group.model_version}"
        store.audit.append(actor, "monitor.alert", subject, {"alert": alert.id, "signal": r.signal, "value": r.value,
                                                             "threshold": r.threshold, "run_id": report.run_id})
        log.warning("alert %d: %s", alert.id, alert.message)
        out.append(alert)
    return out


def payload(a: Alert) -> dict:
    return {"source": "lmops", "alert": {
        "id": a.id, "ts": a.ts.isoformat(), "run_id": a.run_id, "endpoint": a.endpoint, "deployment": a.deployment,
        "signal": a.signal, "value": a.value, "threshold": a.threshold, "rule": a.rule, "message": a.message},
        "text": f"lmops alert: {a.message}"}  # Slack and Teams incoming webhooks show `text`


def deliver(store: Store, cfg: Config, sleep=time.sleep) -> tuple[int, int]:
    """POST every undelivered alert, oldest first: (delivered, still undelivered)."""
    url = cfg.monitor.webhook_url
    if not url:
        return 0, 0
    pending = store.alerts.list(1000, undelivered=True)[::-1]
    delivered = 0
    with httpx.Client(timeout=cfg.monitor.webhook_timeout_s) as http:
        for a in pending:
            error = None
            for attempt in range(cfg.monitor.webhook_retries + 1):
                if attempt:
                    sleep(RETRY_FIRST_S * 2 ** (attempt - 1))
                try:
                    r = http.post(url, json=payload(a))
                    error = None if r.is_success else f"HTTP {r.status_code}"
                except httpx.HTTPError as err:
                    error = f"{type(err).__name__}: {first_line(err)}"
                if error is None:
                    break
            store.alerts.attempted(a.id, error)
            if error is None:
                delivered += 1
            else:
                log.warning("alert %d not delivered to the webhook (%s); kept, retried at the next run", a.id, error)
                # the receiver is down: the rest wait for the next run instead of each retrying now
                return delivered, len(pending) - delivered
    return delivered, len(pending) - delivered


def notify(store: Store, cfg: Config, report: Report, actor: str,
           sleep=time.sleep) -> tuple[list[Alert], tuple[int, int]]:
    """record, then deliver (new and earlier undelivered alerts)."""
    alerts = record(store, cfg, report, actor)
    return alerts, deliver(store, cfg, sleep)
