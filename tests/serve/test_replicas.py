"""Several `lmops serve --endpoint` replicas on one PostgreSQL database, as processes of their own configured
only by the environment (LMOPS__STORE__DATABASE_URL, as a container gets it): they share the keys (one
revoked is refused by both), the endpoint (a traffic change from the CLI reaches both) and the request log
(every answer of both is in the one table)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
from typer.testing import CliRunner

from lmops.cli import app
from lmops.store import Store
from lmops.workspace import init_workspace

from .conftest import free_port, save_model, table_model, wait_ready

FAST = ["serve.endpoint_poll_s=0.2", "auth.key_cache_ttl_s=0.2", "auth.rate_limit_per_s=10000", "auth.burst=10000"]


@pytest.mark.parametrize("url", ["postgresql"], indirect=True)
def test_replicas_on_one_database_share_keys_traffic_and_the_request_log(tmp_path, tok, url):
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
    with Store.open(url) as store:
        key, secret = store.keys.create("replicas", "inference", "tests")
    assert not (ws.state / "lmops.db").exists()  # everything went to PostgreSQL
    ports = [free_port(), free_port()]
    sets = [a for s in FAST for a in ("--set", s)]
    procs = [subprocess.Popen([sys.executable, "-m", "lmops", "serve", "--endpoint", "chat", "-w", str(ws.root),
                               "--port", str(p), *sets], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=env) for p in ports]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
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
