"""`lmops serve --endpoint` as a user runs it: the CLI in a process of its own, changed from the CLI,
driving a blue-green rollout whose smoke suite it runs against itself under a key of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
from typer.testing import CliRunner

from lmops.cli import app
from lmops.store import Store
from lmops.workspace import init_workspace

from .conftest import free_port, save_model, table_model

FAST = ["serve.endpoint_poll_s=0.2", "rollout.tick_interval_s=0.2", "rollout.lease_s=2"]


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
    proc = subprocess.Popen([sys.executable, "-m", "lmops", "serve", "--endpoint", "chat", "-w", str(ws.root),
                             "--port", str(port), *sets], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "LMOPS_USER": "server"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                ready = httpx.get(f"{url}/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.1)
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
