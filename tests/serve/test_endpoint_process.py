"""`lmops serve --endpoint` as a user runs it: the CLI in a process of its own, changed from the CLI,
driving a blue-green rollout whose smoke suite it runs against itself under a key of its own, and a
canary that outlives the process driving it (killed with SIGKILL, another server takes over)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
from typer.testing import CliRunner

from lmops.cli import app
from lmops.store import Store
from lmops.workspace import init_workspace

from .conftest import free_port, save_model, table_model, wait_ready

FAST = ["serve.endpoint_poll_s=0.2", "rollout.tick_interval_s=0.2", "rollout.lease_s=2"]


def start_server(ws, port: int, *sets: str) -> subprocess.Popen:
    """`lmops serve --endpoint chat` on port, waited for until /readyz answers 200."""
    args = [a for s in (*FAST, *sets) for a in ("--set", s)]
    proc = subprocess.Popen([sys.executable, "-m", "lmops", "serve", "--endpoint", "chat", "-w", str(ws.root),
                             "--port", str(port), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "LMOPS_USER": "server"})
    wait_ready(proc, f"http://127.0.0.1:{port}")
    return proc


def test_serve_endpoint_follows_the_cli_and_drives_a_blue_green_rollout(tmp_path, tok):
    ws = init_workspace(tmp_path / "ws")
    for name, seed in (("blue", 0), ("green", 1)):
        save_model(tmp_path / name, table_model(tok, seed=seed), tok)
    cli = CliRunner()

    def run(*args):
        result = cli.invoke(app, [*args, "-w", str(ws.root)], catch_exceptions=False)
        return result

    assert run("endpoint", "create", "chat").exit_code == 0
    assert run("deploy", "blue", "--endpoint", "chat", "--model", str(tmp_path / "blue")).exit_code == 0
    assert run("deploy", "green", "--endpoint", "chat", "--model", str(tmp_path / "green")).exit_code == 0
    with Store.for_workspace(ws) as store:
        _, secret = store.keys.create("test", "inference", "tests")
    port = free_port()
    sets = [a for s in FAST for a in ("--set", s)]
    proc = start_server(ws, port)
    url = f"http://127.0.0.1:{port}"
    try:
        ready = httpx.get(f"{url}/readyz", timeout=2)
        assert ready.json()["endpoint"] == "chat"
        assert {d: v["traffic"] for d, v in ready.json()["deployments"].items()} == {"blue": 100, "green": 0}
        bearer = {"Authorization": f"Bearer {secret}"}
        body = {"model": "chat", "prompt": "the quick", "max_tokens": 4}
        assert httpx.post(f"{url}/v1/completions", json=body, headers=bearer, timeout=30).headers[
            "x-lmops-deployment"] == "blue"

        started = run("rollout", "start", "chat", "--to", "green", "--strategy", "blue-green", "--wait",
                      "--timeout", "60", *sets)
        assert started.exit_code == 0, started.output
        time.sleep(0.6)  # three polls of the store
        served = {httpx.post(f"{url}/v1/completions", json=body, headers=bearer, timeout=30).headers[
            "x-lmops-deployment"] for _ in range(5)}
        assert served == {"green"}
        with Store.for_workspace(ws) as store:
            actions = [(e.action, e.actor) for e in store.audit.list(50)]
            keys = [k for k in store.keys.list() if k.created_by == "lmops-rollout"]
        assert ("rollout.switched", ) == tuple(a for a, _ in actions if a == "rollout.switched")
        # the smoke suite ran under a key made for it, revoked after
        assert len(keys) == 1 and keys[0].revoked
        undo = run("rollout", "undo", "chat")
        assert undo.exit_code == 0, undo.output
        time.sleep(0.6)
        assert httpx.post(f"{url}/v1/completions", json=body, headers=bearer, timeout=30).headers[
            "x-lmops-deployment"] == "blue"
    finally:
        proc.terminate()
        proc.wait(30)
    # uvicorn drains, then re-raises the SIGTERM it caught: the exit status of a clean stop is -15
    err = proc.stderr.read()
    assert proc.returncode == -15 and "Traceback" not in err, err[-3000:]


def test_a_canary_continues_when_the_server_driving_it_is_killed_and_another_starts(tmp_path, tok):
    ws = init_workspace(tmp_path / "ws")
    for name, seed in (("blue", 0), ("green", 1)):
        save_model(tmp_path / name, table_model(tok, seed=seed), tok)
    cli = CliRunner()

    def run(*args):
        return cli.invoke(app, [*args, "-w", str(ws.root)], catch_exceptions=False)

    assert run("endpoint", "create", "chat").exit_code == 0
    assert run("deploy", "blue", "--endpoint", "chat", "--model", str(tmp_path / "blue")).exit_code == 0
    assert run("deploy", "green", "--endpoint", "chat", "--model", str(tmp_path / "green")).exit_code == 0
    with Store.for_workspace(ws) as store:
        _, secret = store.keys.create("test", "inference", "tests")
    analysis = ("rollout.window_s=2", "rollout.min_requests=8", "auth.rate_limit_per_s=10000", "auth.burst=10000")
    first, second = free_port(), free_port()
    url = [f"http://127.0.0.1:{first}"]  # where the client sends: moved to the second server once it runs
    stop, served = threading.Event(), []

    def traffic():
        body = {"model": "chat", "prompt": "the quick", "max_tokens": 2}
        with httpx.Client(headers={"Authorization": f"Bearer {secret}"}, timeout=30) as http:
            while not stop.is_set():
                try:
                    r = http.post(f"{url[0]}/v1/completions", json=body)
                    served.append((r.status_code, r.headers.get("x-lmops-deployment")))
                except httpx.TransportError:  # the server was killed: wait for the next one
                    time.sleep(0.05)

    a = start_server(ws, first, *analysis)
    b = None
    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        started = run("rollout", "start", "chat", "--to", "green", "--strategy", "canary", "--steps", "50,100",
                      "--window", "2s")
        assert started.exit_code == 0, started.output
        with Store.for_workspace(ws) as store:
            rid = store.rollouts.active("chat")[0].id
            deadline = time.monotonic() + 30
            while store.rollouts.get(rid).step_started_at is None:  # the driver took step 1: green at 50%
                assert time.monotonic() < deadline, store.rollouts.get(rid)
                time.sleep(0.05)
            a.send_signal(signal.SIGKILL)  # mid-step: no lease given back, nothing cleaned up
            a.wait(10)
            mid = store.rollouts.get(rid)
            assert mid.status == "running" and mid.step_index == 0, mid
            b = start_server(ws, second, *analysis)
            url[0] = f"http://127.0.0.1:{second}"
            deadline = time.monotonic() + 90
            while store.rollouts.get(rid).status == "running":
                assert time.monotonic() < deadline, store.rollouts.get(rid)
                time.sleep(0.1)
            done = store.rollouts.get(rid)
            steps = [(e.actor, e.details) for e in store.audit.list(100, subject="endpoint:chat")
                     if e.action == "rollout.step"]
            traffic_now = store.endpoints.get("chat").traffic
    finally:
        stop.set()
        sender.join(30)
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(30)
    assert done.status == "succeeded", (done.status, done.message, done.analyses[-1:])
    assert traffic_now == {"blue": 0, "green": 100}
    # the first server set step 1, the second (once the dead one's lease ran out) step 2 on the same rollout
    actors = {actor for actor, _ in steps}
    assert any(f":{first}" in x for x in actors) and any(f":{second}" in x for x in actors), steps
    assert {code for code, _ in served} == {200}
    assert {d for _, d in served} == {"blue", "green"}
