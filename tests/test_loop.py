"""The loop (lmops/loop.py) on a real workspace: a champion made by the pipeline, a real metadata store and
MLflow registry, request-log rows, real monitor runs and their alerts.

The scenarios of issue 13 are at the end (slow): (a) in-distribution traffic does nothing, shifted traffic
through a live server alerts, retrains from the champion on the new prompts, canaries and promotes;
(b) a challenger broken on purpose is stopped by the gates and the champion keeps serving; (c) the loop's
process killed mid-training continues from its step and runs nothing twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta

import httpx
import pytest

from lmops import loop, registry
from lmops.config import override
from lmops.data.demo import demo_documents
from lmops.deploy.models import resolve_deployment
from lmops.errors import LmopsError
from lmops.monitor import alerts as monitor_alerts
from lmops.monitor.run import run as monitor_run
from lmops.pipeline import run_pipeline
from lmops.store import Store, utcnow

from conftest import TINY
from monitor.conftest import heldout_lines, latin_lines

LOOP = [
    *TINY, "model.block_size=64", "train.max_steps=40", "train.eval_interval=40", "train.checkpoint_interval=10", "evaluate.max_new_tokens=8",
    "monitor.sample=64", "monitor.min_requests=20", "monitor.reference_size=400", "monitor.false_alarm_rate=0.001",
    "monitor.calibration_rounds=100", "monitor.permutations=200", "monitor.repeat_s=0",
    "data.use_production_prompts=true", "data.mix=0.5", "loop.on_alert=retrain", "loop.endpoint=chat", "loop.cooldown_s=0",
    "loop.max_retrains_per_day=10", "loop.steps=[50,100]",
    "rollout.window_s=1.5", "rollout.tick_interval_s=0.2", "rollout.lease_s=2", "rollout.min_requests=8",
    "serve.endpoint_poll_s=0.2", "auth.rate_limit_per_s=100000", "auth.burst=100000",
]


MAX_LINE = 56  # characters: a prompt of the char tokenizer's tokens, with 4 to generate, fits the context of 64


def short_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if len(line) <= MAX_LINE]


def quiet(msg: str) -> None:
    pass


@pytest.fixture
def champion(workspace):
    """(ws, cfg, store): champion v1 trained by the pipeline on 40 demo documents, served as chat/blue."""
    (workspace.root / "corpus" / "docs.txt").unlink()
    for i, text in enumerate(list(demo_documents().values())[:40]):  # lines a request of the served context takes
        short = "\n".join(line for line in text.splitlines() if len(line) <= MAX_LINE)
        (workspace.root / "corpus" / f"doc{i:02d}.txt").write_text(short, encoding="utf-8")
    cfg = override(workspace.config(), LOOP)
    out = run_pipeline(workspace, cfg, log=quiet)
    assert out.outputs["promote"]["champion"] == "1"
    store = Store.for_workspace(workspace, cfg)
    store.endpoints.create("chat", "tests")
    store.endpoints.deploy(resolve_deployment(workspace, cfg, "chat", "blue", "lmops-model@1"), "tests", traffic=100)
    yield workspace, cfg, store
    store.close()


def log_requests(store, prompts: list[str], start, spacing_s: float = 0.05) -> None:
    """Rows as a server writes them, for chat/blue (model version 1)."""
    store.requests.log([{"ts": start + timedelta(seconds=i * spacing_s), "request_id": uuid.uuid4().hex,
                         "route": "/v1/completions", "endpoint": "chat", "deployment": "blue", "model": "chat",
                         "model_version": "1", "status_code": 200, "prompt": p, "completion": " and so",
                         "prompt_tokens": len(p), "completion_tokens": 4, "latency_s": 0.01, "ttft_s": 0.005,
                         "finish_reason": "length"} for i, p in enumerate(prompts)])


def monitor(ws, cfg, store, since, until) -> list:
    report = monitor_run(ws, cfg, store, endpoint="chat", window=until - since, until=until)
    return monitor_alerts.record(store, cfg, report, "monitor")


def shifted_alerts(ws, cfg, store, n: int = 160) -> list:
    start = utcnow() - timedelta(seconds=n * 0.05 + 1)
    log_requests(store, short_lines(latin_lines(3 * n))[:n], start)
    got = monitor(ws, cfg, store, start, utcnow())
    assert {a.signal for a in got} & set(cfg.loop.signals), [(a.signal, a.message) for a in got]
    return got


def actions(store, run_id: int) -> list[str]:
    return [e.action for e in store.audit.list(2000, subject=f"loop:{run_id}")[::-1]]


# ----------------------------------------------------------------------------- deciding


def test_notify_records_the_decision_and_none_ignores_alerts(champion):
    ws, cfg, store = champion
    shifted_alerts(ws, cfg, store)
    assert loop.decide(ws, override(cfg, ["loop.on_alert=none"]), store, "tests", quiet) == []
    [run] = loop.decide(ws, override(cfg, ["loop.on_alert=notify"]), store, "tests", quiet)
    assert (run.status, run.outcome) == ("skipped", "notified") and "lmops loop retrain" in run.reason
    assert loop.decide(ws, override(cfg, ["loop.on_alert=notify"]), store, "tests", quiet) == [], \
        "an alert is decided on once"
    assert actions(store, run.id) == ["loop.skipped"]


def test_cooldown_daily_cap_and_one_retrain_at_a_time(champion):
    ws, cfg, store = champion
    shifted_alerts(ws, cfg, store)
    [first] = loop.decide(ws, cfg, store, "tests", quiet)
    assert (first.status, first.step) == ("running", "triggered") and first.details["base"] == "lmops-model@1"
    assert first.window_start < first.window_end and first.alert_id is not None
    time.sleep(1.1)  # the next monitor run's window starts after the last one's rows
    shifted_alerts(ws, cfg, store, 120)
    [busy] = loop.decide(ws, cfg, store, "tests", quiet)
    assert (busy.status, busy.outcome) == ("skipped", "busy") and f"loop run {first.id}" in busy.reason

    store.loop.update(first.id, status="stopped", outcome="gates_failed")
    time.sleep(1.1)
    shifted_alerts(ws, cfg, store, 120)
    [cooling] = loop.decide(ws, override(cfg, ["loop.cooldown_s=3600"]), store, "tests", quiet)
    assert cooling.outcome == "cooldown" and "loop.cooldown_s" in cooling.reason
    time.sleep(1.1)
    shifted_alerts(ws, cfg, store, 120)
    [capped] = loop.decide(ws, override(cfg, ["loop.max_retrains_per_day=1"]), store, "tests", quiet)
    assert capped.outcome == "daily_cap"


def test_production_prompts_need_consent_and_a_failed_step_says_why(champion):
    ws, cfg, store = champion
    no_consent = override(cfg, ["data.use_production_prompts=false"])
    shifted_alerts(ws, cfg, store)
    [run] = loop.tick(ws, no_consent, store, "tests", quiet)
    assert (run.status, run.outcome) == ("failed", "failed")
    assert "triggered: data.use_production_prompts is false" in run.reason
    assert actions(store, run.id) == ["loop.triggered", "loop.failed"]
    with pytest.raises(LmopsError, match="loop.endpoint is not set and the store has 0 endpoints"):
        loop.endpoint_of(override(cfg, ["loop.endpoint=null"]), Store.open("sqlite://"))


def test_approval_before_the_canary_waits_for_a_person(champion, cli):
    ws, cfg, store = champion
    gated = override(cfg, ["loop.approve_before_canary=true"])
    shifted_alerts(ws, cfg, store)
    [run] = loop.tick(ws, gated, store, "tests", quiet)
    assert (run.step, run.status) == ("evaluated", "waiting") and f"lmops loop approve {run.id}" in run.reason
    assert "v2" not in store.endpoints.get("chat").deployments, "no live traffic before the approval"
    out = cli("loop", "status", str(run.id))
    assert "waiting for approval" in out and "challenger version (lmops lineage): 2" in out
    assert "bits per byte challenger" in out
    cli("loop", "approve", str(run.id))
    [after] = loop.tick(ws, gated, store, "tests", quiet, drive=False)
    assert (after.step, after.status) == ("canary", "waiting") and after.details["canary_approved_by"] == "carol"
    assert store.endpoints.get("chat").traffic.get("v2") == 0 and store.rollouts.get(after.details["rollout"]).active
    assert "loop.approved" in actions(store, run.id)


def test_a_retrain_by_hand_and_one_at_a_time(champion, cli):
    ws, cfg, store = champion
    assert "no loop runs yet (loop.on_alert is notify)" in cli("loop", "status")
    out = cli("loop", "retrain", "--endpoint", "chat", "--since", "2h", "--no-wait")
    assert "retraining lmops-model v1 on chat's prompts" in out and "by hand" in out
    [run] = store.loop.list()
    assert (run.step, run.status, run.alert_id) == ("triggered", "running", None)
    assert (run.window_end - run.window_start) == timedelta(hours=2)
    refused = cli("loop", "retrain", "--endpoint", "chat", code=1)
    assert f"loop run {run.id} is retraining chat already" in refused
    assert "by hand" in cli("loop", "status")


def test_the_server_follows_its_monitor_runs_with_a_pass_of_the_loop(champion):
    import asyncio

    from lmops.serve.monitoring import Monitoring

    ws, cfg, store = champion
    shifted_alerts(ws, cfg, store)
    assert "loop.on_alert=\"notify\"" in " ".join(Monitoring(override(cfg, ["loop.on_alert=notify"]), store, ws, "chat",
                                                            None).loop_command())

    async def after(on_alert: str) -> Monitoring:
        m = Monitoring(override(cfg, [f"loop.on_alert={on_alert}"]), store, ws, "chat", None)
        m._after_monitor()
        if m._loop is not None:
            assert await m._loop == 0
        return m

    assert asyncio.run(after("none")).loop_passes == 0 and store.loop.list() == []
    assert asyncio.run(after("notify")).loop_passes == 1  # a child process `lmops loop run`, with this config
    [run] = store.loop.list()
    assert (run.status, run.outcome) == ("skipped", "notified")


# ----------------------------------------------------------------------------- the scenarios


@pytest.mark.slow
def test_shifted_traffic_is_learned_canaried_and_promoted_while_in_distribution_traffic_does_nothing(champion):
    from serve.conftest import LiveServer

    from lmops.serve.app import create_app

    ws, cfg, store = champion
    _, secret = store.keys.create("traffic", "inference", "tests")
    server = LiveServer(create_app(cfg, None, store, endpoint="chat", ws=ws))
    english = heldout_lines(ws, registry.lineage(ws, cfg, "@champion")["dataset"]["id"])
    latin = short_lines(latin_lines(1200, seed=1))
    assert len(english) >= 60 and len(latin) >= 400
    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {secret}"}, timeout=30)

    def send(prompts):
        for p in prompts:
            r = http.post("/v1/completions", json={"model": "chat", "prompt": p, "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text

    try:
        t0 = utcnow()
        send(english[:60])
        assert monitor(ws, cfg, store, t0, utcnow()) == []
        assert loop.tick(ws, cfg, store, "tests", quiet) == [], "in-distribution traffic: nothing happens"

        t1 = utcnow()
        send(latin[:160])
        raised = monitor(ws, cfg, store, t1, utcnow())
        assert {a.signal for a in raised} & set(cfg.loop.signals)
        [run] = loop.tick(ws, cfg, store, "tests", quiet)  # ingest, train, evaluate, deploy, start the canary
        assert (run.step, run.status) == ("canary", "waiting"), run.reason
        ev = run.details["evaluation"]
        assert ev["new"]["challenger"]["val_bpb"] < ev["new"]["champion"]["val_bpb"] * 0.98
        assert ev["old"]["challenger"]["val_bpb"] <= ev["old"]["champion"]["val_bpb"] * 1.01

        stop = threading.Event()

        def traffic():
            i = 0
            while not stop.is_set():
                send([latin[200 + i % 200], english[i % len(english)]])
                i += 1

        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        deadline = time.monotonic() + 90
        while run.active:
            assert time.monotonic() < deadline and sender.is_alive(), run.reason
            time.sleep(0.2)
            run = loop.advance(ws, cfg, store, run.id, "tests", quiet)
        stop.set()
        sender.join(30)
    finally:
        http.close()
        server.stop()
    assert (run.status, run.outcome) == ("succeeded", "promoted"), run.reason
    assert store.endpoints.get("chat").traffic == {"blue": 0, "v2": 100}
    assert str(registry.resolve(ws, cfg, "lmops-model@champion").version) == "2"
    assert actions(store, run.id) == ["loop.triggered", "loop.ingested", "loop.trained", "loop.evaluated",
                                      "loop.canary", "loop.promoted"]
    lin = registry.lineage(ws, cfg, "@champion")
    assert lin["loop"]["run"] == run.id and lin["loop"]["alert"]["id"] == run.alert_id
    assert lin["loop"]["rollout"]["status"] == "succeeded" and lin["loop"]["endpoint"] == "chat"
    assert lin["base"]["model"] == "lmops-model@1" and lin["dataset"]["id"] == run.details["dataset"]
    assert any("from the request log: endpoint chat" in line for line in lin["dataset"]["production"])


@pytest.mark.slow
def test_a_broken_challenger_is_stopped_by_the_gates_and_the_champion_keeps_serving(champion):
    ws, cfg, store = champion
    broken = override(cfg, ["train.lr=3.0", "train.warmup_steps=0", "train.grad_clip=0", "train.max_steps=3",
                            "train.eval_interval=3"])  # a learning rate that wrecks the weights in 3 steps
    shifted_alerts(ws, cfg, store)
    [run] = loop.tick(ws, broken, store, "tests", quiet)
    assert (run.status, run.outcome) == ("stopped", "gates_failed"), run.reason
    assert "lmops-model@1 keeps serving" in run.reason and "new traffic" in run.reason
    assert store.endpoints.get("chat").traffic == {"blue": 100} and list(store.endpoints.get("chat").deployments) == ["blue"]
    assert str(registry.resolve(ws, cfg, "lmops-model@champion").version) == "1"
    assert actions(store, run.id)[-1] == "loop.gates_failed"
    [entry] = store.audit.list(10, subject=f"loop:{run.id}", action="loop.gates_failed")
    assert "new traffic" in entry.reason


@pytest.mark.slow
def test_a_loop_killed_mid_training_continues_from_its_step_and_runs_nothing_twice(champion, tmp_path):
    ws, cfg, store = champion
    slow = override(cfg, ["train.max_steps=200", "train.eval_interval=200", "train.checkpoint_interval=5"])
    shifted_alerts(ws, cfg, store)
    sets = [f"--set={s}" for s in LOOP] + ["--set=train.max_steps=200", "--set=train.eval_interval=200",
                                           "--set=train.checkpoint_interval=5"]
    env = {**os.environ, "LMOPS_WORKSPACE": str(ws.root), "LMOPS_USER": "loop"}
    before = set(ws.runs_dir.glob("pipeline-*"))  # the champion's run
    proc = subprocess.Popen([sys.executable, "-m", "lmops", "loop", "run", "--no-drive", *sets], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while True:  # until the challenger's training has written a checkpoint
            mine = [p / "ckpt.safetensors" for p in ws.runs_dir.glob("pipeline-*") if p not in before]
            if any(p.is_file() and _step_of(p) >= 5 for p in mine):
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "training never checkpointed"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    [challenger_dir] = [p for p in ws.runs_dir.glob("pipeline-*") if p not in before]
    [run] = store.loop.list(5)
    assert run.step == "ingested" and run.status == "running", "killed in the pipeline step"

    [after] = loop.tick(ws, slow, store, "tests", quiet, drive=False)
    assert (after.id, after.step, after.status) == (run.id, "canary", "waiting"), after.reason
    assert actions(store, run.id) == ["loop.triggered", "loop.ingested", "loop.trained", "loop.evaluated", "loop.canary"]
    assert [v["version"] for v in registry.list_versions(ws, cfg)] == ["2", "1"], "one challenger registered"
    assert len(store.rollouts.list("chat")) == 1
    with_prompts = [d for d in store.datasets.list() if d.parent is not None and d.id == run.details["dataset"]]
    assert len(with_prompts) == 1
    steps = [json.loads(line)["step"] for line in (challenger_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(1) == 1 and steps[-1] == 200, "training resumed from its checkpoint, not started again"


def _step_of(path) -> int:
    from lmops.checkpoint import Checkpoint

    try:
        return Checkpoint(path).meta.get("step", 0)
    except LmopsError:
        return 0
