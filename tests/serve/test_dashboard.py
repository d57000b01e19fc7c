"""The dashboard (lmops/serve/dashboard.py) of a live server: signing in with httpx, escaping, and a real
headless Chromium (the OS package, driven by Playwright) signing in through the form and reading the page.

The server serves an endpoint with two deployments of the tiny table model; the store is seeded with
what the monitor, the alerting, a rollout and the request log would have written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from datetime import timedelta

import httpx
import pytest
from fastapi.testclient import TestClient

from lmops.deploy.models import resolve_deployment
from lmops.monitor.charts import line_chart, write_plot
from lmops.serve.app import create_app
from lmops.store import utcnow

from .conftest import LiveServer, save_model, table_model

CHROMIUM = "/usr/bin/chromium"
EP = "dash"
XSS = "<script>alert('xss')</script> tell me"
SETS = ("serve.endpoint_poll_s=0.2", "monitor.interval_s=0")


@pytest.fixture(scope="module")
def live(env, tok, tmp_path_factory):
    """A server of endpoint `dash` (blue 90%, green 10%) on a store seeded with monitor results, an alert,
    a rollout at its first analysis and 50 logged requests."""
    store, now = env.store, utcnow()
    store.endpoints.create(EP, "tests")
    for name, seed in (("blue", 0), ("green", 1)):
        folder = tmp_path_factory.mktemp(name) / name
        save_model(folder, table_model(tok, seed=seed), tok)
        store.endpoints.deploy(resolve_deployment(env.ws, env.config(), EP, name, str(folder)), "tests")
    store.endpoints.set_traffic(EP, "tests", {"blue": 90, "green": 10})
    rows = []
    for run in range(4):  # four runs an hour apart; the last alerts on blue's prompt_nll
        for dep in ("blue", "green"):
            for signal, base in (("prompt_nll", 0.1), ("prompt_length_psi", 0.02)):
                alert = run == 3 and dep == "blue" and signal == "prompt_nll"
                rows.append({"run_id": f"run{run}", "ts": now - timedelta(hours=3 - run), "endpoint": EP,
                             "deployment": dep, "model_version": "1", "signal": signal, "kind": "prompts",
                             "value": 0.9123 if alert else base + 0.01 * run, "threshold": 0.4567,
                             "n_reference": 500, "n_window": 200, "window_start": now - timedelta(hours=4 - run),
                             "window_end": now - timedelta(hours=3 - run), "reference": "validation", "alert": alert})
    for run in {r["run_id"] for r in rows}:
        store.monitor.add([r for r in rows if r["run_id"] == run])
    store.alerts.add({"ts": now, "run_id": "run3", "endpoint": EP, "deployment": "blue", "signal": "prompt_nll",
                      "value": 0.9123, "threshold": 0.4567,
                      "message": "prompt_nll of dash/blue is 0.9123 <img src=x onerror=alert(1)>"})
    store.requests.log([{"ts": now - timedelta(minutes=m, seconds=5), "request_id": f"req{m:03d}",
                         "route": "/v1/completions", "endpoint": EP, "deployment": "blue" if m % 3 else "green",
                         "model_version": "1", "status_code": 200, "prompt": XSS if m == 0 else "the quick " * 20,
                         "completion": "frog," * 30, "prompt_tokens": 10, "completion_tokens": 5,
                         "latency_s": 0.05 + 0.001 * m} for m in range(50)])
    r = store.rollouts.create(EP, "green", "blue", "canary", [10, 50, 100], 60.0, "tests", {"blue": 100})
    analysis = {"outcome": "inconclusive", "canary": "green", "stable": "blue", "step": 0, "share": 10,
                "at": now.isoformat(), "measurements": [
                    {"metric": "p95_latency_s", "canary": 0.061, "stable": 0.058, "canary_n": 12, "stable_n": 88,
                     "outcome": "inconclusive", "success": "canary <= stable * 1.2", "failure": "", "why": "too few"}]}
    store.rollouts.advance(r, None, now, step_started_at=now, analyses=[analysis], message="step 1/3: green at 10%")
    server = LiveServer(create_app(env.config(*SETS), None, store, endpoint=EP, ws=env.ws))
    env.servers.append(server)
    return server


def sign_in(live, key: str) -> httpx.Client:
    client = httpx.Client(base_url=live.url, timeout=30)
    r = client.post("/dashboard/login", data={"key": key})
    assert r.status_code == 303 and r.headers["location"] == "/dashboard"
    return client


def test_sign_in_with_a_deployer_key_sets_a_strict_http_only_session_cookie(env, live):
    with httpx.Client(base_url=live.url, timeout=30) as anon:
        r = anon.get("/dashboard")
        assert r.status_code == 303 and r.headers["location"] == "/dashboard/login"
        form = anon.get("/dashboard/login")
        assert form.status_code == 200 and 'name="key"' in form.text and 'method="post"' in form.text
        assert "script-src" not in form.headers["content-security-policy"]  # default-src 'none': no script
        assert form.headers["content-security-policy"].startswith("default-src 'none'")

        bad = anon.post("/dashboard/login", data={"key": "lmk_notakey0000000000000"})
        assert bad.status_code == 401 and "Invalid or revoked" in bad.text and 'name="key"' in bad.text
        assert "set-cookie" not in bad.headers
        low = anon.post("/dashboard/login", data={"key": env.keys["inference"]})
        assert low.status_code == 403 and "deployer" in low.text and "set-cookie" not in low.headers

        # the key in the URL is never taken, on the form's target or on the page
        assert anon.post(f"/dashboard/login?key={env.keys['deployer']}").status_code == 401
        assert anon.get("/dashboard", params={"key": env.keys["deployer"]}).status_code == 303

        ok = anon.post("/dashboard/login", data={"key": env.keys["deployer"]})
    assert ok.status_code == 303 and ok.headers["location"] == "/dashboard"
    cookie = ok.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower() and "path=/dashboard" in cookie.lower()
    assert "secure" not in cookie.lower()  # plain http on loopback
    token = cookie.split(";")[0].split("=", 1)[1]
    assert env.keys["deployer"] not in cookie and env.keys["deployer"][4:12] not in token  # not the key

    with httpx.Client(base_url=live.url, timeout=30, cookies={"lmops_dashboard": token}) as browser:
        page = browser.get("/dashboard")
        assert page.status_code == 200 and "test-deployer" in page.text
        # the cookie is for the dashboard only: the APIs want the Bearer header
        api = browser.post("/v1/completions", json={"model": EP, "prompt": "a", "max_tokens": 1},
                           headers={"Cookie": f"lmops_dashboard={token}"})
        assert api.status_code == 401
        assert browser.get("/metrics", headers={"Cookie": f"lmops_dashboard={token}"}).status_code == 401
        forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
        assert httpx.get(f"{live.url}/dashboard", cookies={"lmops_dashboard": forged}).status_code == 303
        out = browser.post("/dashboard/logout")
        assert out.status_code == 303 and "lmops_dashboard=" in out.headers["set-cookie"]
        assert "max-age=0" in out.headers["set-cookie"].lower()

    admin = sign_in(live, env.keys["admin"])
    assert admin.get("/dashboard").status_code == 200
    admin.close()


def test_a_revoked_keys_session_ends_at_once(env, live):
    secret = env.key("deployer", "short-lived")
    client = sign_in(live, secret)
    assert client.get("/dashboard").status_code == 200
    env.store.keys.revoke(secret[:12], "tests")
    r = client.get("/dashboard")
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/login"
    client.close()


def test_secure_cookie_over_https_and_login_from_another_origin_refused(env, live):
    client = TestClient(live.app, base_url="https://dash.example")  # no lifespan: only the login runs
    r = client.post("/dashboard/login", data={"key": env.keys["deployer"]}, follow_redirects=False)
    assert r.status_code == 303 and "secure" in r.headers["set-cookie"].lower()
    r = client.post("/dashboard/login", data={"key": env.keys["deployer"]}, follow_redirects=False,
                    headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "set-cookie" not in r.headers


def test_the_page_shows_the_store_and_escapes_what_it_holds(env, live):
    client = sign_in(live, env.keys["deployer"])
    html = client.get("/dashboard").text
    client.close()
    assert "<script>" not in html and "&lt;script&gt;alert(&#x27;xss&#x27;)&lt;/script&gt;" in html
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "blue 90% · green 10%" in html
    assert "0.9123" in html and "0.4567" in html and "ALERT" in html
    assert "p95_latency_s" in html and "inconclusive" in html  # the rollout's latest analysis
    assert html.count("<svg") >= 4 + 2  # a chart per (signal, deployment), requests and latency
    assert "stroke-dasharray" in html  # the threshold
    assert ">50</b> requests" in html
    assert "frog," * 10 in html and "frog," * 30 not in html  # cut to 80 characters
    assert env.keys["deployer"] not in html and env.keys["inference"] not in html


def test_a_model_server_renders_without_endpoint_sections_and_open_without_auth(env):
    live = env.start(*SETS, "auth.enabled=false")
    r = httpx.get(f"{live.url}/dashboard", timeout=30)
    assert r.status_code == 200 and 'id="drift"' in r.text and 'id="recent"' in r.text
    assert 'id="deployments"' not in r.text and 'id="rollout"' not in r.text
    assert httpx.post(f"{live.url}/dashboard/login", data={"key": "x"}).status_code == 303
    live.stop()


def test_charts_escape_and_write_a_page(env, tmp_path):
    now = utcnow()
    svg = line_chart([(now - timedelta(minutes=1), 1.0), (now, None)], threshold=0.5, marked=[now],
                     title="<b>x</b>")
    assert svg.startswith("<svg") and "&lt;b&gt;" in svg and "<b>" not in svg
    assert "no data" in line_chart([])
    out = tmp_path / "plot.html"
    write_plot(env.store.monitor.list(EP), out)
    assert out.read_text().count("<svg") >= 1
    png = tmp_path / "plot.png"
    pytest.importorskip("matplotlib")
    write_plot(env.store.monitor.list(EP), png)
    assert png.read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- a real browser

@pytest.fixture(scope="module")
def chromium():
    if not os.path.exists(CHROMIUM):
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip(f"{CHROMIUM} missing; install it with `apt-get install -y chromium` (as root)")
        subprocess.run(["apt-get", "install", "-y", "chromium"], check=True, capture_output=True, timeout=600)
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


def test_a_browser_signs_in_through_the_form_and_sees_the_store(env, live, chromium, tmp_path):
    started = time.monotonic()
    page = chromium.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))

    page.goto(f"{live.url}/dashboard")
    assert page.url.endswith("/dashboard/login")
    page.fill("input[name=key]", env.keys["inference"])
    page.click("button")
    assert "deployer" in page.inner_text("body")  # 403: role too low
    assert [p for p in problems if "403" not in p] == []  # Chromium logs the 403 of the page itself
    problems.clear()
    page.goto(f"{live.url}/dashboard/login")
    page.fill("input[name=key]", env.keys["deployer"])
    page.click("button")
    page.wait_for_url(f"{live.url}/dashboard")
    assert env.keys["deployer"] not in page.url

    cookie = next(c for c in page.context.cookies() if c["name"] == "lmops_dashboard")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # HttpOnly: out of a script's reach

    body = page.inner_text("body")
    assert "blue 90% · green 10%" in body
    fig = page.locator('figure[data-signal="prompt_nll"][data-deployment="dash/blue"] figcaption')
    assert fig.locator(".value").inner_text() == "0.9123" and fig.locator(".threshold").inner_text() == "0.4567"
    assert "ALERT" in fig.inner_text()
    assert "prompt_nll of dash/blue is 0.9123 <img src=x onerror=alert(1)>" in body  # as text
    assert XSS[:40] in body
    assert "p95_latency_s" in page.inner_text("#rollout")
    assert page.locator("#recent table tr").count() == 21  # the header and the last 20
    assert page.locator("svg").count() >= 6
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000

    page.click("text=Sign out")
    page.wait_for_url(f"{live.url}/dashboard/login")
    page.goto(f"{live.url}/dashboard")
    assert page.url.endswith("/dashboard/login")
    page.close()
    assert problems == []
    assert time.monotonic() - started < 15
