"""`lmops ci generate`: the CI/CD pipeline files of a workspace (lmops/ship/ci.py), and the commands their
steps call: `lmops ci check|cache-keys|gates|report|deploy` and `lmops smoke`. Registered on lmops.cli's app
when it is imported, as lmops/cli_deploy.py's commands are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lmops.cli import SetOpt, WorkspaceOpt, _store, _workspace_and_config, app, console, friendly, log
from lmops.errors import LmopsError

ci_app = typer.Typer(help="CI/CD: generate the GitHub Actions / Azure Pipelines files, and the commands their steps run.",
                     no_args_is_help=True)
app.add_typer(ci_app, name="ci")

OutOpt = Annotated[Path, typer.Option("--out", help="Folder for the files (created if missing).")]


@ci_app.command("generate")
@friendly
def ci_generate(
    system: Annotated[str, typer.Option("--system", help="github (.github/workflows/lmops.yml), azure (azure-pipelines.yml) or both.")] = "both",
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder to write into; default: the workspace's root.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite files that exist.")] = False,
    install: Annotated[Optional[str], typer.Option(help="What the jobs pip install: default this lmops's version, e.g. lmops==0.1.0; a wheel URL or git+https://... works too.")] = None,
    branch: Annotated[str, typer.Option(help="The branch whose pushes train and deploy (pull requests to it run the tests).")] = "main",
    workspace: WorkspaceOpt = None,
):
    """Write the CI/CD pipeline: test -> data -> train -> evaluate -> register -> staging -> smoke ->
    approval -> production rollout. Secrets come from the CI's secret store (see the file's header)."""
    from lmops.ship import ci
    from lmops.workspace import find_workspace

    root = out if out is not None else find_workspace(workspace).root
    for path in ci.write_files(root, ci.systems(system, "--system"), force=force, install=install, branch=branch):
        log(f"wrote {path}")
    log(f"the jobs install {install or ci.default_install()} with pip (--install for a wheel, a git URL or another "
        "index);\nnext: the secrets, variables and environments each file's header lists, in the CI's settings")


@ci_app.command("check")
@friendly
def ci_check(
    shared: Annotated[bool, typer.Option("--shared", help="Also require store.database_url and tracking.tracking_uri (a CI's jobs run on machines of their own and share only these) and reach both.")] = False,
    workspace: WorkspaceOpt = None,
    set_: SetOpt = None,
):
    """Check lmops.yaml (with the LMOPS__SECTION__KEY environment variables over it) and say which settings
    came from the environment (names only)."""
    from lmops.config import environment_settings
    from lmops.ship.ci import SECRETS

    ws, cfg = _workspace_and_config(workspace, set_)
    log(f"{ws.config_path}: valid; model {cfg.registry.model_name}, pipeline {' -> '.join(cfg.pipeline.steps)}")
    found = environment_settings()
    log("from the environment: " + (", ".join(f"{'.'.join(p)} ({var})" for var, p, _ in found) or "nothing"))
    if not shared:
        return
    secret = {s.env: s.secret for s in SECRETS}
    for key, value, env in (("store.database_url", cfg.store.database_url, "LMOPS__STORE__DATABASE_URL"),
                            ("tracking.tracking_uri", cfg.tracking.tracking_uri, "LMOPS__TRACKING__TRACKING_URI")):
        if value is None:
            raise LmopsError(f"{key} is not set: in CI every job runs on a machine of its own, so they share the "
                             f"store and the registry only through a server; set the CI secret {secret[env]} "
                             f"(the job maps it to {env})")
    from lmops import tracking
    from lmops.store import Store

    with Store.for_workspace(ws, cfg) as store:
        log(f"store: {store.url} (reached)")
    tracking.configure(ws, cfg)
    log(f"tracking: {_masked(tracking.tracking_uri(ws, cfg))} (reached, experiment {cfg.tracking.experiment})")


def _masked(uri: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@ci_app.command("cache-keys")
@friendly
def ci_cache_keys(workspace: WorkspaceOpt = None, set_: SetOpt = None):
    """The CI cache keys of the pipeline's step outputs (data: ingest, tokens: tokenize, run: evaluate),
    computed as the pipeline computes its step keys; handed to the CI as outputs data, tokens, run."""
    from lmops.ship.ci import CACHES, cache_keys, ci_outputs

    ws, cfg = _workspace_and_config(workspace, set_)
    keys = cache_keys(ws, cfg)
    for what, key in keys.items():
        log(f"{CACHES[what][0]}: key {key[:16]}... (the {CACHES[what][1]} step's inputs)")
    ci_outputs(keys, echo=typer.echo)


@ci_app.command("gates")
@friendly
def ci_gates(out: OutOpt = Path("lmops-report"), workspace: WorkspaceOpt = None, set_: SetOpt = None):
    """The evaluation gates of the model the pipeline trained for lmops.yaml and the corpus as they are now:
    the table, OUT/evaluation.md and .json; exits 1 when a gate failed."""
    from lmops.evaluate import GateResult, render_gates
    from lmops.ship.ci import pipeline_outputs, write_evaluation

    ws, cfg, store = _store(workspace, set_)
    with store:
        outputs = pipeline_outputs(ws, cfg, store, "evaluate")
    evaluation = outputs["evaluate"]
    run = Path(outputs["train"]["run_dir"]).name
    files = write_evaluation(out, evaluation, f"{run}: evaluation")
    console.print(render_gates([GateResult(**g) for g in evaluation["gates"]]))
    log(f"wrote {', '.join(map(str, files))}")
    if not evaluation["passed"]:
        failed = [g["name"] for g in evaluation["gates"] if not g["passed"]]
        raise LmopsError(f"gates failed: {', '.join(failed)}; the model is not registered")


@ci_app.command("report")
@friendly
def ci_report(out: OutOpt = Path("lmops-report"), workspace: WorkspaceOpt = None, set_: SetOpt = None):
    """What the pipeline registered for lmops.yaml and the corpus as they are now: OUT/model-card.md,
    evaluation.md/.json, lineage.json/.txt; handed to the CI as outputs version and deployment (vVERSION)."""
    from lmops.ship.ci import ci_outputs, deployment_name, pipeline_outputs, write_report

    ws, cfg, store = _store(workspace, set_)
    with store:
        outputs = pipeline_outputs(ws, cfg, store, "register")
    version = str(outputs["register"]["version"])
    files = write_report(ws, cfg, outputs, out)
    log(f"{cfg.registry.model_name} v{version}: wrote {', '.join(map(str, files))}")
    ci_outputs({"version": version, "deployment": deployment_name(version)}, echo=typer.echo)


@ci_app.command("deploy")
@friendly
def ci_deploy(
    endpoint: Annotated[str, typer.Argument(help="The endpoint (created if missing).")],
    version: Annotated[str, typer.Argument(help="The registry version to deploy, as deployment vVERSION.")],
    keep: Annotated[int, typer.Option(min=0, help="Deployments taking no traffic kept (newest first) for `lmops rollout undo`; older ones are removed.")] = 1,
    reason: Annotated[Optional[str], typer.Option("--reason", help="Why: kept in the audit log with each change.")] = None,
    workspace: WorkspaceOpt = None,
    set_: SetOpt = None,
):
    """Deploy a registry version as deployment vVERSION (idempotent); output `next` says what comes next.

    rollout: it is at 0% beside the stable deployment; rolling: its rollout is under way (a re-run);
    serving: it takes all the traffic (the endpoint's first deployment, or a re-run)."""
    from lmops.ship.ci import ci_outputs, deploy_version
    from lmops.store import default_actor

    ws, cfg, store = _store(workspace, set_)
    with store:
        done = deploy_version(ws, cfg, store, endpoint, version, default_actor(), keep, reason)
    if done.removed:
        log(f"removed {', '.join(done.removed)} from {endpoint} (no traffic; --keep {keep})")
    log(f"{done.message}: next {done.next}")
    ci_outputs({"next": done.next}, echo=typer.echo)


@app.command("smoke")
@friendly
def smoke(
    url: Annotated[str, typer.Argument(help="The server's root, e.g. https://lm-staging.example.com (or its /v1).")],
    deployment: Annotated[str, typer.Option("--deployment", "-d", help="The deployment to test, reached through the x-lmops-deployment header (also one at 0%).")],
    version: Annotated[Optional[str], typer.Option(help="Also require the deployment to serve this model version.")] = None,
    wait: Annotated[Optional[str], typer.Option(help="How long to wait for the server to load the deployment, e.g. 10m; default: not at all.")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="LMOPS_API_KEY", show_envvar=True, help="An inference key of that server (better from the environment than on a command line).")] = None,
    workspace: WorkspaceOpt = None,
    set_: SetOpt = None,
):
    """The smoke suite of a blue-green rollout (rollout.smoke: a few greedy completions, each checked) sent
    to one deployment of a running `lmops serve --endpoint` server; exits 1 when a check fails."""
    from rich.table import Table

    from lmops.deploy.compare import parse_duration
    from lmops.serve.smoke import run_smoke
    from lmops.ship.ci import wait_until_served

    _, cfg = _workspace_and_config(workspace, set_)
    wait_s = 0.0 if wait is None else parse_duration(wait, "--wait").total_seconds()
    ready = wait_until_served(url, deployment, version, wait_s)
    sc = cfg.rollout.smoke
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    result = run_smoke(url, deployment, sc.prompts, headers, sc.max_latency_s, sc.max_tokens, model=ready.get("endpoint"))
    table = Table("prompt", "status", "latency s", "problem", title=f"smoke test of {deployment} at {url}",
                  title_justify="left")
    for c in result.checks:
        table.add_row(repr(c["prompt"]), str(c.get("status", "-")), str(c.get("latency_s", "-")),
                      c["problem"] or "[green]ok[/]")
    console.print(table)
    if not result.ok:
        raise LmopsError(f"smoke test of {deployment} failed: {result.message}")
    log(result.message)
