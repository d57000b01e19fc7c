"""CI/CD pipelines for a workspace: `lmops ci generate` and `lmops init --ci github|azure|both` write
.github/workflows/lmops.yml (GitHub Actions) and/or azure-pipelines.yml (Azure Pipelines).

Both files carry out the same stages, in this order:

  test        the config is valid (`lmops ci check`), the workspace's own tests/ pass, if it has any
  data        ingest and validate: the data gates (`lmops pipeline run` of those steps)
  train       tokenize and train
  evaluate    evaluate, then `lmops ci gates`: exit 1 when a gate of evaluate.gates fails
  register    register the version; `lmops ci report` writes the model card, the evaluation table and the
              lineage into lmops-report/ (published as the run's artifact) and hands the version on
  staging     `lmops ci deploy staging V`: the version as deployment vV (e.g. v7) on the endpoint staging,
              at 0% beside the one serving (a canary nobody is routed to yet; the endpoint's first takes 100%)
  smoke       `lmops smoke URL --deployment vV`: requests through the x-lmops-deployment header to the staging
              server (lmops/serve/smoke.py's checks), then `lmops traffic set staging vV=100` (a traffic
              change, not a rollout: a completed rollout moves champion, which is production's to move)
  approval    GitHub: the environment production, whose protection rules (required reviewers) hold the job;
              Azure: the environment production, whose approval check holds the deployment job. Both are
              set on the environment in the CI's settings, not in the file
  production  `lmops ci deploy production V`, then `lmops rollout start production --to vV --wait`: the
              canary (or blue-green, rollout.strategy) that moves champion when it completes; its exit code
              fails the job (1: rolled back, 2: still running at --timeout). The endpoint's first
              deployment takes all its traffic at once and is promoted (`lmops promote V`) instead.

The shell of each stage is written once, below (the Run constants, laid out in JOBS), and both renderers
emit it as it is: GitHub's `run:`, Azure's `script:`. Only the wiring differs (checkout, caches, artifacts,
environments, how a step's outputs reach the next). Each script starts with `set -euo pipefail`, so a
multi-line script stops at its first failing command on either system (Azure runs `script:` with plain
bash). Scripts read only environment variables; each system's renderer puts its own values there.

Jobs. A job is a fresh machine that installs lmops (torch included), so stages share a job unless the CI
needs a boundary: test (runs on pull requests too, with no secrets), build (data, train, evaluate,
register: they share the workspace's files on one machine), staging (staging and smoke, in the environment
staging), production (behind the approval). Pull requests run test only. The pipeline takes a lock in the
shared store, so a second build at once would be refused: GitHub runs each job one at a time (a
concurrency group per job; a newer run waiting replaces an older one waiting), Azure batches pushes while a
run is going (`trigger.batch`; add an Exclusive Lock check to the environments to queue deployments too).
A build cancelled mid-run leaves that lock held by a machine that is gone: `lmops unlock`.

Approvals. The CI's approval gates the production job; registry.require_approval is lmops's own, recorded
by `lmops approve V`. With both on, the rollout waits in awaiting_approval for `lmops approve` (the job's
`--wait` times out, exit 2) and an endpoint's first `lmops promote` is refused; with a CI approval, leave
require_approval off, or add `lmops approve "$LMOPS_VERSION" --as NAME` to the production job.

Secrets. The files hold none. lmops reads settings from LMOPS__SECTION__KEY environment variables
(lmops/config.py: over lmops.yaml, under --set), so each job maps the CI's secrets onto them (SECRETS):
GitHub `env: {LMOPS__STORE__DATABASE_URL: ${{ secrets.LMOPS_DATABASE_URL }}}`; Azure the same from the
variable group `lmops` (`$(LMOPS_DATABASE_URL)`; Azure hands secret variables to a script only when mapped).
A secret nobody defined is an empty string (GitHub; in Azure an empty default declared before the group),
which lmops reads as unset. The jobs share the store (PostgreSQL) and the MLflow tracking server through
these: `lmops ci check --shared` stops the build when they are not set. Keep passwords out of the URLs
(PGPASSWORD, MLFLOW_TRACKING_TOKEN / _USERNAME / _PASSWORD are secrets of their own): lmops logs the config,
URLs included, with every training run.

Caches are keyed like the pipeline's steps (`lmops ci cache-keys`, the functions of lmops/pipeline.py's
KEYS): .lmops/datasets under the ingest step's key, .lmops/pipeline/tokenize under the tokenize step's,
.lmops/runs under the evaluate step's (a run folder holds the checkpoint and its evaluation). The dataset
version is content-addressed, a function of the ingest key's inputs, so the ingest key stands in for it in
the later keys. A cache only brings the files back: whether a step is skipped is the pipeline's own
decision (its key in the shared store, and its files present), so a stale or missing cache costs time,
never correctness. The checkout path must stay the same between runs (it does on hosted runners), as the
store records absolute paths.

Staging and production: the steps change the shared store; the servers that serve the endpoints
(`lmops serve --endpoint staging|production`, on Kubernetes, Azure ML, a VM: elsewhere) follow it and drive
the rollout, which `lmops rollout start --wait` waits for. The smoke stage reaches the staging server at
the CI variable LMOPS_STAGING_URL with the secret LMOPS_STAGING_API_KEY (an inference key of that server).

Tests (tests/ship/test_ci.py): each file passes check-jsonschema's built-in vendor.github-workflows /
vendor.azure-pipelines (and a broken one fails it); every output a step reads is written by an earlier step
or job; both files hold the same scripts; and the GitHub workflow's `run:` steps run in order with bash in
a fresh `lmops init --ci` workspace, skipping only the install (lmops is the package under test) and
standing in for the actions (checkout, caches, artifacts). The test starts the servers the steps need
(`lmops serve --endpoint staging|production`), sends production's users' traffic during the rollout, and
shortens windows through LMOPS__ variables of the machine, so the files keep lmops.yaml's defaults.

The `lmops ci ...` commands the steps call (lmops/cli_ci.py) are below: what the CLI has no
machine-readable form of (cache keys, the gate verdict, the registered version) and what a re-run must
find already done (`lmops ci deploy` is idempotent). Outputs go where each CI reads them: $GITHUB_OUTPUT,
or `##vso[task.setvariable ...;isOutput=true]` lines on Azure (TF_BUILD).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmops.errors import LmopsError

SYSTEMS = ("github", "azure")
FILES = {"github": Path(".github/workflows/lmops.yml"), "azure": Path("azure-pipelines.yml")}
PYTHON = "3.11"
BRANCH = "main"
STAGING, PRODUCTION = "staging", "production"
REPORT_DIR = "lmops-report"
ROLLOUT_TIMEOUT = "5h"  # under the 6 h a hosted job may run
AZURE_GROUP = "lmops"  # the Azure Pipelines variable group (Library) holding the secrets

# The stages, in order; "approval" is the production environment's protection, no commands.
STAGES = ("test", "data", "train", "evaluate", "register", "staging", "smoke", "approval", "production")


def default_install() -> str:
    """The pip requirement the jobs install: this lmops's version (`--install` for a wheel or a git URL)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"lmops=={version('lmops')}"
    except PackageNotFoundError:
        return "lmops"


# ----------------------------------------------------------------------------- where values come from

@dataclass(frozen=True)
class Secret:
    name: str  # the CI's secret (GitHub secrets, Azure variable group)


@dataclass(frozen=True)
class Var:
    name: str  # a CI variable that is not secret (GitHub vars, Azure variable group)


@dataclass(frozen=True)
class StepOutput:
    step: str
    output: str  # of a step of the same job


@dataclass(frozen=True)
class JobOutput:
    job: str
    step: str
    output: str  # of a step of an earlier job


Source = Secret | Var | StepOutput | JobOutput


@dataclass(frozen=True)
class SecretSpec:
    secret: str  # the name in the CI's secret store
    env: str  # the environment variable a job gets it as
    required: bool
    why: str


SECRETS = (
    SecretSpec("LMOPS_DATABASE_URL", "LMOPS__STORE__DATABASE_URL", True,
               "store.database_url: the PostgreSQL store every job shares (postgresql+psycopg://user@host/db)"),
    SecretSpec("LMOPS_TRACKING_URI", "LMOPS__TRACKING__TRACKING_URI", True,
               "tracking.tracking_uri: the MLflow tracking server and model registry"),
    SecretSpec("LMOPS_PGPASSWORD", "PGPASSWORD", False, "the database password, kept out of the URL"),
    SecretSpec("LMOPS_MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_TOKEN", False, "MLflow server token"),
    SecretSpec("LMOPS_MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_USERNAME", False, "MLflow server user"),
    SecretSpec("LMOPS_MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_PASSWORD", False, "MLflow server password"),
)
API_KEY = SecretSpec("LMOPS_STAGING_API_KEY", "LMOPS_API_KEY", True,
                     "an inference API key of the staging server, for the smoke test (lmops keys create)")
STAGING_URL = Var("LMOPS_STAGING_URL")  # the staging server's root, e.g. https://staging.example.com


# ----------------------------------------------------------------------------- the stages' shell, written once

def _pipeline(*steps: str) -> str:
    return f"lmops pipeline run --set 'pipeline.steps=[{', '.join(steps)}]'"


DATA_STEPS = ("ingest", "validate")
TRAIN_STEPS = (*DATA_STEPS, "tokenize", "train")
EVALUATE_STEPS = (*TRAIN_STEPS, "evaluate")
REGISTER_STEPS = (*EVALUATE_STEPS, "register")


@dataclass(frozen=True)
class Run:
    """A shell step: the same script in both files."""

    stage: str
    name: str
    script: str
    id: str | None = None  # GitHub step id / Azure step name, when a later step reads its outputs
    outputs: tuple[str, ...] = ()  # what it writes with ci_outputs()
    env: tuple[tuple[str, Source], ...] = ()  # this step's own environment (a secret only it needs)

    def text(self) -> str:
        return f"set -euo pipefail\n{self.script.strip()}\n"


@dataclass(frozen=True)
class RestoreCache:
    what: str  # a key of CACHES


@dataclass(frozen=True)
class SaveCache:
    what: str


@dataclass(frozen=True)
class Publish:
    name: str
    path: str


Step = Run | RestoreCache | SaveCache | Publish

INSTALL = Run("install", "Install lmops", """
python -m pip install --upgrade pip
# CPU wheels: a hosted runner has no GPU, and PyPI's Linux torch brings CUDA's libraries along
python -m pip install torch --index-url https://download.pytorch.org/whl/cpu
python -m pip install "$LMOPS_INSTALL"
lmops --version
""")

CACHES = {  # what: (folder, the pipeline step whose key names it)
    "data": (".lmops/datasets", "ingest"),
    "tokens": (".lmops/pipeline/tokenize", "tokenize"),
    "run": (".lmops/runs", "evaluate"),
}

CHECK = Run("test", "Check lmops.yaml", "lmops ci check")
TESTS = Run("test", "Run the workspace's tests", """
if [ -d tests ]; then
  python -m pip install pytest
  python -m pytest -q tests
else
  echo "no tests/ folder in the workspace: nothing to test"
fi
""")
SHARED = Run("data", "Check the shared store and tracking server", "lmops ci check --shared")
KEYS = Run("data", "Cache keys of the pipeline's steps", "lmops ci cache-keys", id="keys", outputs=tuple(CACHES))
DATA = Run("data", "Data: ingest and validate (data gates)", _pipeline(*DATA_STEPS))
TRAIN = Run("train", "Train: tokenize and train", _pipeline(*TRAIN_STEPS))
EVALUATE = Run("evaluate", "Evaluate (gates)", f"""
{_pipeline(*EVALUATE_STEPS)}
lmops ci gates --out {REPORT_DIR}
""")
REGISTER = Run("register", "Register", f"""
{_pipeline(*REGISTER_STEPS)}
lmops ci report --out {REPORT_DIR}
""", id="report", outputs=("version", "deployment"))
DEPLOY_STAGING = Run("staging", "Deploy to staging (canary at 0%)", f"""
lmops ci deploy {STAGING} "$LMOPS_VERSION" --keep 0 --reason "$LMOPS_REASON"
""", id="deploy", outputs=("next",))
SMOKE = Run("smoke", "Smoke test through x-lmops-deployment, then staging serves it", f"""
lmops smoke "$LMOPS_STAGING_URL" --deployment "$LMOPS_DEPLOYMENT" --version "$LMOPS_VERSION" --wait 10m
lmops traffic set {STAGING} "$LMOPS_DEPLOYMENT=100" --reason "$LMOPS_REASON"
""", env=(("LMOPS_STAGING_URL", STAGING_URL), (API_KEY.env, Secret(API_KEY.secret))))
DEPLOY_PRODUCTION = Run("production", "Deploy to production (at 0% beside the stable deployment)", f"""
lmops ci deploy {PRODUCTION} "$LMOPS_VERSION" --keep 1 --reason "$LMOPS_REASON"
""", id="deploy", outputs=("next",))
ROLLOUT = Run("production", "Roll out to production (lmops rollout start --wait)", f"""
case "$LMOPS_NEXT" in
  rollout)  # canary or blue-green (rollout.strategy); exit 1 when rolled back, 2 when still running at the timeout
    lmops rollout start {PRODUCTION} --to "$LMOPS_DEPLOYMENT" --wait --timeout {ROLLOUT_TIMEOUT} --reason "$LMOPS_REASON" ;;
  rolling)  # a re-run: its rollout is under way already
    lmops rollout status {PRODUCTION} --wait --timeout {ROLLOUT_TIMEOUT} ;;
  serving)  # the endpoint's first deployment (or a re-run after it completed): it is the champion
    lmops promote "$LMOPS_VERSION" ;;
  *)
    echo "lmops ci deploy said '$LMOPS_NEXT'; expected rollout, rolling or serving" >&2
    exit 1 ;;
esac
""", env=(("LMOPS_NEXT", StepOutput("deploy", "next")),))


@dataclass(frozen=True)
class Job:
    id: str
    title: str
    steps: tuple[Step, ...]
    needs: tuple[str, ...] = ()
    environment: str | None = None
    secrets: bool = False  # the store and tracking secrets (SECRETS) in its environment
    env: tuple[tuple[str, Source], ...] = ()
    outputs: tuple[tuple[str, str, str], ...] = ()  # (name, step id, step output)
    pushes_only: bool = False  # not on pull requests
    one_at_a_time: bool = False
    timeout_minutes: int | None = None
    scheduled: bool = False  # runs on the schedule (and workflow_dispatch) only; the others never on it


FROM_BUILD = (("LMOPS_VERSION", JobOutput("build", "report", "version")),
              ("LMOPS_DEPLOYMENT", JobOutput("build", "report", "deployment")))

JOBS = (
    Job("test", "test", (INSTALL, CHECK, TESTS)),
    Job("build", "data, train, evaluate, register", (
        INSTALL, SHARED, KEYS, RestoreCache("data"), RestoreCache("tokens"), RestoreCache("run"),
        DATA, SaveCache("data"), TRAIN, SaveCache("tokens"), EVALUATE, REGISTER, SaveCache("run"),
        Publish("lmops-report", REPORT_DIR)),
        needs=("test",), secrets=True, outputs=(("version", "report", "version"), ("deployment", "report", "deployment")),
        pushes_only=True, one_at_a_time=True, timeout_minutes=360),
    Job("staging", "deploy to staging, smoke test", (INSTALL, DEPLOY_STAGING, SMOKE),
        needs=("build",), environment=STAGING, secrets=True, env=FROM_BUILD, one_at_a_time=True,
        timeout_minutes=60),
    Job("production", "approval, production rollout", (INSTALL, DEPLOY_PRODUCTION, ROLLOUT),
        needs=("build", "staging"), environment=PRODUCTION, secrets=True, env=FROM_BUILD, one_at_a_time=True,
        timeout_minutes=360),
)


MONITOR_CRON = "17 * * * *"  # hourly, off the hour (GitHub delays runs scheduled at :00 most)
MONITOR_DIR = "lmops-monitor"
MONITOR = Run("monitor", "Monitor production, then a pass of the loop (loop.on_alert decides; exit 3 on an alert)", f"""
mkdir -p {MONITOR_DIR}
status=0
lmops monitor run --endpoint {PRODUCTION} --window 1h --fail-on-alert | tee {MONITOR_DIR}/monitor.txt || status=$?
# the loop reads the alerts just recorded: a retrain (loop.on_alert: retrain) trains here and starts the
# canary, which the production servers drive; the next scheduled run follows it to promotion or rollback
lmops loop run --no-drive | tee {MONITOR_DIR}/loop.txt
exit "$status"
""")
# Not in JOBS: the push path (and stage_runs, which the step-runner test executes) stays as it was.
MONITOR_JOB = Job("monitor", "scheduled monitor of production and the loop", (INSTALL, MONITOR,
                                                                               Publish("lmops-monitor", MONITOR_DIR)),
                  secrets=True, one_at_a_time=True, timeout_minutes=360, scheduled=True)  # 6 h: a pass may retrain


def stage_runs() -> list[Run]:
    """Every shell step in the order the jobs run them (the install of each job included)."""
    return [s for job in JOBS for s in job.steps if isinstance(s, Run)]


# ----------------------------------------------------------------------------- GitHub Actions

def _github_value(src: Source) -> str:
    if isinstance(src, Secret):
        return f"${{{{ secrets.{src.name} }}}}"
    if isinstance(src, Var):
        return f"${{{{ vars.{src.name} }}}}"
    if isinstance(src, StepOutput):
        return f"${{{{ steps.{src.step}.outputs.{src.output} }}}}"
    return f"${{{{ needs.{src.job}.outputs.{src.output} }}}}"


def github_workflow(install: str | None = None, branch: str = BRANCH) -> dict:
    """The workflow as data (dump it with to_yaml)."""
    jobs: dict[str, Any] = {}
    for job in (*JOBS, MONITOR_JOB):
        j: dict[str, Any] = {"name": job.title}
        if job.needs:
            j["needs"] = list(job.needs) if len(job.needs) > 1 else job.needs[0]
        if job.scheduled:
            j["if"] = "github.event_name == 'schedule' || github.event_name == 'workflow_dispatch'"
        elif job.pushes_only:
            j["if"] = "github.event_name != 'pull_request' && github.event_name != 'schedule'"
        elif not job.needs:  # the jobs that need it are skipped with it
            j["if"] = "github.event_name != 'schedule'"
        j["runs-on"] = "ubuntu-latest"
        if job.environment:
            j["environment"] = job.environment
        if job.one_at_a_time:
            j["concurrency"] = {"group": f"lmops-{job.id}", "cancel-in-progress": False}
        if job.timeout_minutes:
            j["timeout-minutes"] = job.timeout_minutes
        env = {s.env: _github_value(Secret(s.secret)) for s in SECRETS} if job.secrets else {}
        env |= {k: _github_value(v) for k, v in job.env}
        if env:
            j["env"] = env
        if job.outputs:
            j["outputs"] = {name: f"${{{{ steps.{step}.outputs.{out} }}}}" for name, step, out in job.outputs}
        j["steps"] = [{"uses": "actions/checkout@v4"},
                      {"uses": "actions/setup-python@v5",
                       "with": {"python-version": PYTHON, "cache": "pip",
                                "cache-dependency-path": str(FILES["github"])}},
                      *(_github_step(s) for s in job.steps)]
        jobs[job.id] = j
    return {
        "name": "lmops",
        "on": {"push": {"branches": [branch]}, "pull_request": {"branches": [branch]}, "workflow_dispatch": {},
               "schedule": [{"cron": MONITOR_CRON}]},
        "permissions": {"contents": "read"},
        "defaults": {"run": {"shell": "bash"}},
        "env": {
            "LMOPS_INSTALL": install or default_install(),
            "LMOPS_USER": "github-actions:${{ github.actor }}",
            "LMOPS_REASON": "CI ${{ github.server_url }}/${{ github.repository }}/actions/runs/${{ github.run_id }} "
                            "(commit ${{ github.sha }})",
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "160",
        },
        "jobs": jobs,
    }


def _cache_key_github(what: str) -> str:
    return f"lmops-{what}-${{{{ steps.{KEYS.id}.outputs.{what} }}}}"


def _github_step(step: Step) -> dict:
    if isinstance(step, Run):
        out: dict[str, Any] = {"name": step.name}
        if step.id:
            out["id"] = step.id
        if step.env:
            out["env"] = {k: _github_value(v) for k, v in step.env}
        out["run"] = step.text()
        return out
    if isinstance(step, RestoreCache):
        folder, key_of = CACHES[step.what]
        return {"name": f"Restore {folder} (cache keyed by the {key_of} step)", "id": f"cache-{step.what}",
                "uses": "actions/cache/restore@v4", "with": {"path": folder, "key": _cache_key_github(step.what)}}
    if isinstance(step, SaveCache):
        folder, _ = CACHES[step.what]
        return {"name": f"Save {folder} to the cache", "if": f"steps.cache-{step.what}.outputs.cache-hit != 'true'",
                "uses": "actions/cache/save@v4", "with": {"path": folder, "key": _cache_key_github(step.what)}}
    return {"name": f"Publish {step.path}/ (model card, evaluation, lineage)", "if": "always()",
            "uses": "actions/upload-artifact@v4",
            "with": {"name": step.name, "path": f"{step.path}/", "if-no-files-found": "ignore"}}


# ----------------------------------------------------------------------------- Azure Pipelines

def _azure_value(src: Source) -> str:
    if isinstance(src, (Secret, Var)):
        return f"$({src.name})"
    if isinstance(src, StepOutput):
        return f"$({src.step}.{src.output})"
    return f"$[ stageDependencies.{src.job}.{src.job}.outputs['{src.step}.{src.output}'] ]"


def azure_pipeline(install: str | None = None, branch: str = BRANCH) -> dict:
    """The pipeline as data (dump it with to_yaml)."""
    stages = []
    for job in (*JOBS, MONITOR_JOB):
        steps = [*_azure_setup(job), *(_azure_step(s, job) for s in job.steps)]
        if job.environment:
            body: dict[str, Any] = {"deployment": job.id, "displayName": job.title, "environment": job.environment}
        else:
            body = {"job": job.id, "displayName": job.title}
        if job.timeout_minutes:
            body["timeoutInMinutes"] = str(job.timeout_minutes)  # Azure's schema types every scalar as a string
        if job.env:
            body["variables"] = {k: _azure_value(v) for k, v in job.env}
        if job.environment:
            body["strategy"] = {"runOnce": {"deploy": {"steps": [{"download": "none"}, *steps]}}}
        else:
            body["steps"] = steps
        stage: dict[str, Any] = {"stage": job.id, "displayName": job.title}
        if job.needs:
            stage["dependsOn"] = list(job.needs)
        elif job.scheduled:
            stage["dependsOn"] = []  # not after the previous stage
        if job.scheduled:
            stage["condition"] = "eq(variables['Build.Reason'], 'Schedule')"
        elif job.pushes_only:
            stage["condition"] = ("and(succeeded(), ne(variables['Build.Reason'], 'PullRequest'), "
                                  "ne(variables['Build.Reason'], 'Schedule'))")
        elif not job.needs:
            stage["condition"] = "and(succeeded(), ne(variables['Build.Reason'], 'Schedule'))"
        stage["jobs"] = [body]
        stages.append(stage)
    variables: list[dict[str, str]] = [
        {"name": "LMOPS_INSTALL", "value": install or default_install()},
        {"name": "LMOPS_USER", "value": "azure-pipelines:$(Build.RequestedForEmail)"},
        {"name": "LMOPS_REASON", "value": "CI $(System.CollectionUri)$(System.TeamProject)/_build/results?buildId="
                                          "$(Build.BuildId) (commit $(Build.SourceVersion))"},
        {"name": "PIP_CACHE_DIR", "value": "$(Pipeline.Workspace)/.pip"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "COLUMNS", "value": "160"},
        # empty unless the variable group defines them (declared first, so the group's values win)
        *({"name": s.secret, "value": ""} for s in (*SECRETS, API_KEY)),
        {"name": STAGING_URL.name, "value": ""},
        {"group": AZURE_GROUP},
    ]
    return {
        "trigger": {"batch": "true", "branches": {"include": [branch]}},
        "pr": {"branches": {"include": [branch]}},
        "schedules": [{"cron": MONITOR_CRON, "displayName": "monitor production", "branches": {"include": [branch]},
                       "always": "true"}],
        "pool": {"vmImage": "ubuntu-latest"},
        "variables": variables,
        "stages": stages,
    }


def _azure_setup(job: Job) -> list[dict]:
    return [
        {"checkout": "self"},
        {"task": "UsePythonVersion@0", "displayName": f"Python {PYTHON}", "inputs": {"versionSpec": PYTHON}},
        {"task": "Cache@2", "displayName": "Cache pip's downloads",
         "inputs": {"key": f'pip | "$(Agent.OS)" | {FILES["azure"]}', "path": "$(PIP_CACHE_DIR)"}},
    ]


def _azure_step(step: Step, job: Job) -> dict:
    if isinstance(step, Run):
        out: dict[str, Any] = {"script": step.text(), "displayName": step.name}
        if step.id:
            out["name"] = step.id
        # secret variables reach a script only where mapped: every step of a job that uses the store
        env = {s.env: _azure_value(Secret(s.secret)) for s in SECRETS} if job.secrets and step is not INSTALL else {}
        env |= {k: _azure_value(v) for k, v in step.env}
        if env:
            out["env"] = env
        return out
    if isinstance(step, RestoreCache):
        folder, key_of = CACHES[step.what]
        return {"task": "Cache@2", "displayName": f"Cache {folder} (keyed by the {key_of} step)",
                "inputs": {"key": f'lmops-{step.what} | "$({KEYS.id}.{step.what})"',
                           "path": f"$(Build.SourcesDirectory)/{folder}"}}
    if isinstance(step, SaveCache):  # Cache@2 saves at the end of a job that succeeded
        return {}
    return {"publish": step.path, "artifact": step.name, "displayName": f"Publish {step.path}/",
            "condition": "succeededOrFailed()"}


# ----------------------------------------------------------------------------- writing the files

class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # GitHub reads no YAML anchors: repeat instead
        return True


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)

HEADER = """\
# Generated by `lmops ci generate` (lmops/ship/ci.py); regenerate with `lmops ci generate --force`.
# Stages: test -> data (ingest gates) -> train -> evaluate (gates) -> register -> deploy to staging (canary
# at 0%) -> smoke test -> approval -> production rollout (lmops rollout start --wait).
# The settings are lmops.yaml's; secrets come from the CI's secret store, never from this file.
"""
def _setup_notes(where: str, secret: str, variable: str, environments: tuple[str, str]) -> str:
    rows = [(f"{secret} {s.secret}", ("" if s.required else "optional: ") + s.why) for s in (*SECRETS, API_KEY)]
    rows.append((f"{variable} {STAGING_URL.name}", "the staging server's root, e.g. https://lm-staging.example.com"))
    rows += [("environment staging", environments[0]), ("environment production", environments[1])]
    width = max(len(a) for a, _ in rows)
    lines = [f"# Set up once, {where}:"] + [f"#   {a:<{width}}  {b}".rstrip() for a, b in rows]
    lines += ["# The servers run elsewhere: `lmops serve --endpoint staging` and `lmops serve --endpoint production`",
              "# on the same store; they load each deployment and drive the rollouts this file starts."]
    return "\n".join(lines) + "\n"


GITHUB_NOTES = _setup_notes("in the repository's settings (Secrets and variables > Actions; Environments)",
                            "secret", "variable", ("", "with required reviewers: that is the approval"))
AZURE_NOTES = _setup_notes(f"in the project (Pipelines > Library: variable group '{AZURE_GROUP}'; Environments)",
                           "secret", "variable", ("", "with an Approvals check: that is the approval"))


def to_yaml(data: dict, notes: str = "") -> str:
    body = yaml.dump(_drop_empty(data), Dumper=_Dumper, sort_keys=False, width=1 << 16, allow_unicode=True)
    return HEADER + notes + "\n" + body


def _drop_empty(x: Any) -> Any:
    """Without the {} placeholders of steps one system has no use for (Azure saves caches by itself)."""
    if isinstance(x, list):
        return [_drop_empty(v) for v in x if v != {}]
    if isinstance(x, dict):
        return {k: _drop_empty(v) for k, v in x.items()}
    return x


def render(system: str, install: str | None = None, branch: str = BRANCH) -> str:
    if system == "github":
        return to_yaml(github_workflow(install, branch), GITHUB_NOTES)
    if system == "azure":
        return to_yaml(azure_pipeline(install, branch), AZURE_NOTES)
    raise LmopsError(f"unknown CI {system!r}: use {', '.join(SYSTEMS)} or both")


def systems(choice: str, option: str = "--ci") -> tuple[str, ...]:
    """'github', 'azure' or 'both' as the systems to write."""
    if choice == "both":
        return SYSTEMS
    if choice in SYSTEMS:
        return (choice,)
    raise LmopsError(f"{option} {choice!r}: use github, azure or both")


def check_writable(root: Path, which: tuple[str, ...], force: bool) -> list[Path]:
    """The files to write under root, or an LmopsError naming those that exist (without force)."""
    paths = [root / FILES[s] for s in which]
    if not force and (there := [p for p in paths if p.exists()]):
        one = len(there) == 1
        raise LmopsError(f"{', '.join(map(str, there))}: {'exists' if one else 'exist'} already; pass --force to "
                         f"overwrite {'it' if one else 'them'}")
    return paths


def write_files(root: Path, which: tuple[str, ...], force: bool = False, install: str | None = None,
                branch: str = BRANCH) -> list[Path]:
    """Write the CI files of `which` under root (refusing to overwrite without force); return them."""
    paths = check_writable(root, which, force)
    for system, path in zip(which, paths):
        text = render(system, install, branch)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return paths


# ----------------------------------------------------------------------------- what the steps call

def ci_outputs(values: Mapping[str, str], environ: Mapping[str, str] | None = None,
               echo: Callable[[str], None] = print) -> str:
    """Hand values to the CI's later steps and jobs: appended to $GITHUB_OUTPUT (GitHub Actions), as
    `##vso[task.setvariable variable=NAME;isOutput=true]VALUE` lines on stdout (Azure Pipelines, which sets
    TF_BUILD), else NAME=VALUE lines on stdout. Returns which it was."""
    env = os.environ if environ is None else environ
    for k, v in values.items():
        if "\n" in str(v) or "\n" in k:
            raise ValueError(f"CI output {k}: one line only")
    if env.get("GITHUB_OUTPUT"):
        with open(env["GITHUB_OUTPUT"], "a", encoding="utf-8") as f:
            f.writelines(f"{k}={v}\n" for k, v in values.items())
        return "github"
    if env.get("TF_BUILD"):
        for k, v in values.items():
            echo(f"##vso[task.setvariable variable={k};isOutput=true]{v}")
        return "azure"
    for k, v in values.items():
        echo(f"{k}={v}")
    return "stdout"


def _context(ws, cfg, store=None):
    from lmops.pipeline import Context

    return Context(ws, cfg, store, log=lambda m: None, progress=False, actor="lmops-ci")


def cache_keys(ws, cfg) -> dict[str, str]:
    """The CI cache keys, before anything runs: the pipeline's own key functions (lmops/pipeline.py's KEYS)
    over the same inputs, with the ingest key standing for the dataset version it makes."""
    from lmops.pipeline import KEYS

    ctx = _context(ws, cfg)
    data = KEYS["ingest"](ctx)
    ctx.outputs["ingest"] = {"dataset": data}
    ctx.keys["tokenize"] = tokens = KEYS["tokenize"](ctx)
    ctx.keys["train"] = KEYS["train"](ctx)
    return {"data": data, "tokens": tokens, "run": KEYS["evaluate"](ctx)}


def pipeline_outputs(ws, cfg, store, upto: str) -> dict[str, dict]:
    """The outputs of the pipeline's steps up to `upto` for lmops.yaml and the corpus as they are now: each
    step's key computed as the pipeline computes it, its outputs those of the step the store has with that
    key. Not "the latest run": a CI job gets what its own commit's config made, whoever ran since."""
    from lmops.pipeline import KEYS, STEPS

    ctx = _context(ws, cfg, store)
    for name in STEPS[:STEPS.index(upto) + 1]:
        key = KEYS[name](ctx)
        hit = store.pipeline.find_cached_step(name, key)
        if hit is None:
            raise LmopsError(f"the pipeline has not run '{name}' for lmops.yaml and the corpus as they are now "
                             f"(step key {key[:12]}); run `lmops pipeline run` first")
        ctx.keys[name], ctx.outputs[name] = key, hit.outputs
    return ctx.outputs


def deployment_name(version: str | int) -> str:
    return f"v{version}"


def evaluation_markdown(evaluation: dict, title: str) -> str:
    """The gates and the metrics of an evaluation (the evaluate step's outputs) as markdown tables."""
    def num(x) -> str:
        return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)

    lines = [f"# {title}", "", f"gates: **{'passed' if evaluation['passed'] else 'FAILED'}**", "",
             "| gate | metric | value | threshold | result | detail |", "|---|---|---|---|---|---|"]
    for g in evaluation["gates"]:
        lines.append(f"| {g['name']} | {g['metric']} {g['op']} | {num(g['value'])} | {num(g['threshold'])} | "
                     f"{'pass' if g['passed'] else '**FAIL**'} | {g['detail']} |")
    lines += ["", "| metric | value |", "|---|---|"]
    for k, v in sorted(evaluation["results"].items()):
        if isinstance(v, (int, float, str)) or v is None:
            lines.append(f"| {k} | {num(v)} |")
    return "\n".join(lines) + "\n"


def write_evaluation(out: Path, evaluation: dict, title: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "evaluation.json", out / "evaluation.md"]
    files[0].write_text(json.dumps(evaluation, indent=2, default=str) + "\n", encoding="utf-8")
    files[1].write_text(evaluation_markdown(evaluation, title), encoding="utf-8")
    return files


def write_report(ws, cfg, outputs: dict[str, dict], out: Path) -> list[Path]:
    """lmops-report/: evaluation (json, md), the registered version's model card and its lineage (json, txt)."""
    import io

    from rich.console import Console

    from lmops import registry

    version = outputs["register"]["version"]
    name = cfg.registry.model_name
    files = write_evaluation(out, outputs["evaluate"], f"{name} v{version}: evaluation")
    lin = registry.lineage(ws, cfg, f"{name}@{version}")
    (out / "lineage.json").write_text(json.dumps(lin, indent=2, default=str) + "\n", encoding="utf-8")
    text = io.StringIO()
    Console(file=text, width=120, color_system=None, force_terminal=False).print(registry.render_lineage(lin))
    (out / "lineage.txt").write_text(text.getvalue(), encoding="utf-8")
    (out / "model-card.md").write_text(_model_card(ws, cfg, name, version, lin), encoding="utf-8")
    return [*files, out / "lineage.json", out / "lineage.txt", out / "model-card.md"]


def _model_card(ws, cfg, name: str, version: str, lin: dict) -> str:
    """The card registration wrote (the run artifact the version's model_card tag names), else the
    version's description (the card, cut to MLflow's limit)."""
    import tempfile

    from lmops import tracking

    uri = lin["model"].get("model_card")
    if uri:
        try:
            import mlflow.artifacts

            with tempfile.TemporaryDirectory() as tmp, tracking.quiet_downloads():
                got = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp,
                                                          tracking_uri=tracking.tracking_uri(ws, cfg))
                return Path(got).read_text(encoding="utf-8")
        except Exception:  # noqa: BLE001 - the description below is the card too
            pass
    mv = tracking.client(ws, cfg).get_model_version(name, version)
    return mv.description or f"# {name} v{version}\n\n(no model card was recorded)\n"


@dataclass
class Deployed:
    next: str  # rollout | rolling | serving
    message: str
    removed: list[str] = field(default_factory=list)


def deploy_version(ws, cfg, store, endpoint: str, version: str, actor: str, keep: int = 1,
                   reason: str | None = None) -> Deployed:
    """Put registry version `version` on `endpoint` as deployment vVERSION, as `lmops deploy` does, and say
    what comes next: 'serving' (it takes all the traffic: the endpoint's first deployment, or a re-run),
    'rolling' (a rollout of it is under way: a re-run), 'rollout' (deployed at 0% beside the stable one).

    Idempotent: the endpoint is created when missing; a deployment of that name serving that version is
    left as it is. Before deploying, deployments taking no traffic (no live share, no mirror, in no active
    rollout) are removed but the `keep` newest, which `lmops rollout undo` may need."""
    from lmops.deploy.models import resolve_deployment

    name = deployment_name(version)
    ep = store.endpoints.find(endpoint)
    if ep is None:
        store.endpoints.create(endpoint, actor, "created by lmops ci deploy", reason)
        ep = store.endpoints.get(endpoint)
    removed: list[str] = []
    dep = ep.deployments.get(name)
    if dep is not None and dep.model_version != str(version):
        raise LmopsError(f"{endpoint}/{name} serves {dep.model_name} v{dep.model_version}, not v{version}; "
                         f"remove or rename it (lmops undeploy {name} --endpoint {endpoint})")
    if dep is None:
        busy = {n for r in store.rollouts.active(endpoint) for n in (r.target, r.stable)}
        idle = sorted((d for d in ep.deployments.values()
                       if not ep.traffic.get(d.name) and not ep.mirror.get(d.name) and d.name not in busy),
                      key=lambda d: (d.created_at is not None, d.created_at), reverse=True)
        for old in idle[keep:]:
            store.endpoints.undeploy(endpoint, old.name, actor, reason)
            removed.append(old.name)
        resolved = resolve_deployment(ws, cfg, endpoint, name, f"{cfg.registry.model_name}@{version}")
        ep = store.endpoints.deploy(resolved, actor, None, reason)
        what = f"deployed {endpoint}/{name} ({resolved.model_name} v{resolved.model_version})"
    else:
        what = f"{endpoint}/{name} serves v{version} already"
    share = ep.traffic.get(name, 0)
    if share == 100:
        return Deployed("serving", f"{what}; it takes all of {endpoint}'s traffic", removed)
    if any(r.target == name for r in store.rollouts.active(endpoint)):
        return Deployed("rolling", f"{what}; its rollout is under way at {share}%", removed)
    return Deployed("rollout", f"{what} at {share}%, beside {ep.stable or 'nothing'}", removed)


def wait_until_served(base_url: str, deployment: str, version: str | None, timeout_s: float,
                      poll_s: float = 1.0, sleep: Callable[[float], None] | None = None) -> dict:
    """Poll the server's /readyz until it serves `deployment` (loaded, and of `version` when given): a
    server learns of a deployment from the store within serve.endpoint_poll_s and loads it first. Returns
    /readyz's answer; an LmopsError with the last thing seen at the timeout."""
    import time

    import httpx

    root = base_url.rstrip("/").removesuffix("/v1")
    deadline = time.monotonic() + timeout_s
    seen = "no answer yet"
    while True:
        try:
            r = httpx.get(f"{root}/readyz", timeout=10)
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            if r.status_code == 200 and "deployments" not in body:
                raise LmopsError(f"{root} serves a model, not an endpoint: no deployment {deployment} to test "
                                 "(lmops serve --endpoint NAME)")
            dep = (body.get("deployments") or {}).get(deployment)
            if r.status_code == 200 and dep and dep.get("loaded") and (version is None or str(dep.get("version")) == str(version)):
                return body
            seen = (f"status {r.status_code}, {deployment}: {dep}" if dep is not None
                    else f"status {r.status_code}, deployments {sorted(body.get('deployments') or {})}")
        except httpx.HTTPError as err:
            seen = f"{type(err).__name__}: {err}"
        except ValueError:
            seen = f"status {r.status_code}: not JSON"
        if time.monotonic() >= deadline:
            raise LmopsError(f"{root} did not serve {deployment}" + (f" v{version}" if version else "")
                             + f" within {timeout_s:g} s (last: {seen}); is `lmops serve --endpoint` running there, "
                             "on the same store?")
        (sleep or time.sleep)(poll_s)
