"""The deployment commands, in process (typer's CliRunner: a subprocess costs ~3 s a command), and
one subprocess to show the commands are on the installed `lmops`."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest

from lmops.deploy.rollout import Driver, SmokeResult
from lmops.store import Store, utcnow

from .conftest import traffic


def checkpoint(root, name, data=b"weights"):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "ckpt.safetensors").write_bytes(data)
    return folder


@pytest.fixture
def chat(cli, workspace, tmp_path):
    """Endpoint chat: blue (a local checkpoint) at 100%, green (another) at 0%."""
    cli("endpoint", "create", "chat", "--description", "the chat bot", "--reason", "new product")
    cli("deploy", "blue", "--endpoint", "chat", "--model", str(checkpoint(tmp_path, "v1")))
    cli("deploy", "green", "--endpoint", "chat", "--model", str(checkpoint(tmp_path, "v2", b"other")))
    return workspace


def store_of(ws):
    return Store.for_workspace(ws)


def test_endpoint_deploy_traffic_and_audit(cli, chat, tmp_path):
    with store_of(chat) as store:
        ep = store.endpoints.get("chat")
        assert ep.traffic == {"blue": 100, "green": 0}
        green = ep.deployments["green"]
        assert green.model_uri == str((tmp_path / "v2").resolve()) and green.model_name == "v2"
        assert len(green.model_version) == 12 and green.model_version != ep.deployments["blue"].model_version
    out = cli("traffic", "set", "chat", "blue=90", "green=10", "--reason", "canary by hand")
    assert "traffic blue=90 green=10" in out
    shown = cli("endpoint", "show", "chat")
    assert "blue (stable)" in shown and "90%" in shown and "the chat bot" in shown
    assert "chat" in cli("endpoint", "list")
    cli("traffic", "set", "chat", "blue=100", "--mirror", "green=20")
    with store_of(chat) as store:
        ep = store.endpoints.get("chat")
        assert ep.mirror == {"green": 20}
        entries = store.audit.list(10, subject="endpoint:chat")
    assert entries[0].actor == "carol" and entries[0].action == "endpoint.traffic"
    assert any(e.reason == "canary by hand" for e in entries)
    assert [e.action for e in entries][-1] == "endpoint.created" and entries[-1].reason == "new product"


@pytest.mark.parametrize("args, message", [
    (["traffic", "set", "chat", "blue=90", "green=20"], "sums to 110"),
    (["traffic", "set", "chat", "blue=90", "green=10", "--mirror", "green=20"], "green takes live traffic"),
    (["traffic", "set", "chat", "blue=100", "--mirror", "green=60"], "at most 50%"),
    (["traffic", "set", "chat", "blue"], "write DEPLOYMENT=PERCENT"),
    (["undeploy", "blue", "--endpoint", "chat"], "blue takes all of chat's traffic"),
    (["deploy", "red", "--endpoint", "chat", "--model", "nope@champion"], "no registered model 'nope'"),
    (["deploy", "red", "--endpoint", "chat", "--model", "runs/missing"], "no such file or folder"),
    (["deploy", "red", "--endpoint", "nowhere", "--model", "x"], "no endpoint 'nowhere'"),
    (["deploy", "Red", "--endpoint", "chat", "--model", "x"], "deployment name 'Red'"),
    (["endpoint", "create", "chat"], "exists already"),
    (["rollout", "start", "chat", "--to", "blue"], "blue takes 100%"),
    (["rollout", "start", "chat", "--to", "green", "--steps", "50,10"], "--steps"),
    (["rollout", "start", "chat", "--to", "green", "--window", "soon"], "--window 'soon'"),
    (["rollout", "status", "chat"], "has no rollout"),
    (["rollout", "pause", "chat"], "has no rollout"),
    (["endpoint", "compare", "chat", "--since", "forever"], "--since 'forever'"),
])
def test_refusals_are_one_clear_line(cli, chat, args, message):
    out = cli(*args, code=1)
    assert message in out and "Traceback" not in out


def test_undeploy_and_delete(cli, chat):
    cli("undeploy", "green", "--endpoint", "chat", "--reason", "not needed")
    cli("endpoint", "delete", "chat")
    assert "no endpoints yet" in cli("endpoint", "list")


def test_rollout_commands_and_wait_exit_codes(cli, chat):
    out = cli("rollout", "start", "chat", "--to", "green", "--steps", "20,100", "--window", "1m", "--reason", "v2")
    assert "rollout 1: blue -> green on chat (canary: steps 20,100, 60 s each)" in out
    cli("rollout", "start", "chat", "--to", "green", code=1)  # one at a time
    cli("undeploy", "green", "--endpoint", "chat", code=1)
    cli("endpoint", "delete", "chat", code=1)
    with store_of(chat) as store:
        Driver(store, chat.config(), name="d").run_once()
        assert store.endpoints.get("chat").traffic == {"blue": 80, "green": 20}
    assert "step 1/2: green at 20%" in cli("rollout", "status", "chat")
    assert "paused" in cli("rollout", "pause", "chat", "--reason", "lunch")
    cli("rollout", "resume", "chat")
    assert "traffic blue=100" in cli("rollout", "abort", "chat", "--reason", "enough")
    assert "rollout 1 aborted" in cli("rollout", "status", "chat", "--wait", code=1)
    cli("rollout", "undo", "chat")
    with store_of(chat) as store:
        assert [e.action for e in store.audit.list(3, subject="endpoint:chat")] == \
            ["rollout.undone", "rollout.aborted", "rollout.rolled_back"]  # the abort put the traffic back already


def test_a_blue_green_rollout_succeeds_and_wait_exits_0(cli, chat):
    cli("rollout", "start", "chat", "--to", "green", "--strategy", "blue-green")
    with store_of(chat) as store:
        [r] = Driver(store, chat.config(), smoke=lambda e, d: SmokeResult(True, "ok"), ws=chat,
                      name="d").run_once()
    assert r.status == "succeeded" and "no registry version to promote" in r.message  # local paths
    out = cli("rollout", "start", "chat", "--to", "blue", "--strategy", "blue-green", "--wait", "--timeout", "1s",
              code=2)  # nobody drives it here
    assert "still running" in out
    cli("rollout", "abort", "chat")
    cli("rollout", "undo", "chat")  # the abort of the second: undo sets the traffic before it again
    with store_of(chat) as store:
        assert store.endpoints.get("chat").traffic == {"blue": 0, "green": 100}


def test_status_shows_the_failing_metric_of_an_aborted_canary(cli, chat):
    cli("rollout", "start", "chat", "--to", "green", "--window", "1s")
    with store_of(chat) as store:
        driver = Driver(store, chat.config(), name="d")
        start = utcnow()
        driver.run_once(start)
        traffic(store, "blue", start, start + timedelta(seconds=1), 30)
        traffic(store, "green", start, start + timedelta(seconds=1), 30, status=500)
        [r] = driver.run_once(start + timedelta(seconds=1))
        assert r.status == "aborted"
    out = cli("rollout", "status", "chat")
    assert "aborted" in out and "error_rate" in out and "failed" in out


def test_compare_summarises_scores_per_deployment(cli, chat):
    with store_of(chat) as store:
        now = utcnow()
        traffic(store, "blue", now - timedelta(minutes=5), now, 20, prompt_nll=2.0)
        traffic(store, "green", now - timedelta(minutes=5), now, 20, prompt_nll=4.0)
        # answers with length, stop reason and time to first token stored (as the shadow scorer writes them)
        store.scores.add([{"ts": now - timedelta(minutes=1), "request_id": f"g{i}", "endpoint": "chat",
                           "deployment": "green", "role": "shadow", "completion_tokens": 12,
                           "finish_reason": "stop" if i == 0 else "length", "ttft_s": 0.125, "latency_s": 0.5}
                          for i in range(4)])
    out = cli("endpoint", "compare", "chat", "--since", "1h")
    assert "blue" in out and "green" in out and "2.000 ± 0.000" in out and "4.000" in out
    for column in ("tokens", "stop reasons", "ttft s", "latency s"):
        assert column in out, out
    # latency with its interval (blue: 20 answers of 0.2 s), green's length, stop shares and ttft
    assert "0.200 ± 0.000" in out and "12.0 ± 0.0" in out and "length 75%" in out and "stop 25%" in out, out
    assert "0.125 ± 0.000" in out, out
    assert "no scored answers" in cli("endpoint", "compare", "chat", "--since", "1s")


def test_commands_are_on_the_installed_lmops(chat):
    out = subprocess.run([sys.executable, "-m", "lmops", "endpoint", "list", "-w", str(chat.root)],
                         capture_output=True, text=True, check=True)
    assert "chat" in out.stdout + out.stderr


def test_compare_shows_feedback_per_deployment(cli, chat):
    with store_of(chat) as store:
        now = utcnow()
        traffic(store, "blue", now - timedelta(minutes=5), now, 20, prompt_nll=2.0)
        traffic(store, "green", now - timedelta(minutes=5), now, 20, prompt_nll=4.0)
        for deployment, score in (("blue", 1.0), ("blue", 0.0), ("green", 1.0)):
            store.feedback.add({"request_id": "r", "endpoint": "chat", "deployment": deployment, "score": score})
    out = cli("endpoint", "compare", "chat", "--since", "1h")
    assert "chat feedback" in out and "10.0%" in out and "5.0%" in out and "0.500 ± " in out and "1.000" in out
