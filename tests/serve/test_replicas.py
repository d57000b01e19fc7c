"""Several `lmops serve --endpoint` replicas on one PostgreSQL database, as processes of their own configured
only by the environment (LMOPS__STORE__DATABASE_URL, as a container gets it): they share the keys (one
revoked is refused by both), the endpoint (a traffic change from the CLI reaches both) and the request log
(every answer of both is in the one table)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
from typer.testing import CliRunner

from lmops.cli import app
from lmops.store import Store
from lmops.workspace import init_workspace

from .conftest import free_port, save_model, table_model, wait_ready

FAST = ["serve.endpoint_poll_s=0.2", "auth.key_cache_ttl_s=0.2", "auth.rate_limit_per_s=10000", "auth.burst=10000"]


def one_database(tmp_path, tok, url):
    """A workspace whose store is `url` only through the environment, endpoint chat with blue (all traffic)
    and green (0%); the environment and a CLI runner on it."""
    ws = init_workspace(tmp_path / "ws")
    for name, seed in (("blue", 0), ("green", 1)):
        save_model(tmp_path / name, table_model(tok, seed=seed), tok)
    env = {**os.environ, "LMOPS__STORE__DATABASE_URL": url, "LMOPS_USER": "tests"}
    cli = CliRunner()

    def run(*args):
        result = cli.invoke(app, [*args, "-w", str(ws.root)], env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result

    run("endpoint", "create", "chat")
    run("deploy", "blue", "--endpoint", "chat", "--model", str(tmp_path / "blue"))
    run("deploy", "green", "--endpoint", "chat", "--model", str(tmp_path / "green"))
    return ws, env, run


def start_replicas(ws, env, *extra: str) -> tuple[list[subprocess.Popen], list[str]]:
    """Two `lmops serve --endpoint chat` processes on their own ports (each drives rollouts, as serve does)."""
    ports = [free_port(), free_port()]
    sets = [a for s in (*FAST, *extra) for a in ("--set", s)]
    procs = [subprocess.Popen([sys.executable, "-m", "lmops", "serve", "--endpoint", "chat", "-w", str(ws.root),
                               "--port", str(p), *sets], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=env) for p in ports]
    return procs, [f"http://127.0.0.1:{p}" for p in ports]


@pytest.mark.parametrize("url", ["postgresql"], indirect=True)
def test_replicas_on_one_database_share_keys_traffic_and_the_request_log(tmp_path, tok, url):
    ws, env, run = one_database(tmp_path, tok, url)
    with Store.open(url) as store:
        key, secret = store.keys.create("replicas", "inference", "tests")
    assert not (ws.state / "lmops.db").exists()  # everything went to PostgreSQL
    procs, urls = start_replicas(ws, env)
    bearer = {"Authorization": f"Bearer {secret}"}
    body = {"model": "chat", "prompt": "the quick", "max_tokens": 2}

    def served(n=6):
        return [httpx.post(f"{urls[i % 2]}/v1/completions", json=body, headers=bearer, timeout=30) for i in range(n)]

    try:
        for proc, u in zip(procs, urls):
            wait_ready(proc, u)
        first = served()
        assert {r.status_code for r in first} == {200} and {r.headers["x-lmops-deployment"] for r in first} == {"blue"}
        run("traffic", "set", "chat", "green=100", "--reason", "replicas follow")
        time.sleep(1.0)  # five polls
        second = served()
        assert {r.headers["x-lmops-deployment"] for r in second} == {"green"}
        with Store.open(url) as store:
            store.keys.revoke(key.id, "tests")
        time.sleep(1.0)  # the key cache's ttl, five times
        third = served(4)
        assert {r.status_code for r in third} == {401}
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
    # both replicas' answers (and refusals) in the one request log, none lost: 6 + 6 + 4
    with Store.open(url) as store:
        rows = store.requests.list(100)
    assert len(rows) == 16, [(r.status_code, r.deployment) for r in rows]
    assert sorted(r.status_code for r in rows) == [200] * 12 + [401] * 4
    assert {r.deployment for r in rows if r.status_code == 200} == {"blue", "green"}


@pytest.mark.parametrize("url", ["postgresql"], indirect=True)
def test_a_canary_with_two_replicas_driving_is_stepped_once_per_step_by_one_driver(tmp_path, tok, url):
    """Both processes run a rollout driver for chat (as `lmops serve --endpoint` does) while a canary runs:
    one of them holds the lease (store/rollouts.py acquire), so every step is taken once, by that one, and
    the other never advances it; the rollout completes."""
    ws, env, run = one_database(tmp_path, tok, url)
    with Store.open(url) as store:
        _, secret = store.keys.create("replicas", "inference", "tests")
    procs, urls = start_replicas(ws, env, "rollout.window_s=2", "rollout.min_requests=8")
    stop, served = threading.Event(), []

    def traffic(i):
        body = {"model": "chat", "prompt": "the quick", "max_tokens": 2}
        with httpx.Client(headers={"Authorization": f"Bearer {secret}"}, timeout=30) as http:
            while not stop.is_set():
                r = http.post(f"{urls[i % 2]}/v1/completions", json=body)
                served.append((r.status_code, r.headers.get("x-lmops-deployment")))
                i += 1

    senders = [threading.Thread(target=traffic, args=(i,)) for i in range(2)]
    try:
        for proc, u in zip(procs, urls):
            wait_ready(proc, u)
        for t in senders:
            t.start()
        run("rollout", "start", "chat", "--to", "green", "--strategy", "canary", "--steps", "25,50,100",
            "--window", "2s")
        with Store.open(url) as store:
            rid = store.rollouts.latest("chat").id
            deadline = time.monotonic() + 120
            while store.rollouts.get(rid).status == "running":
                assert time.monotonic() < deadline, store.rollouts.get(rid)
                time.sleep(0.1)
            done = store.rollouts.get(rid)

            def entries_now():
                return [e for e in store.audit.list(500, subject="endpoint:chat") if e.action.startswith("rollout.")]

            # the outcome is audited just after the rollout's row is written: wait for it, then count
            while not any(e.action not in ("rollout.started", "rollout.step") for e in entries_now()):
                assert time.monotonic() < deadline, entries_now()
                time.sleep(0.1)
            entries = entries_now()
    finally:
        stop.set()
        for t in senders:
            t.join(30)
        for proc in procs:
            proc.terminate()
            proc.wait(30)
    assert done.status == "succeeded", (done.status, done.message, done.analyses[-1:])
    entries.sort(key=lambda e: e.seq)
    steps = [e for e in entries if e.action == "rollout.step"]
    # each step recorded once, in order: no share set twice (by a second driver, or by one driver twice)
    assert [e.details["traffic"]["green"] for e in steps] == [25, 50, 100], [(e.actor, e.details) for e in steps]
    assert [e.action for e in entries].count("rollout.succeeded") == 1
    # by a single driver, one of the two servers' (serve@host:PORT), holding the lease the whole time
    ports = {u.rsplit(":", 1)[1] for u in urls}
    drivers = {e.actor for e in steps} | {e.actor for e in entries if e.action == "rollout.succeeded"}
    assert len(drivers) == 1 and drivers.pop().rsplit(":", 1)[1] in ports, [(e.actor, e.action) for e in entries]
    # the row's step history: one passing analysis per step, steps 0, 1, 2 in order
    passed = [a["step"] for a in done.analyses if a.get("outcome") == "successful"]
    assert passed == [0, 1, 2], [(a.get("step"), a.get("outcome")) for a in done.analyses]
    assert {code for code, _ in served} == {200} and {d for _, d in served} == {"blue", "green"}
