"""The server's dashboard: GET /dashboard, server-rendered HTML for people with a deployer key.

What it shows, from the store: the endpoint's deployments with their model versions and traffic/mirror
split, the rollout in progress with its latest analysis, each drift signal over time against its
threshold (one chart per signal and deployment, alerts marked), the alerts and their delivery, requests
per minute and p50/p95 latency over the last hour, the last 20 requests (prompt and completion cut to
80 characters). A server of one model (no endpoint) shows the same without the endpoint's sections.

Signing in: a browser cannot send `Authorization: Bearer`, so the login form (POST /dashboard/login, the
key as a form field, never in a URL) checks the key once and sets a cookie holding a session token,
not the key: `key id . expiry . HMAC-SHA256` under a random secret of this server process (a restart, or
another replica, signs everyone out). Each page checks the token and then the key in the store, so a
revoked key's session ends at once. The cookie is HttpOnly, SameSite=Strict, Secure over https, and has
Path=/dashboard; only these routes read it (the /v1 APIs take only the Bearer header, so a cookie
cannot be used for cross-site requests to them). With auth off the dashboard is open, as is the rest.

Everything from the store is HTML-escaped; the pages run no script (CSP forbids it) and load nothing
from elsewhere: the charts are inline SVG (lmops/monitor/charts.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import statistics
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from html import escape
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from lmops.monitor.charts import bar_chart, fmt, line_chart, result_charts, split_bar
from lmops.monitor.signals import SIGNALS
from lmops.serve.auth import allows
from lmops.store import ApiKey, utcnow

COOKIE = "lmops_dashboard"
SESSION_S = 8 * 3600  # a working day; then sign in again
TEXT_CHARS = 80  # of a prompt or completion in the recent requests
RECENT = 20
MONITOR_HOURS = 24  # drift charts cover this much history (?hours=N: up to 30 days)
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def install(app: FastAPI, server, store) -> None:
    """Add /dashboard, /dashboard/login and /dashboard/logout to the app of `server` (lmops.serve.app)."""
    sessions = Sessions(store)

    def auth_on() -> bool:
        auth = getattr(app.state, "auth", None)
        return auth is not None and auth.cfg.enabled

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard(request: Request, hours: int = MONITOR_HOURS) -> Response:
        key = None
        if auth_on():
            key = await run_in_threadpool(sessions.check, request.cookies.get(COOKIE))
            if key is None:
                response = RedirectResponse("/dashboard/login", status_code=303, headers=HEADERS)
                if COOKIE in request.cookies:  # expired, forged or revoked: drop it
                    response.delete_cookie(COOKIE, path="/dashboard")
                return response
        hours = min(max(hours, 1), 24 * 30)
        body = await run_in_threadpool(Page(server, store, key, auth_on(), hours).render)
        return HTMLResponse(body, headers=HEADERS)

    @app.get("/dashboard/login", include_in_schema=False)
    async def login_form() -> Response:
        if not auth_on():
            return RedirectResponse("/dashboard", status_code=303, headers=HEADERS)
        return _login_page()

    @app.post("/dashboard/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        if not auth_on():
            return RedirectResponse("/dashboard", status_code=303, headers=HEADERS)
        origin = request.headers.get("origin")
        if origin not in (None, "null") and origin.split("://", 1)[-1] != request.headers.get("host"):
            return _login_page("This form must be sent from this server's own page.", 403)
        form = parse_qs((await request.body()).decode("utf-8", "replace"))  # the body only: never the URL
        secret = (form.get("key") or [""])[0].strip()
        key = await run_in_threadpool(app.state.auth.authenticator.verify, secret) if secret else None
        if key is None:
            return _login_page("Invalid or revoked API key.", 401)
        if not allows(key.role, "deployer"):
            return _page("Not allowed", f"<p>API key {escape(key.prefix)} ({escape(key.name)}) has role "
                         f"'{escape(key.role)}'; the dashboard needs a deployer or admin key.</p>"
                         '<p><a href="/dashboard/login">Sign in with another key</a></p>', 403)
        response = RedirectResponse("/dashboard", status_code=303, headers=HEADERS)
        response.set_cookie(COOKIE, sessions.issue(key), max_age=SESSION_S, path="/dashboard", httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")
        return response

    async def logout() -> Response:
        response = RedirectResponse("/dashboard/login", status_code=303, headers=HEADERS)
        response.delete_cookie(COOKIE, path="/dashboard")
        return response

    app.get("/dashboard/logout", include_in_schema=False)(logout)
    app.post("/dashboard/logout", include_in_schema=False)(logout)


# ----------------------------------------------------------------------------- sessions

class Sessions:
    """Session tokens `id.expiry.signature`, signed with a secret of this process, checked against the store."""

    def __init__(self, store, clock=time.time):
        self.store, self.clock = store, clock
        self.secret = secrets.token_bytes(32)

    def _sign(self, payload: str) -> str:
        mac = hmac.new(self.secret, payload.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def issue(self, key: ApiKey) -> str:
        payload = f"{key.id}.{int(self.clock()) + SESSION_S}"
        return f"{payload}.{self._sign(payload)}"

    def check(self, token: str | None) -> ApiKey | None:
        """The key of a valid, unexpired session whose key is still current and at least deployer; else None."""
        if not token or token.count(".") != 2:
            return None
        key_id, expiry, signature = token.split(".")
        if not hmac.compare_digest(signature, self._sign(f"{key_id}.{expiry}")):
            return None
        if not (key_id.isdigit() and expiry.isdigit()) or int(expiry) < self.clock():
            return None
        key = next((k for k in self.store.keys.list() if k.id == int(key_id)), None)
        if key is None or key.revoked or not allows(key.role, "deployer"):
            return None
        return key


# ----------------------------------------------------------------------------- the page

class Page:
    """One rendering of the dashboard: reads the store, returns the HTML."""

    def __init__(self, server, store, key: ApiKey | None, auth: bool, hours: int):
        self.server, self.store, self.key, self.auth, self.hours = server, store, key, auth, hours
        self.endpoint: str | None = server.router.endpoint
        self.now = utcnow()

    def mine(self, rows: Iterable, attr: str = "endpoint") -> list:
        """Rows of this server: its endpoint's, or (a model server) those of no endpoint."""
        return [r for r in rows if getattr(r, attr) == self.endpoint]

    def render(self) -> str:
        parts = [self.header()]
        if self.endpoint is not None:
            parts += [self.deployments(), self.rollout()]
        parts += [self.drift(), self.alerts(), self.traffic(), self.recent()]
        title = f"lmops · {self.endpoint or self.model_name()}"
        return _document(title, "".join(parts))

    def model_name(self) -> str:
        served = self.server.served
        return "model" if served is None else f"{served.name} v{served.version}"

    def header(self) -> str:
        who = ""
        if self.key is not None:
            who = (f'signed in as {e(self.key.name)} ({e(self.key.prefix)}, {e(self.key.role)}) '
                   '<form method="post" action="/dashboard/logout"><button>Sign out</button></form>')
        router = self.server.router
        status = "ready" if router.ready else ("failed: " + e(self.server.load_error)) if self.server.load_error \
            else "loading"
        what = f"endpoint <b>{e(self.endpoint)}</b>" if self.endpoint else f"model <b>{e(self.model_name())}</b>"
        return (f'<header><h1>lmops dashboard</h1><p>{what} · {status} · {e(_when(self.now))} UTC · '
                f'<a href="/dashboard">refresh</a></p><p class="who">{who}</p></header>')

    # ------------------------------------------------------------------------- endpoint

    def deployments(self) -> str:
        ep = self.store.endpoints.find(self.endpoint)
        if ep is None:
            return _section("Deployments", f"<p>endpoint {e(self.endpoint)} is not in the store.</p>")
        backends = self.server.router.backends
        rows = []
        for name, d in ep.deployments.items():
            loaded = name in backends and backends[name].served is not None
            rows.append([name, d.model_name, d.model_version, d.model_ref, d.runtime or "default",
                         f"{ep.traffic.get(name, 0)}%", f"{ep.mirror.get(name, 0)}%" if ep.mirror.get(name) else "-",
                         "yes" if loaded else "no"])
        split = " · ".join(f"{n} {w}%" for n, w in ep.traffic.items() if w > 0) or "no traffic"
        mirror = " · ".join(f"{n} {w}%" for n, w in ep.mirror.items() if w > 0)
        body = (f'<p class="split">traffic: {e(split)}{" · mirror: " + e(mirror) if mirror else ""} '
                f'(revision {ep.revision})</p>{split_bar(ep.traffic)}'
                + _table(["deployment", "model", "version", "reference", "runtime", "traffic", "mirror", "loaded"], rows))
        return _section("Deployments", body)

    def rollout(self) -> str:
        active = self.store.rollouts.active(self.endpoint)
        if not active:
            last = self.store.rollouts.latest(self.endpoint)
            text = "none in progress" if last is None else (
                f"none in progress; the last, of {e(last.target)}, {e(last.status)} "
                f"{e(_when(last.finished_at or last.updated_at))}: {e(last.message)}")
            return _section("Rollout", f"<p>{text}</p>")
        r = active[-1]
        step = f"step {r.step_index + 1}/{len(r.steps)}" + (f", {r.target} at {r.share}%" if r.share is not None else "")
        body = (f"<p>{e(r.strategy)} of <b>{e(r.target)}</b> (stable {e(r.stable)}): <b>{e(r.status)}</b>, "
                f"{e(step)}; {e(r.message)}</p><p>started {e(_when(r.started_at))} by {e(r.started_by)}; "
                f"failures {r.failures}, inconclusive {r.inconclusive}</p>")
        if r.analyses:
            a = r.analyses[-1]
            body += (f"<h3>Latest analysis: {e(a.get('outcome'))} (at {e(a.get('at') or a.get('until'))})</h3>"
                     + _table(["metric", "canary", "stable", "n canary", "n stable", "outcome", "why"],
                              [[m.get("metric"), fmt(m.get("canary")), fmt(m.get("stable")), m.get("canary_n"),
                                m.get("stable_n"), m.get("outcome"), m.get("why")] for m in a.get("measurements", [])]))
        else:
            body += "<p>no analysis yet</p>"
        return _section("Rollout", body)

    # ------------------------------------------------------------------------- monitoring

    def drift(self) -> str:
        rows = self.store.monitor.list(self.endpoint, since=self.now - timedelta(hours=self.hours), limit=50_000)
        rows = self.mine(rows)
        drift = [r for r in rows if r.signal not in SIGNALS or SIGNALS[r.signal].drift]
        figures = "".join(
            f'<figure data-signal="{e(signal)}" data-deployment="{e(where)}">{svg}<figcaption>{e(signal)} · {e(where)}: '
            f'latest <b class="value">{fmt(last.value)}</b>, threshold <b class="threshold">{fmt(last.threshold)}</b>'
            f'{" <b class=alert>ALERT</b>" if last.alert else ""}</figcaption></figure>'
            for signal, where, last, svg in result_charts(drift))
        latest = self.mine(self.store.monitor.latest_run(self.endpoint))
        table = ""
        if latest:
            table = (f"<h3>Latest run ({e(_when(latest[0].ts))} UTC)</h3>"
                     + _table(["deployment", "signal", "value", "threshold", "p", "n", ""],
                              [[r.deployment or r.model_version, r.signal, fmt(r.value), fmt(r.threshold),
                                fmt(r.p_value), r.n_window, "ALERT" if r.alert else ""] for r in latest]))
        note = f"<p>the last {self.hours} h; dashed: the threshold, red: an alert.</p>"
        return _section("Drift", (note + f'<div class="charts">{figures}</div>' + table) if rows else
                        "<p>no monitor results yet (lmops monitor run, or the server's scheduled runs).</p>")

    def alerts(self) -> str:
        alerts = self.mine(self.store.alerts.list(limit=200, endpoint=self.endpoint))[:50]
        if not alerts:
            return _section("Alerts", "<p>none</p>")

        def delivery(a) -> str:
            if a.delivered_at is not None:
                return f"delivered {_when(a.delivered_at)}"
            if a.attempts:
                return f"undelivered after {a.attempts} attempts: {a.last_error or ''}"
            return "not sent"

        return _section("Alerts", _table(
            ["time (UTC)", "deployment", "signal", "value", "threshold", "message", "webhook"],
            [[_when(a.ts), a.deployment, a.signal, fmt(a.value), fmt(a.threshold), a.message, delivery(a)]
             for a in alerts]))

    def traffic(self) -> str:
        start = (self.now - timedelta(hours=1)).replace(second=0, microsecond=0) + timedelta(minutes=1)
        rows = self.mine(self.store.requests.rows(since=start, endpoint=self.endpoint,
                                                  columns=("ts", "latency_s", "status_code", "endpoint")))
        minutes = [start + timedelta(minutes=i) for i in range(60)]
        buckets: list[list[float]] = [[] for _ in minutes]
        counts = [0] * 60
        for r in rows:
            i = int((r.ts - start).total_seconds() // 60)
            if 0 <= i < 60:
                counts[i] += 1
                if r.latency_s is not None:
                    buckets[i].append(r.latency_s)
        p50 = [(t, _quantile(b, 0.5)) for t, b in zip(minutes, buckets)]
        p95 = [(t, _quantile(b, 0.95)) for t, b in zip(minutes, buckets)]
        every = [r.latency_s for r in rows if r.latency_s is not None]
        errors = sum(1 for r in rows if r.status_code >= 500)
        summary = (f'<p>last hour: <b class="requests">{len(rows)}</b> requests, {errors} with status >= 500, '
                   f'latency p50 {fmt(_quantile(every, 0.5))} s, p95 {fmt(_quantile(every, 0.95))} s</p>')
        charts = (f'<div class="charts"><figure>{bar_chart(list(zip(minutes, counts)), title="requests per minute", label="requests")}'
                  f'</figure><figure>{line_chart(p50, others={"p95": p95}, title="latency (s)", label="p50")}</figure></div>')
        return _section("Latency and throughput", summary + charts)

    def recent(self) -> str:
        rows = self.mine(self.store.requests.list(limit=RECENT if self.endpoint else 500, endpoint=self.endpoint))
        rows = rows[:RECENT]
        if not rows:
            return _section("Recent requests", "<p>none yet</p>")
        return _section("Recent requests", _table(
            ["time (UTC)", "request", "deployment", "version", "status", "tokens", "latency s", "prompt", "completion"],
            [[_when(r.ts), r.request_id[:12], r.deployment, r.model_version, r.status_code,
              f"{r.prompt_tokens or 0}+{r.completion_tokens or 0}", fmt(r.latency_s), _cut(r.prompt),
              _cut(r.completion if r.completion is not None else r.error)] for r in rows], cls="requests"))


# ----------------------------------------------------------------------------- HTML

STYLE = """body{font:14px system-ui,sans-serif;margin:0 1.5em 2em;color:#111827}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:1em}h1{font-size:20px}h2{font-size:16px;margin-top:1.5em}
h3{font-size:14px}table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #e5e7eb;padding:2px 6px;
text-align:left;vertical-align:top}th{background:#f3f4f6}td.text{font-family:monospace;max-width:32em;
overflow-wrap:anywhere}figure{display:inline-block;margin:0 1em 1em 0}figcaption{font-size:12px}.alert{color:#dc2626}
.who form{display:inline}.error{color:#dc2626}"""


def e(value) -> str:
    """Escaped for HTML text and attributes; None as '-'."""
    return "-" if value is None else escape(str(value), quote=True)


def _document(title: str, body: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f'<meta name="viewport" content="width=device-width"><link rel="icon" href="data:,">'
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(_document(title, f"<h1>{e(title)}</h1>{body}"), status_code=status, headers=HEADERS)


def _login_page(error: str | None = None, status: int = 200) -> HTMLResponse:
    message = f'<p class="error" role="alert">{e(error)}</p>' if error else ""
    return _page("lmops dashboard: sign in", message + (
        '<form method="post" action="/dashboard/login"><label>API key (deployer or admin) '
        '<input type="password" name="key" autocomplete="off" required autofocus></label> '
        "<button>Sign in</button></form><p>An admin makes keys with <code>lmops keys create NAME --role "
        "deployer</code>.</p>"), status)


def _section(title: str, body: str) -> str:
    slug = title.lower().split()[0]
    return f'<section id="{e(slug)}"><h2>{e(title)}</h2>{body}</section>'


def _table(head: Sequence[str], rows: Sequence[Sequence], cls: str = "") -> str:
    text_cols = {i for i, h in enumerate(head) if h in ("prompt", "completion", "message", "why", "webhook")}
    out = [f'<table class="{e(cls)}"><tr>' + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="text">{e(v)}</td>' if i in text_cols else f"<td>{e(v)}</td>"
                                    for i, v in enumerate(row)) + "</tr>")
    return "".join(out) + "</table>"


def _cut(text: str | None, n: int = TEXT_CHARS) -> str | None:
    if text is None:
        return None
    return text if len(text) <= n else text[:n - 1] + "…"


def _when(t: datetime | None) -> str:
    return "-" if t is None else f"{t:%Y-%m-%d %H:%M:%S}"


def _quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]
