"""The generated CI/CD files (lmops/ship/ci.py): each passes its published schema (check-jsonschema's
built-in vendor.github-workflows / vendor.azure-pipelines), holds no secret and no setting of lmops.yaml,
wires every output it reads to a step that writes it, says the same shell in both systems; and the
GitHub workflow's shell steps, run in order in a fresh workspace, carry a model from the corpus to a
production canary (the slow test at the end)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from lmops.cli import app
from lmops.errors import LmopsError
from lmops.ship import ci

CLI = [sys.executable, "-m", "lmops"]


def generated(tmp_path: Path, *args: str, env: dict | None = None) -> Path:
    """`lmops ci generate` into tmp_path/out (a workspace made with `lmops init` first)."""
    ws = tmp_path / "ws"
    if not (ws / "lmops.yaml").exists():
        assert CliRunner().invoke(app, ["init", str(ws)]).exit_code == 0
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["ci", "generate", "-w", str(ws), "--out", str(out), *args], env=env)
    assert result.exit_code == 0, result.output
    return out


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def scripts_github(wf: dict) -> dict[str, list[str]]:
    return {jid: [s["run"] for s in job["steps"] if "run" in s] for jid, job in wf["jobs"].items()}


def azure_steps(job: dict) -> list[dict]:
    return job.get("steps") or job["strategy"]["runOnce"]["deploy"]["steps"]


def scripts_azure(pipeline: dict) -> dict[str, list[str]]:
    return {st["jobs"][0].get("job") or st["jobs"][0]["deployment"]: [s["script"] for s in azure_steps(st["jobs"][0])
                                                                       if "script" in s]
            for st in pipeline["stages"]}


# ----------------------------------------------------------------------------- the files

def test_generate_writes_both_files_says_so_and_refuses_to_overwrite(tmp_path):
    ws = tmp_path / "ws"
    cli = CliRunner()
    assert cli.invoke(app, ["init", str(ws)]).exit_code == 0
    first = cli.invoke(app, ["ci", "generate", "-w", str(ws)])
    assert first.exit_code == 0, first.output
    gh, az = ws / ".github/workflows/lmops.yml", ws / "azure-pipelines.yml"
    assert f"wrote {gh}" in first.output and f"wrote {az}" in first.output
    before = gh.read_text()
    gh.write_text("# mine\n")
    again = cli.invoke(app, ["ci", "generate", "-w", str(ws)])
    assert again.exit_code == 1
    assert "exist already; pass --force to overwrite them" in again.output and str(az) in again.output
    assert gh.read_text() == "# mine\n", "a refused generate writes nothing"
    assert cli.invoke(app, ["ci", "generate", "-w", str(ws), "--force"]).exit_code == 0
    assert gh.read_text() == before
    only = cli.invoke(app, ["ci", "generate", "-w", str(ws), "--system", "azure", "--out", str(tmp_path / "o")])
    assert only.exit_code == 0 and [p.name for p in (tmp_path / "o").rglob("*.yml")] == ["azure-pipelines.yml"]
    bad = cli.invoke(app, ["ci", "generate", "-w", str(ws), "--system", "gitlab", "--out", str(tmp_path / "o2")])
    assert bad.exit_code == 1 and "use github, azure or both" in bad.output


def test_init_ci_writes_the_workspace_and_its_pipeline_or_nothing(tmp_path):
    cli = CliRunner()
    result = cli.invoke(app, ["init", str(tmp_path / "a"), "--ci", "github"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a/lmops.yaml").is_file() and (tmp_path / "a/.github/workflows/lmops.yml").is_file()
    assert not (tmp_path / "a/azure-pipelines.yml").exists()
    assert cli.invoke(app, ["init", str(tmp_path / "b"), "--ci", "both"]).exit_code == 0
    assert (tmp_path / "b/azure-pipelines.yml").is_file()
    (tmp_path / "c").mkdir()
    (tmp_path / "c/azure-pipelines.yml").write_text("# theirs\n")
    refused = cli.invoke(app, ["init", str(tmp_path / "c"), "--ci", "azure"])
    assert refused.exit_code == 1 and "pass --force" in refused.output
    assert not (tmp_path / "c/lmops.yaml").exists(), "refused before the workspace is made"
    assert cli.invoke(app, ["init", str(tmp_path / "d"), "--ci", "jenkins"]).exit_code == 1
    assert not (tmp_path / "d").exists()


def check_jsonschema(schema: str, path: Path) -> subprocess.CompletedProcess:
    """check-jsonschema with its built-in schema, as its pre-commit hook runs it (the Azure hook adds the
    azure-pipelines data transform and non-unicode regexes: the published schema's patterns need them)."""
    exe = shutil.which("check-jsonschema") or pytest.skip("check-jsonschema not installed (pip install -e '.[dev]')")
    extra = ["--data-transform", "azure-pipelines", "--regex-variant", "nonunicode"] if "azure" in schema else []
    return subprocess.run([exe, "--builtin-schema", schema, *extra, str(path)], capture_output=True, text=True)


SCHEMAS = {"github": "vendor.github-workflows", "azure": "vendor.azure-pipelines"}


def test_each_file_passes_its_published_schema(tmp_path):
    out = generated(tmp_path)
    for system, schema in SCHEMAS.items():
        result = check_jsonschema(schema, out / ci.FILES[system])
        assert result.returncode == 0, f"{system}: {result.stdout}{result.stderr}"
        assert "ok -- validation done" in result.stdout


def _broken_github(wf: dict) -> None:
    del wf["jobs"]["build"]["runs-on"]  # a job runs somewhere


def _broken_github_step(wf: dict) -> None:
    wf["jobs"]["build"]["steps"][3]["run"] = ["lmops", "ci", "check"]  # a run is one string


def _broken_azure(pipeline: dict) -> None:
    pipeline["stages"][1]["jobs"][0]["steps"][3]["scriptt"] = pipeline["stages"][1]["jobs"][0]["steps"][3].pop("script")


def _broken_azure_deployment(pipeline: dict) -> None:
    pipeline["stages"][3]["jobs"][0]["strategy"] = {"once": {}}  # runOnce, rolling or canary


@pytest.mark.parametrize("system, breaks", [("github", _broken_github), ("github", _broken_github_step),
                                            ("azure", _broken_azure), ("azure", _broken_azure_deployment)])
def test_the_schema_check_fails_on_a_broken_file(tmp_path, system, breaks):
    path = generated(tmp_path) / ci.FILES[system]
    data = load(path)
    breaks(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    result = check_jsonschema(SCHEMAS[system], path)
    assert result.returncode == 1 and "Schema validation errors were encountered" in result.stdout, result.stdout


def test_the_stages_are_in_order_and_both_systems_run_the_same_shell(tmp_path):
    out = generated(tmp_path)
    gh, az = load(out / ci.FILES["github"]), load(out / ci.FILES["azure"])
    assert scripts_github(gh) == scripts_azure(az), "the shell of a stage drifted between the two systems"
    expected = {job.id: [r.text() for r in job.steps if isinstance(r, ci.Run)] for job in (*ci.JOBS, ci.MONITOR_JOB)}
    assert scripts_github(gh) == expected
    stages = [r.stage for r in ci.stage_runs() if r.stage != "install"]
    assert list(dict.fromkeys(stages)) == [s for s in ci.STAGES if s != "approval"]
    assert all(text.startswith("set -euo pipefail\n") for texts in expected.values() for text in texts)
    # the approval: the production job waits on its environment, in both files
    assert gh["jobs"]["production"]["environment"] == "production"
    assert next(s for s in az["stages"] if s["stage"] == "production")["jobs"][0]["environment"] == "production"
    assert gh["jobs"]["production"]["needs"] == ["build", "staging"]
    assert "lmops rollout start production --to \"$LMOPS_DEPLOYMENT\" --wait" in expected["production"][-1]


def test_no_secret_and_no_setting_of_the_workspace_is_in_the_files(tmp_path):
    secret_env = {"LMOPS__STORE__DATABASE_URL": "postgresql+psycopg://ci:hunter2@db.internal/lmops",
                  "PGPASSWORD": "hunter2", "LMOPS__ROLLOUT__WINDOW_S": "2", "LMOPS__TRAIN__MAX_STEPS": "7"}
    with_env = generated(tmp_path, env=secret_env)
    texts = {s: (with_env / ci.FILES[s]).read_text() for s in ci.SYSTEMS}
    clean = generated(tmp_path / "again")
    for system, text in texts.items():
        assert "hunter2" not in text and "db.internal" not in text
        assert text == (clean / ci.FILES[system]).read_text(), "the environment of `generate` leaked into the file"
        assert "window_s" not in text and "max_steps" not in text
    gh = load(with_env / ci.FILES["github"])
    for jid, job in gh["jobs"].items():
        for name, value in (job.get("env") or {}).items():
            assert name.startswith(("LMOPS_", "MLFLOW_")) or name == "PGPASSWORD", name
            assert re.fullmatch(r"\$\{\{ (secrets|needs)\.[\w.-]+ \}\}", value), f"{jid}.env.{name}: {value}"
    mapped = {s.env: f"${{{{ secrets.{s.secret} }}}}" for s in ci.SECRETS}
    assert {k: v for k, v in gh["jobs"]["build"]["env"].items() if k in mapped} == mapped
    assert "env" not in gh["jobs"]["test"], "the test job runs on pull requests: no secrets there"


EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def test_github_reads_only_outputs_that_earlier_steps_and_jobs_write(tmp_path):
    wf = load(generated(tmp_path) / ci.FILES["github"])
    runs = {r.id: r for r in ci.stage_runs() if r.id}
    written: dict[str, set[str]] = {}
    for jid, job in wf["jobs"].items():
        step_outputs: dict[str, set[str]] = {}
        needs = job.get("needs", [])
        needs = [needs] if isinstance(needs, str) else needs
        for name, value in (job.get("env") or {}).items():
            for expr in EXPR.findall(value):
                if expr.startswith("needs."):
                    _, other, _, out = expr.split(".")
                    assert other in needs and out in written[other], (jid, name, expr)
        for step in job["steps"]:
            texts = [*(step.get("env") or {}).values(), *(step.get("with") or {}).values(), step.get("if", "")]
            for expr in (e for t in texts for e in EXPR.findall(str(t))):
                if expr.startswith("steps."):
                    _, sid, _, out = expr.split(".")
                    assert out in step_outputs.get(sid, set()), (jid, step.get("name"), expr)
            if re.fullmatch(r"steps\.([\w-]+)\.outputs\.cache-hit != 'true'", step.get("if", "")):
                assert step.get("if").split(".")[1] in {s.get("id") for s in job["steps"]}
            if "id" in step:
                step_outputs[step["id"]] = set(runs[step["id"]].outputs) if step["id"] in runs else {"cache-hit"}
        written[jid] = set()
        for name, value in (job.get("outputs") or {}).items():
            _, sid, _, out = EXPR.fullmatch(value)[1].split(".")
            assert out in step_outputs[sid]
            written[jid].add(name)


def test_azure_reads_only_outputs_that_earlier_steps_and_stages_write(tmp_path):
    pipeline = load(generated(tmp_path) / ci.FILES["azure"])
    runs = {r.id: r for r in ci.stage_runs() if r.id}
    declared = {v["name"] for v in pipeline["variables"] if "name" in v}
    assert pipeline["variables"][-1] == {"group": ci.AZURE_GROUP}, "the group's values must come last, to win"
    assert {s.secret for s in (*ci.SECRETS, ci.API_KEY)} | {ci.STAGING_URL.name} <= declared
    produced: dict[tuple[str, str], set[str]] = {}
    for stage in pipeline["stages"]:
        job = stage["jobs"][0]
        jid = job.get("job") or job["deployment"]
        for name, value in (job.get("variables") or {}).items():
            m = re.fullmatch(r"\$\[ stageDependencies\.(\w+)\.(\w+)\.outputs\['(\w+)\.(\w+)'\] \]", value)
            assert m and m[1] in stage["dependsOn"] and m[4] in produced[(m[2], m[3])], (jid, name, value)
        seen: dict[str, set[str]] = {}
        for step in azure_steps(job):
            texts = [*(step.get("env") or {}).values(), *(step.get("inputs") or {}).values()]
            for ref in (r for t in texts for r in re.findall(r"\$\(([\w.]+)\)", str(t))):
                if "." in ref and not ref.split(".")[0] in ("Agent", "Build", "System", "Pipeline"):
                    sid, out = ref.split(".")
                    assert out in seen.get(sid, set()), (jid, step.get("displayName"), ref)
                elif "." not in ref:
                    assert ref in declared, (jid, ref)
            if "name" in step:
                seen[step["name"]] = set(runs[step["name"]].outputs)
                produced[(jid, step["name"])] = seen[step["name"]]


def test_ci_outputs_go_where_each_ci_reads_them(tmp_path):
    out = tmp_path / "github_output"
    assert ci.ci_outputs({"version": "7", "deployment": "v7"}, {"GITHUB_OUTPUT": str(out)}) == "github"
    assert out.read_text() == "version=7\ndeployment=v7\n"
    lines: list[str] = []
    assert ci.ci_outputs({"next": "rollout"}, {"TF_BUILD": "True"}, echo=lines.append) == "azure"
    assert lines == ["##vso[task.setvariable variable=next;isOutput=true]rollout"]
    lines.clear()
    assert ci.ci_outputs({"next": "serving"}, {}, echo=lines.append) == "stdout" and lines == ["next=serving"]
    with pytest.raises(ValueError):
        ci.ci_outputs({"x": "a\nb"}, {})


def test_the_rollout_step_does_what_deploy_says_comes_next(tmp_path):
    """The production step's `case` on LMOPS_NEXT, with a stand-in `lmops` that records its arguments and
    exits as told: `rollout start --wait`'s exit code is the step's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "lmops"
    stub.write_text('#!/bin/sh\necho "$@" >> "$CALLS"\nexit "${STUB_EXIT:-0}"\n')
    stub.chmod(0o755)
    script = tmp_path / "rollout.sh"
    script.write_text(ci.ROLLOUT.text())

    def run(next_: str, code: int = 0) -> tuple[int, str]:
        calls = tmp_path / f"calls-{next_}-{code}"
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "STUB_EXIT": str(code),
               "LMOPS_NEXT": next_, "LMOPS_VERSION": "7", "LMOPS_DEPLOYMENT": "v7", "LMOPS_REASON": "CI run 1"}
        done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
        return done.returncode, calls.read_text() if calls.exists() else ""

    assert run("rollout") == (0, "rollout start production --to v7 --wait --timeout 5h --reason CI run 1\n")
    assert run("rollout", 1)[0] == 1, "a rolled back rollout fails the job"
    assert run("rolling") == (0, "rollout status production --wait --timeout 5h\n")
    assert run("serving") == (0, "promote 7\n")
    assert run("") == (1, "")


# ----------------------------------------------------------------------------- lmops ci deploy

@pytest.fixture
def fake_registry(monkeypatch):
    """resolve_deployment without MLflow: version V of lmops-model is models:/lmops-model/V."""
    from lmops.deploy import models
    from lmops.deploy.endpoints import Deployment

    def resolve(ws, cfg, endpoint, name, ref, runtime=None, max_batch=None):
        version = ref.split("@")[1]
        return Deployment(endpoint, name, ref, "lmops-model", version, f"models:/lmops-model/{version}")

    monkeypatch.setattr(models, "resolve_deployment", resolve)


def test_deploy_version_is_idempotent_says_what_comes_next_and_prunes(workspace, fake_registry):
    from lmops.store import Store

    cfg = workspace.config()
    with Store.for_workspace(workspace, cfg) as store:
        def deploy(v, keep=1):
            return ci.deploy_version(workspace, cfg, store, "prod", str(v), "ci", keep, "test")

        first = deploy(1)
        assert first.next == "serving" and store.endpoints.get("prod").traffic == {"v1": 100}
        assert deploy(1).next == "serving", "a re-run changes nothing"
        revision = store.endpoints.get("prod").revision
        assert deploy(2).next == "rollout" and store.endpoints.get("prod").traffic == {"v1": 100, "v2": 0}
        assert deploy(2).next == "rollout" and store.endpoints.get("prod").revision == revision + 1
        store.rollouts.create("prod", "v2", "v1", "canary", [50, 100], 60, "ci", {"v1": 100})
        assert deploy(2).next == "rolling"
        # the rollout ends: v2 takes the traffic, v1 is kept for undo
        active = store.rollouts.active("prod")[0]
        store.rollouts.advance(active, None, active.started_at, status="succeeded")
        store.endpoints.set_traffic("prod", "ci", {"v2": 100})
        assert deploy(3).next == "rollout" and set(store.endpoints.get("prod").deployments) == {"v1", "v2", "v3"}
        store.endpoints.set_traffic("prod", "ci", {"v3": 100})
        four = deploy(4)  # idle: v2 (newer), v1: --keep 1 keeps v2
        assert four.removed == ["v1"] and set(store.endpoints.get("prod").deployments) == {"v2", "v3", "v4"}
        store.endpoints.set_traffic("prod", "ci", {"v4": 100})
        assert deploy(5, keep=0).removed == ["v3", "v2"]
        assert set(store.endpoints.get("prod").deployments) == {"v4", "v5"}
        store.endpoints.deploy(ci_deployment("prod", "v9", "8"), "someone")
        with pytest.raises(LmopsError, match="prod/v9 serves lmops-model v8, not v9"):
            deploy(9)


def ci_deployment(endpoint: str, name: str, version: str):
    from lmops.deploy.endpoints import Deployment

    return Deployment(endpoint, name, f"lmops-model@{version}", "lmops-model", version, f"models:/lmops-model/{version}")


def test_gates_fail_the_step_and_still_write_the_table(workspace, monkeypatch, tmp_path):
    evaluation = {"passed": False, "results": {"val_bpb": 3.2, "safety_pass_rate": 0.5},
                  "gates": [{"name": "safety", "metric": "safety_pass_rate", "op": ">=", "threshold": 1.0, "value": 0.5,
                             "passed": False, "detail": "0.5 < 1"}]}
    monkeypatch.setattr(ci, "pipeline_outputs", lambda ws, cfg, store, upto: {
        "train": {"run_dir": str(workspace.runs_dir / "pipeline-abc")}, "evaluate": evaluation})
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["ci", "gates", "--out", str(out), "-w", str(workspace.root)])
    assert result.exit_code == 1 and "gates failed: safety; the model is not registered" in result.output
    assert "| safety | safety_pass_rate >= | 0.5 | 1 | **FAIL** | 0.5 < 1 |" in (out / "evaluation.md").read_text()


def test_pipeline_outputs_need_the_pipeline_to_have_run(workspace):
    from lmops.store import Store

    with Store.for_workspace(workspace) as store, pytest.raises(LmopsError, match="has not run 'ingest'"):
        ci.pipeline_outputs(workspace, workspace.config(), store, "register")


def test_smoke_says_what_it_waited_for(workspace):
    port = free_port()
    result = CliRunner().invoke(app, ["smoke", f"http://127.0.0.1:{port}", "--deployment", "v1", "--wait", "1s",
                                      "-w", str(workspace.root)])
    assert result.exit_code == 1
    assert f"http://127.0.0.1:{port} did not serve v1 within 1 s" in result.output
    assert "is `lmops serve --endpoint` running there" in result.output


def test_check_shared_requires_the_store_and_tracking_server(workspace, monkeypatch):
    cli = CliRunner()
    plain = cli.invoke(app, ["ci", "check", "-w", str(workspace.root)])
    assert plain.exit_code == 0 and "from the environment: nothing" in plain.output
    shared = cli.invoke(app, ["ci", "check", "--shared", "-w", str(workspace.root)])
    assert shared.exit_code == 1 and "store.database_url is not set" in shared.output
    assert "set the CI secret LMOPS_DATABASE_URL" in shared.output
    monkeypatch.setenv("LMOPS__STORE__DATABASE_URL", f"sqlite:///{workspace.root / 'shared.db'}")
    shared = cli.invoke(app, ["ci", "check", "--shared", "-w", str(workspace.root)])
    assert "store.database_url (LMOPS__STORE__DATABASE_URL)" in shared.output
    assert shared.exit_code == 1 and "tracking.tracking_uri is not set" in shared.output


def test_cache_keys_follow_the_inputs_of_the_steps_they_name(workspace, tiny_sets):
    from lmops.config import override

    cfg = override(workspace.config(), tiny_sets)
    keys = ci.cache_keys(workspace, cfg)
    assert keys == ci.cache_keys(workspace, cfg)
    more = ci.cache_keys(workspace, override(cfg, ["train.max_steps=99"]))
    assert more["data"] == keys["data"] and more["tokens"] == keys["tokens"] and more["run"] != keys["run"]
    bpe = ci.cache_keys(workspace, override(cfg, ["tokenizer.kind=bpe"]))
    assert bpe["data"] == keys["data"] and bpe["tokens"] != keys["tokens"] and bpe["run"] != keys["run"]
    (workspace.root / "corpus" / "more.txt").write_text("Another document, long enough to be kept. " * 5)
    assert all(a != b for a, b in zip(ci.cache_keys(workspace, cfg).values(), keys.values()))


# ----------------------------------------------------------------------------- the shell steps, run

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Settings of this machine, not of the file: short windows so a rollout ends in seconds (the file keeps
# lmops.yaml's production defaults). Servers and steps alike get them, as a runner's environment would.
FAST = {"LMOPS__ROLLOUT__WINDOW_S": "2", "LMOPS__ROLLOUT__STEPS": "[50, 100]", "LMOPS__ROLLOUT__MIN_REQUESTS": "5",
        "LMOPS__ROLLOUT__TICK_INTERVAL_S": "0.2", "LMOPS__ROLLOUT__LEASE_S": "2", "LMOPS__SERVE__ENDPOINT_POLL_S": "0.2",
        "LMOPS__AUTH__RATE_LIMIT_PER_S": "1000", "LMOPS__AUTH__BURST": "1000"}
# Steps of the file that cannot run here, each with why. Only these are skipped.
SKIP = {ci.INSTALL.name: "installs lmops: the package under test is installed in this interpreter already"}
# The actions the workflow uses (not shell, so not run): what stands in for each here.
ACTIONS = {
    "actions/checkout@v4": "the fresh workspace is the checkout",
    "actions/setup-python@v5": "this interpreter",
    "actions/cache/restore@v4": "nothing cached yet: a first run on a fresh machine",
    "actions/cache/save@v4": "no cache service here",
    "actions/upload-artifact@v4": "the test reads lmops-report/ itself",
}
CONTEXT = {"github.event_name": "push", "github.actor": "octocat", "github.server_url": "https://github.com",
           "github.repository": "acme/lm", "github.run_id": "42", "github.sha": "0123abcd"}
CONDITIONS = {  # as on a push; an expression not listed fails the test
    "github.event_name != 'pull_request' && github.event_name != 'schedule'": True,
    "github.event_name != 'schedule'": True,
    "github.event_name == 'schedule' || github.event_name == 'workflow_dispatch'": False,  # the monitor job
}


class GitHubRun:
    """Runs a workflow's jobs in order, each `run:` with bash as GitHub would (its env from the workflow,
    the job and the step, ${{ }} resolved from secrets, vars, steps' and jobs' outputs, $GITHUB_OUTPUT),
    calling hooks before jobs and after steps. Any expression it does not know fails the test."""

    def __init__(self, wf: dict, root: Path, secrets: dict, variables: dict, machine: dict, tmp: Path):
        self.wf, self.root, self.secrets, self.vars, self.tmp = wf, root, secrets, variables, tmp
        self.base = {k: v for k, v in os.environ.items()
                     if not k.startswith(("LMOPS", "GITHUB_", "MLFLOW_")) and k not in ("TF_BUILD", "PGPASSWORD")}
        self.base |= machine
        self.job_outputs: dict[str, dict[str, str]] = {}
        self.ran: list[tuple[str, str, float]] = []  # (job, step, seconds)
        self.skipped: list[tuple[str, str]] = []
        self.before_job: dict = {}
        self.after_job: dict = {}
        self.after_step: dict = {}
        self.around_step: dict = {}

    def value(self, expr: str, steps: dict) -> str:
        parts = expr.split(".")
        if parts[0] == "secrets":
            return self.secrets.get(parts[1], "")  # GitHub: an undefined secret is empty
        if parts[0] == "vars":
            return self.vars.get(parts[1], "")
        if parts[0] == "steps" and parts[2] == "outputs":
            return steps[parts[1]][parts[3]]
        if parts[0] == "needs" and parts[2] == "outputs":
            return self.job_outputs[parts[1]][parts[3]]
        if expr in CONTEXT:
            return CONTEXT[expr]
        raise AssertionError(f"an expression this test does not know: {expr}")

    def resolve(self, text: str, steps: dict) -> str:
        return EXPR.sub(lambda m: self.value(m[1], steps), str(text))

    def run(self) -> None:
        env0 = {k: self.resolve(v, {}) for k, v in (self.wf.get("env") or {}).items()}
        for jid, job in self.wf["jobs"].items():
            if "if" in job and not CONDITIONS[job["if"]]:
                continue  # not on a push
            if jid in self.before_job:
                self.before_job[jid]()
            steps: dict[str, dict[str, str]] = {}
            job_env = {k: self.resolve(v, steps) for k, v in (job.get("env") or {}).items()}
            for step in job["steps"]:
                if "uses" in step:
                    assert step["uses"] in ACTIONS, f"{step['uses']}: say what stands in for it here"
                    continue
                name = step["name"]
                assert "if" not in step, f"{name}: a shell step this test would have to decide whether to run"
                if name in SKIP:
                    self.skipped.append((jid, name))
                    continue
                output = self.tmp / f"output-{jid}-{len(self.ran)}"
                output.write_text("")
                env = {**self.base, **env0, **job_env, **{k: self.resolve(v, steps) for k, v in (step.get("env") or {}).items()},
                       "GITHUB_OUTPUT": str(output)}
                script = self.tmp / f"step-{len(self.ran)}.sh"
                script.write_text(step["run"])
                t0 = time.monotonic()
                with self.around_step.get(name, contextlib.nullcontext)():
                    done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
                                          cwd=self.root, env=env, capture_output=True, text=True, timeout=600)
                self.ran.append((jid, name, time.monotonic() - t0))
                assert done.returncode == 0, (f"{jid} / {name} exited {done.returncode}\n--- stdout\n{done.stdout[-3000:]}"
                                              f"\n--- stderr\n{done.stderr[-6000:]}")
                if "id" in step:
                    steps[step["id"]] = dict(line.split("=", 1) for line in output.read_text().splitlines())
                if name in self.after_step:
                    self.after_step[name](env)
            self.job_outputs[jid] = {k: self.resolve(v, steps) for k, v in (job.get("outputs") or {}).items()}
            if jid in self.after_job:
                self.after_job[jid]()


def _caught(fn) -> list[BaseException]:
    try:
        fn()
    except BaseException as err:  # noqa: BLE001 - handed to the test's thread
        return [err]
    return []


def start_server(root: Path, endpoint: str, env: dict, wait: bool = True) -> tuple[subprocess.Popen, str]:
    """`lmops serve --endpoint E` (the server that serves it elsewhere), waited for until /readyz is 200."""
    port = free_port()
    proc = subprocess.Popen([*CLI, "serve", "--endpoint", endpoint, "--port", str(port)], cwd=root,
                            env={**env, "LMOPS_USER": f"server-{endpoint}"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    if not wait:
        return proc, url
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "slow"
        time.sleep(0.1)


@pytest.mark.slow
def test_the_generated_steps_take_a_fresh_workspace_from_its_corpus_to_a_production_canary(tmp_path, tiny_sets):
    from lmops.config import Config, override, render_default_yaml
    from lmops.data.demo import demo_corpus
    from lmops.store import Store

    started = time.monotonic()
    root = tmp_path / "ws"
    result = CliRunner().invoke(app, ["init", str(root), "--ci", "both"])
    assert result.exit_code == 0, result.output
    (root / "lmops.yaml").write_text(render_default_yaml(override(Config(), [*tiny_sets, "evaluate.max_new_tokens=8"])))
    (root / "corpus" / "docs.txt").write_text(demo_corpus()[:60_000], encoding="utf-8")
    shared = tmp_path / "servers"  # the PostgreSQL and MLflow servers of a real setup: files of their own here
    shared.mkdir()
    secrets = {"LMOPS_DATABASE_URL": f"sqlite:///{shared / 'store.db'}",
               "LMOPS_TRACKING_URI": f"sqlite:///{shared / 'mlflow.db'}"}
    variables: dict[str, str] = {}
    wf = load(root / ci.FILES["github"])
    gh = GitHubRun(wf, root, secrets, variables, FAST, tmp_path)
    servers: list[subprocess.Popen] = []
    served: list[tuple[int, str | None]] = []
    production_at: list[tuple[str, str]] = []  # (url, a user's key), once it serves
    server_env = {**gh.base, **{s.env: secrets.get(s.secret, "") for s in ci.SECRETS}}

    def lmops(*args: str) -> None:  # a person's command, outside the pipeline
        done = subprocess.run([*CLI, *args], cwd=root, env=server_env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    def before_staging():
        with Store.open(secrets["LMOPS_DATABASE_URL"]) as store:
            _, secrets[ci.API_KEY.secret] = store.keys.create("ci smoke", "inference", "test")

    def after_staging_deploy(env):  # the staging server, elsewhere, serves the endpoint the step made
        proc, variables[ci.STAGING_URL.name] = start_server(root, ci.STAGING, server_env)
        servers.append(proc)

    def production_serves():
        # production already serves a model, deployed by hand before this pipeline existed (here: the
        # version just registered, so the canary compares equal models and passes, as it should); this
        # runs while the staging job does, as a production server would be running all along
        lmops("endpoint", "create", ci.PRODUCTION)
        lmops("deploy", "seed", "--endpoint", ci.PRODUCTION, "--model", f"lmops-model@{gh.job_outputs['build']['version']}")
        proc, url = start_server(root, ci.PRODUCTION, server_env)
        servers.append(proc)
        with Store.open(secrets["LMOPS_DATABASE_URL"]) as store:
            production_at.append((url, store.keys.create("users", "inference", "test")[1]))

    errors: list[BaseException] = []
    seeding = threading.Thread(target=lambda: errors.extend(_caught(production_serves)))

    def before_production():
        seeding.join(120)
        assert not seeding.is_alive() and not errors, errors

    @contextlib.contextmanager
    def users():  # production's users, while the rollout step runs
        url, key = production_at[0]
        stop = threading.Event()

        def send():
            body = {"model": ci.PRODUCTION, "prompt": "The", "max_tokens": 2}
            with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
                while not stop.is_set():
                    r = http.post(f"{url}/v1/completions", json=body)
                    served.append((r.status_code, r.headers.get("x-lmops-deployment")))
                    time.sleep(0.01)

        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(30)

    gh.before_job = {"staging": before_staging, "production": before_production}
    gh.after_job = {"build": seeding.start}
    gh.after_step = {ci.DEPLOY_STAGING.name: after_staging_deploy}
    gh.around_step = {ci.ROLLOUT.name: users}
    try:
        gh.run()
    finally:
        if seeding.is_alive():
            seeding.join(120)
        for proc in servers:
            proc.terminate()
        for proc in servers:
            proc.wait(30)
    took = time.monotonic() - started

    # every stage ran, in order, and only the named steps were skipped
    ran_stages = [r.stage for r in ci.stage_runs() if r.name in {name for _, name, _ in gh.ran}]
    assert list(dict.fromkeys(ran_stages)) == [s for s in ci.STAGES if s != "approval"]
    assert {name for _, name in gh.skipped} == set(SKIP)
    assert gh.job_outputs["build"] == {"version": "1", "deployment": "v1"}
    report = root / ci.REPORT_DIR
    assert {p.name for p in report.iterdir()} == {"evaluation.json", "evaluation.md", "model-card.md", "lineage.json",
                                                   "lineage.txt"}
    assert (report / "model-card.md").read_text().startswith("# lmops-model v1")
    assert "gates: **passed**" in (report / "evaluation.md").read_text()

    with Store.open(secrets["LMOPS_DATABASE_URL"]) as store:
        staging, production = store.endpoints.get(ci.STAGING), store.endpoints.get(ci.PRODUCTION)
        rollout = store.rollouts.latest(ci.PRODUCTION)
        audit = store.audit.list(500)
        assert store.audit.verify().ok
    assert staging.traffic == {"v1": 100}
    assert production.traffic == {"seed": 0, "v1": 100} and rollout.status == "succeeded", rollout.message
    assert "lmops-model v1 is champion" in rollout.message
    assert {"github-actions:octocat"} <= {e.actor for e in audit}
    assert all(e.reason.startswith("CI https://github.com/acme/lm/actions/runs/42")
               for e in audit if e.actor == "github-actions:octocat" and e.action.startswith("endpoint."))
    assert {d for code, d in served if code == 200} == {"seed", "v1"} and {code for code, _ in served} == {200}
    print(f"\n{len(gh.ran)} steps in {took:.0f} s: " + ", ".join(f"{n} {s:.1f} s" for _, n, s in gh.ran))


def test_the_scheduled_monitor_job_runs_only_on_the_schedule_in_both_files(tmp_path):
    """The monitor job: in both files, on the hourly schedule (and a manual run), never on a push or pull
    request; on the schedule nothing of the push path runs. The schema test above covers its syntax."""
    out = generated(tmp_path)
    gh, az = load(out / ci.FILES["github"]), load(out / ci.FILES["azure"])
    on = gh.get("on", gh.get(True))  # YAML 1.1 reads the key `on` as True
    assert on["schedule"] == [{"cron": ci.MONITOR_CRON}] and "push" in on
    job = gh["jobs"]["monitor"]
    assert job["if"] == "github.event_name == 'schedule' || github.event_name == 'workflow_dispatch'"
    assert "needs" not in job and "environment" not in job
    assert {s.env for s in ci.SECRETS} <= set(job["env"])
    runs = [s["run"] for s in job["steps"] if "run" in s]
    assert any("lmops monitor run --endpoint production" in r and "--fail-on-alert" in r for r in runs)
    assert any("lmops loop run --no-drive" in r for r in runs), "the loop follows each scheduled monitor run"
    assert any(s.get("uses", "").startswith("actions/upload-artifact") and s["with"]["path"] == "lmops-monitor/"
               for s in job["steps"])
    for name, other in gh["jobs"].items():  # on a schedule: only the monitor (the rest need test or build)
        if name != "monitor" and "needs" not in other:
            assert "github.event_name != 'schedule'" in other["if"], name

    assert [s["cron"] for s in az["schedules"]] == [ci.MONITOR_CRON]
    stages = {s["stage"]: s for s in az["stages"]}
    assert stages["monitor"]["condition"] == "eq(variables['Build.Reason'], 'Schedule')"
    assert stages["monitor"]["dependsOn"] == []
    for name, stage in stages.items():
        if name != "monitor" and not stage.get("dependsOn"):
            assert "ne(variables['Build.Reason'], 'Schedule')" in stage["condition"], name
    steps = stages["monitor"]["jobs"][0]["steps"]
    script = next(s for s in steps if "lmops monitor run" in s.get("script", ""))
    assert "--fail-on-alert" in script["script"] and {s.env for s in ci.SECRETS} <= set(script["env"])
    assert any(s.get("publish") == "lmops-monitor" for s in steps)


def test_the_monitor_step_runs_the_loop_after_an_alert_and_still_exits_3(tmp_path):
    """The step's shell composition (lmops itself stubbed by a shell function, the one thing this checks is
    the script: a monitor run that alerts, exit 3, is followed by the loop's pass, and the step then fails
    with the monitor's 3; a quiet monitor run passes)."""
    import subprocess

    for monitor_exit, want in ((3, 3), (0, 0)):
        stub = (f'lmops() {{ case "$1" in monitor) echo "monitor $*"; return {monitor_exit};; '
                'loop) echo "loop $*";; esac; }\n')
        out = subprocess.run(["bash", "-c", stub + ci.MONITOR.text()], cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == want, out.stderr
        assert "loop loop run --no-drive" in out.stdout
        assert (tmp_path / ci.MONITOR_DIR / "loop.txt").read_text().startswith("loop loop run")

