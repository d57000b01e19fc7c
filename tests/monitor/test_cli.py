"""`lmops monitor run|show|alerts` on a request log, in this process."""

from __future__ import annotations

from datetime import timedelta

import pytest
from typer.testing import CliRunner

from lmops.cli import app
from lmops.deploy.models import resolve_deployment
from lmops.store import Store, utcnow

from .conftest import heldout_lines, latin_lines


@pytest.fixture
def monitor_cli(corpus_model, tmp_path, monkeypatch):
    ws, cfg, dataset, folder = corpus_model
    url = f"sqlite:///{tmp_path / 'lmops.db'}"
    for key, value in {"LMOPS__STORE__DATABASE_URL": url, "LMOPS__MONITOR__REFERENCE": dataset,
                       "LMOPS__MONITOR__SAMPLE": "64", "LMOPS__MONITOR__MIN_REQUESTS": "20",
                       "LMOPS__TOKENIZER__KIND": "char", "COLUMNS": "200"}.items():
        monkeypatch.setenv(key, value)
    store = Store.open(url)
    store.endpoints.create("chat", "tests")
    dep = resolve_deployment(ws, cfg, "chat", "blue", str(folder))
    store.endpoints.deploy(dep, "tests", traffic=100)
    runner = CliRunner()

    def cli(*args, code=0):
        result = runner.invoke(app, [*args, "-w", str(ws.root)])
        assert result.exit_code == code, result.output
        return result.output

    def log(prompts, minutes_ago):
        now = utcnow()
        store.requests.log([dict(ts=now - timedelta(minutes=minutes_ago) + timedelta(seconds=i), request_id=f"{minutes_ago}-{i}",
                                 route="/v1/completions", endpoint="chat", deployment="blue",
                                 model_version=dep.model_version, status_code=200, prompt=p, completion=p[:30],
                                 completion_tokens=10, ttft_s=0.05, latency_s=0.2, finish_reason="stop")
                            for i, p in enumerate(prompts)])
    yield cli, log, heldout_lines(ws, dataset)
    store.close()


def test_run_show_and_alerts(monitor_cli, tmp_path):
    cli, log, lines = monitor_cli
    log(lines[:100], 120)
    log(lines[100:200], 30)
    quiet = cli("monitor", "run", "--endpoint", "chat", "--fail-on-alert")
    assert "chat/blue: 100 requests" in quiet and "prompt_nll" in quiet and "0 alert(s)" in quiet
    assert "validation split" in quiet
    log(latin_lines(100), 10)
    shifted = cli("monitor", "run", "--endpoint", "chat", "--window", "20m", "--fail-on-alert", code=3)
    assert "ALERT" in shifted and "new alert(s) recorded" in shifted
    shown = cli("monitor", "show", "--signal", "prompt_nll")
    assert shown.count("chat/blue") == 2 and "ALERT" in shown
    alerts = cli("monitor", "alerts")
    assert "prompt_nll" in alerts and "above its threshold" in alerts and "no webhook" in alerts
    plotted = cli("monitor", "show", "--plot", str(tmp_path / "drift.html"))
    page = (tmp_path / "drift.html").read_text()
    assert "wrote" in plotted and page.count("<svg") >= 8 and "prompt_nll" in page


def test_clear_errors(monitor_cli):
    cli, _, _ = monitor_cli
    assert "not both" in cli("monitor", "run", "--endpoint", "chat", "--model", "x", code=1)
    assert "unknown signal bogus" in cli("monitor", "show", "--signal", "bogus", code=1)
    assert "--window" in cli("monitor", "run", "--window", "soon", code=1)
    assert "no monitor results yet" in cli("monitor", "show")
    assert "no alerts" in cli("monitor", "alerts")


def test_the_default_reference_is_found_through_lineage(workspace, tiny_sets, cli):
    """A registered version trained by lmops: its dataset's validation split, with nothing set up."""
    sets = [a for item in tiny_sets for a in ("--set", item)]
    cli("train", *sets, "--no-progress")
    cli("evaluate", "--set", "evaluate.max_new_tokens=4")
    cli("register")
    cli("endpoint", "create", "chat")
    cli("deploy", "blue", "--endpoint", "chat", "--model", "lmops-model@1")
    from lmops.store import Store

    text = (workspace.root / "corpus" / "docs.txt").read_text()
    lines = [ln for ln in text.splitlines() if ln.strip()][-300:]
    with Store.for_workspace(workspace) as store:
        store.requests.log([dict(request_id=f"r{i}", route="/v1/completions", endpoint="chat", deployment="blue",
                                 model_version="1", status_code=200, prompt=p, completion=p[:20], completion_tokens=5)
                            for i, p in enumerate(lines)])
    out = cli("monitor", "run", "--set", "monitor.min_requests=20", "--set", "monitor.sample=32")
    assert "chat/blue: 300 requests" in out and "prompt_nll" in out
    dataset = cli("data", "list").split()  # the run's dataset version is the reference
    assert "validation split" in out and any(w[:12] in out for w in dataset if len(w) >= 12)
    watched = cli("monitor", "watch", "--endpoint", "chat", "--runs", "2", "--interval", "0.1s")
    assert "run 1:" in watched and "run 2:" in watched
