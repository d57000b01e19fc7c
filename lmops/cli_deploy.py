"""The deployment commands, in the style of `az ml online-endpoint / online-deployment`:
`lmops endpoint create|list|show|delete|compare`, `lmops deploy`, `lmops undeploy`, `lmops traffic set`,
`lmops rollout start|status|pause|resume|abort|undo`. Registered on lmops.cli's app when it is imported;
the work is in lmops/deploy and lmops/store, this is only its command line. Every change names the actor
(LMOPS_USER, else the OS user) and takes --reason, both kept in the audit log.
"""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from lmops.cli import SetOpt, WorkspaceOpt, _store, app, console, friendly, log
from lmops.errors import LmopsError

endpoint_app = typer.Typer(help="Endpoints: a stable name served at one URL, holding named deployments and their traffic.", no_args_is_help=True)
app.add_typer(endpoint_app, name="endpoint")
traffic_app = typer.Typer(help="An endpoint's live traffic weights and mirror (shadow) traffic.", no_args_is_help=True)
app.add_typer(traffic_app, name="traffic")
rollout_app = typer.Typer(help="Roll a deployment out (canary steps judged by analysis, or blue-green behind a smoke test), rolled back by itself on failure.", no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")

ReasonOpt = Annotated[Optional[str], typer.Option("--reason", help="Why: kept in the audit log with the change.")]
EndpointOpt = Annotated[str, typer.Option("--endpoint", "-e", help="The endpoint.")]
EndpointArg = Annotated[str, typer.Argument(help="The endpoint.")]
WAIT_POLL_S = 1.0


def _me() -> str:
    from lmops.store import default_actor

    return default_actor()


def _pct(traffic: dict[str, int]) -> str:
    return " ".join(f"{d}={w}" for d, w in sorted(traffic.items()) if w) or "none"


# ----------------------------------------------------------------------------- endpoints

@endpoint_app.command("create")
@friendly
def endpoint_create(name: Annotated[str, typer.Argument(help="Endpoint name: lowercase letters, digits, dashes.")],
                    description: Annotated[str, typer.Option(help="What it serves, for people.")] = "",
                    reason: ReasonOpt = None, workspace: WorkspaceOpt = None):
    """Create an empty endpoint; then `lmops deploy NAME --endpoint E --model REF`."""
    _, _, store = _store(workspace)
    with store:
        store.endpoints.create(name, _me(), description, reason)
    log(f"endpoint {name} created; deploy a model to it: lmops deploy blue --endpoint {name} --model @champion")


@endpoint_app.command("list")
@friendly
def endpoint_list(workspace: WorkspaceOpt = None):
    """Endpoints with their traffic and mirror."""
    from rich.table import Table

    _, _, store = _store(workspace)
    with store:
        eps = store.endpoints.list()
        if not eps:
            log("no endpoints yet: lmops endpoint create NAME")
            return
        table = Table("endpoint", "deployments", "traffic", "mirror", "rollout", "revision", "description")
        for ep in eps:
            r = store.rollouts.latest(ep.name)
            table.add_row(ep.name, " ".join(ep.deployments) or "-", _pct(ep.traffic), _pct(ep.mirror),
                          f"{r.target} {r.status}" if r else "", str(ep.revision), ep.description)
        console.print(table)


@endpoint_app.command("show")
@friendly
def endpoint_show(name: EndpointArg, workspace: WorkspaceOpt = None):
    """One endpoint: its deployments (model, version, settings), traffic, mirror and latest rollout."""
    from rich.table import Table

    _, _, store = _store(workspace)
    with store:
        ep = store.endpoints.get(name)
        r = store.rollouts.latest(name)
    log(f"endpoint {ep.name} (revision {ep.revision}, created {ep.created_at:%Y-%m-%d %H:%M} by {ep.created_by})"
        + (f": {ep.description}" if ep.description else ""))
    table = Table("deployment", "model", "version", "loads", "traffic", "mirror", "runtime", "max_batch", "deployed by")
    for d in ep.deployments.values():
        table.add_row(d.name + (" (stable)" if d.name == ep.stable else ""), d.model_ref, f"{d.model_name} v{d.model_version}",
                      d.model_uri, f"{ep.traffic.get(d.name, 0)}%", f"{ep.mirror[d.name]}%" if d.name in ep.mirror else "",
                      d.runtime or "serve.runtime", str(d.max_batch or "serve.max_batch"),
                      f"{d.created_by} {d.created_at:%Y-%m-%d %H:%M}" if d.created_at else d.created_by or "")
    console.print(table)
    if r is not None:
        log(f"rollout {r.id}: {r.target} ({r.strategy}) {r.status}: {r.message}")


@endpoint_app.command("delete")
@friendly
def endpoint_delete(name: EndpointArg, reason: ReasonOpt = None, workspace: WorkspaceOpt = None):
    """Delete an endpoint and its deployments (refused while a rollout of it is active)."""
    _, _, store = _store(workspace)
    with store:
        if active := store.rollouts.active(name):
            raise LmopsError(f"endpoint {name} has rollout {active[0].id} {active[0].status}; "
                             f"abort it first (lmops rollout abort {name})")
        ep = store.endpoints.delete(name, _me(), reason)
    log(f"endpoint {name} deleted (it had {len(ep.deployments)} deployments)")


@endpoint_app.command("compare")
@friendly
def endpoint_compare(name: EndpointArg,
                     since: Annotated[str, typer.Option(help="How far back: 90s, 30m, 1h, 7d.")] = "1h",
                     workspace: WorkspaceOpt = None):
    """Scored answers per deployment: rows, shadow pairs, prompt and answer NLL, flag rate, answer length,
    stop reasons, time to first token, latency (means with 95% intervals), greedy agreement with the live
    answer."""
    from rich.table import Table

    from lmops.deploy.compare import parse_duration, summarise
    from lmops.store import utcnow

    window = parse_duration(since, "--since")
    _, _, store = _store(workspace)
    with store:
        store.endpoints.get(name)
        scores = store.scores.list(name, since=utcnow() - window)
        feedback = store.feedback.list(endpoint=name, since=utcnow() - window)
        served = [r.deployment for r in store.requests.rows(since=utcnow() - window, endpoint=name,
                                                            columns=("deployment",))] if feedback else []

    def cell(x, spec=".3f"):
        return "" if x is None else str(x) if not isinstance(x, float) else format(x, spec)

    if feedback:  # POST /v1/feedback: users' scores (0..1) of the deployments' completions
        from lmops.deploy.compare import summarise_feedback

        ft = Table("deployment", "feedback", "requests", "per request", "mean score",
                   title=f"{name} feedback, last {since} (mean ± 95% interval)", title_justify="left")
        for f in summarise_feedback(feedback, served):
            ft.add_row(f.deployment or "-", str(f.feedback), str(f.requests), cell(f.rate, ".1%"), cell(f.score))
        console.print(ft)
    if not scores:
        log(f"no scored answers on {name} in the last {since}: answers are scored when the server serves the "
            "endpoint (shadow pairs when a deployment is mirrored: lmops traffic set E ... --mirror NAME=20)")
        return

    def ci(x, spec=".3f"):
        return "" if x is None else x.format(spec)

    table = Table("deployment", "rows", "live", "shadow pairs", "prompt_nll", "answer_nll", "answer_nll vs live",
                  "flagged", "tokens", "stop reasons", "ttft s", "latency s", "agreement",
                  title=f"{name}, last {since} (means ± 95% interval)", title_justify="left")
    for s in summarise(scores):
        stops = ", ".join(f"{k} {v:.0%}" for k, v in s.stop_reasons.items())
        table.add_row(s.deployment, str(s.rows), str(s.live), str(s.shadow), cell(s.prompt_nll), cell(s.answer_nll),
                      cell(s.answer_nll_vs_live), cell(s.flag_rate, ".1%"), ci(s.answer_tokens, ".1f"), stops,
                      ci(s.ttft_s), ci(s.latency_s), cell(s.agreement, ".1%"))
    console.print(table)


# ----------------------------------------------------------------------------- deployments and traffic

@app.command("deploy")
@friendly
def deploy(
    name: Annotated[str, typer.Argument(help="Deployment name, e.g. blue or green.")],
    endpoint: EndpointOpt,
    model: Annotated[str, typer.Option("--model", "-m", help="NAME@alias, NAME@version, a version, models:/..., or a checkpoint / Hugging Face folder; resolved to one version now.")],
    traffic: Annotated[Optional[int], typer.Option(help="Its share of live traffic in percent (taken from the others in proportion). Default: 100 for an endpoint's first deployment, else unchanged (0 for a new one).")] = None,
    runtime: Annotated[Optional[str], typer.Option(help="torch or onnxruntime; default serve.runtime.")] = None,
    max_batch: Annotated[Optional[int], typer.Option(help="Its batch size; default serve.max_batch.")] = None,
    reason: ReasonOpt = None,
    workspace: WorkspaceOpt = None,
    set_: SetOpt = None,
):
    """Add a deployment to an endpoint, or replace the model or settings of one of that name."""
    from lmops.deploy.models import resolve_deployment

    ws, cfg, store = _store(workspace, set_)
    with store:
        store.endpoints.get(endpoint)  # a missing endpoint is named before the registry is asked
        dep = resolve_deployment(ws, cfg, endpoint, name, model, runtime, max_batch)
        ep = store.endpoints.deploy(dep, _me(), traffic, reason)
    log(f"{endpoint}/{name}: {dep.model_name} v{dep.model_version} ({dep.model_uri}); traffic {_pct(ep.traffic)}")


@app.command("undeploy")
@friendly
def undeploy(name: Annotated[str, typer.Argument(help="The deployment to remove.")], endpoint: EndpointOpt,
             reason: ReasonOpt = None, workspace: WorkspaceOpt = None):
    """Remove a deployment that takes no live traffic (move its traffic away first)."""
    _, _, store = _store(workspace)
    with store:
        if any(r.target == name for r in store.rollouts.active(endpoint)):
            raise LmopsError(f"{name} is being rolled out on {endpoint}; abort the rollout first "
                             f"(lmops rollout abort {endpoint})")
        ep = store.endpoints.undeploy(endpoint, name, _me(), reason)
    log(f"{endpoint}/{name} removed; traffic {_pct(ep.traffic)}")


@traffic_app.command("set")
@friendly
def traffic_set(
    endpoint: EndpointArg,
    weights: Annotated[Optional[list[str]], typer.Argument(help="DEPLOYMENT=PERCENT ..., summing to 100 (deployments not named get 0).")] = None,
    mirror: Annotated[Optional[list[str]], typer.Option("--mirror", help="DEPLOYMENT=PERCENT of live requests copied to a deployment at 0% and scored (total at most 50; repeatable; --mirror none clears).")] = None,
    reason: ReasonOpt = None,
    workspace: WorkspaceOpt = None,
):
    """Set an endpoint's live traffic weights and/or mirror traffic."""
    from lmops.deploy.endpoints import parse_weights

    if not weights and mirror is None:
        raise LmopsError("give weights (blue=90 green=10) and/or --mirror green=20")
    live = parse_weights(weights) if weights else None
    shadow = None if mirror is None else {} if mirror == ["none"] else parse_weights(mirror, "--mirror")
    _, _, store = _store(workspace)
    with store:
        if live is not None and (active := store.rollouts.active(endpoint)):
            log(f"[yellow]note:[/] rollout {active[0].id} of {active[0].target} is {active[0].status}; its next step "
                "sets the traffic again (lmops rollout pause|abort to stop it)")
        ep = store.endpoints.set_traffic(endpoint, _me(), live, shadow, reason)
    log(f"{endpoint}: traffic {_pct(ep.traffic)}; mirror {_pct(ep.mirror)}")


# ----------------------------------------------------------------------------- rollouts

def _steps(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise LmopsError(f"--steps {text!r}: comma-separated percentages, e.g. 10,50,100") from None


@rollout_app.command("start")
@friendly
def rollout_start(
    endpoint: EndpointArg,
    to: Annotated[str, typer.Option("--to", help="The deployment to roll out (deployed already, e.g. at 0%).")],
    strategy: Annotated[Optional[str], typer.Option(help="canary or blue-green; default rollout.strategy.")] = None,
    steps: Annotated[Optional[str], typer.Option(help="Canary traffic steps in percent, e.g. 10,50,100; default rollout.steps.")] = None,
    window: Annotated[Optional[str], typer.Option(help="How long each step is held before analysis, e.g. 2m; default rollout.window_s.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Block until it ends: exit 0 on success, 1 on rollback, 2 on timeout (a paused rollout, an approval not given).")] = False,
    timeout: Annotated[str, typer.Option(help="With --wait: give up waiting after this long (the rollout goes on).")] = "1h",
    reason: ReasonOpt = None,
    workspace: WorkspaceOpt = None,
    set_: SetOpt = None,
):
    """Start rolling a deployment out; a server serving the endpoint drives it (lmops serve --endpoint E)."""
    from lmops.deploy import rollout
    from lmops.deploy.compare import parse_duration

    window_s = None if window is None else parse_duration(window, "--window").total_seconds()
    wait_s = parse_duration(timeout, "--timeout").total_seconds()
    _, cfg, store = _store(workspace, set_)
    with store:
        r = rollout.start(store, cfg, endpoint, to, _me(), strategy, _steps(steps), window_s, reason)
        what = f"steps {','.join(map(str, r.steps))}, {r.window_s:g} s each" if r.strategy == "canary" else "smoke test, then switch"
        log(f"rollout {r.id}: {r.stable} -> {r.target} on {endpoint} ({r.strategy}: {what}); "
            f"a server serving {endpoint} drives it; `lmops rollout status {endpoint}` follows it")
        if wait:
            raise typer.Exit(_wait(store, r.id, wait_s))


@rollout_app.command("status")
@friendly
def rollout_status(endpoint: EndpointArg,
                   wait: Annotated[bool, typer.Option("--wait", help="Block until it ends (exit codes as rollout start --wait).")] = False,
                   timeout: Annotated[str, typer.Option(help="With --wait: give up waiting after this long.")] = "1h",
                   workspace: WorkspaceOpt = None):
    """The endpoint's latest rollout: status, step, counts, message and its last analysis."""
    from rich.table import Table

    from lmops.deploy.compare import parse_duration

    _, _, store = _store(workspace)
    with store:
        r = store.rollouts.latest(endpoint)
        if r is None:
            store.endpoints.get(endpoint)
            raise LmopsError(f"endpoint '{endpoint}' has no rollout; start one with `lmops rollout start {endpoint} --to NAME`")
        if wait:
            raise typer.Exit(_wait(store, r.id, parse_duration(timeout, "--timeout").total_seconds()))
    log(f"rollout {r.id} on {r.endpoint}: {r.stable} -> {r.target} ({r.strategy}), [bold]{r.status}[/]\n"
        f"  {_progress(r)}\n  started {r.started_at:%Y-%m-%d %H:%M:%S} by {r.started_by}"
        + (f" ({r.reason})" if r.reason else "")
        + f"; analyses {len(r.analyses)}, failures {r.failures}, inconclusive in a row {r.inconclusive}, errors in a row {r.errors}"
        + (f"\n  driven by {r.driver} (lease until {r.lease_until:%H:%M:%S})" if r.driver and r.lease_until else "")
        + f"\n  {r.message}")
    last = next((a for a in reversed(r.analyses) if "measurements" in a), None)
    if last is not None:
        table = Table("metric", "canary", "n", "stable", "n", "outcome", "why",
                      title=f"last analysis: {last['outcome']} (step {last['step'] + 1}, {last['share']}%)", title_justify="left")
        for m in last["measurements"]:
            style = {"failed": "red", "successful": "green"}.get(m["outcome"], "yellow")
            table.add_row(m["metric"], _num(m["canary"]), str(m["canary_n"]), _num(m["stable"]), str(m["stable_n"]),
                          f"[{style}]{m['outcome']}[/]", m["why"])
        console.print(table)


def _num(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def _progress(r) -> str:
    if r.strategy == "blue-green":
        return "smoke test of the new deployment" if r.step_index == 0 and r.active else "switched"
    return f"step {r.step_index + 1}/{len(r.steps)}: {r.target} at {r.steps[r.step_index]}%"


def _wait(store, rollout_id: int, timeout_s: float) -> int:
    """Poll the store until the rollout ends, a line per change: 0 succeeded, 1 aborted or undone, 2 timed out."""
    deadline = time.monotonic() + timeout_s
    last = None
    with console.status("waiting for the rollout") as status:
        while True:
            r = store.rollouts.get(rollout_id)
            line = f"{r.status}: {_progress(r)}: {r.message}"
            if line != last:
                log(f"rollout {r.id} {line}")
                status.update(f"rollout {r.id}: {r.status}, {_progress(r)}")
                last = line
            if r.status == "succeeded":
                return 0
            if r.status in ("aborted", "undone"):
                return 1
            if time.monotonic() >= deadline:
                log(f"[yellow]still {r.status} after the --timeout; the rollout goes on[/]")
                return 2
            time.sleep(WAIT_POLL_S)


@rollout_app.command("pause")
@friendly
def rollout_pause(endpoint: EndpointArg, reason: ReasonOpt = None, workspace: WorkspaceOpt = None):
    """Hold the rollout at its current step (traffic stays as it is)."""
    from lmops.deploy import rollout

    _, _, store = _store(workspace)
    with store:
        r = rollout.pause(store, endpoint, _me(), reason)
    log(f"rollout {r.id} paused at {_progress(r)}; `lmops rollout resume {endpoint}` continues it")


@rollout_app.command("resume")
@friendly
def rollout_resume(endpoint: EndpointArg, reason: ReasonOpt = None, workspace: WorkspaceOpt = None):
    """Continue a paused rollout: its next analysis is one window from now."""
    from lmops.deploy import rollout

    _, _, store = _store(workspace)
    with store:
        r = rollout.resume(store, endpoint, _me(), reason)
    log(f"rollout {r.id} running again at {_progress(r)}")


@rollout_app.command("abort")
@friendly
def rollout_abort(endpoint: EndpointArg, reason: ReasonOpt = None, workspace: WorkspaceOpt = None):
    """Stop the rollout and send all traffic back to the stable deployment."""
    from lmops.deploy import rollout

    _, _, store = _store(workspace)
    with store:
        r = rollout.abort(store, endpoint, _me(), reason)
        traffic = store.endpoints.get(endpoint).traffic
    log(f"rollout {r.id} aborted; traffic {_pct(traffic)}")


@rollout_app.command("undo")
@friendly
def rollout_undo(endpoint: EndpointArg, reason: ReasonOpt = None, workspace: WorkspaceOpt = None):
    """Put the endpoint back as before its latest rollout (traffic and champion alias).

    The traffic moves at once (the old deployment is still deployed); the champion alias goes back to
    the version it was on, if the rollout moved it and nobody moved it since."""
    from lmops.deploy import rollout

    ws, cfg, store = _store(workspace)
    with store:
        ep = store.endpoints.get(endpoint)
        restored: list[str] = []

        def restore_champion(r) -> str | None:
            from lmops import registry

            dep = ep.deployments.get(r.target)
            if dep is None:
                return None
            try:
                current = str(registry.resolve(ws, cfg, f"{dep.model_name}@{registry.CHAMPION}").version)
            except LmopsError:
                return None
            if current != r.promoted_version:
                return None  # moved since by someone else: leave it
            actor = _me()
            restored.append(r.champion_before)
            return registry.promote(ws, cfg, f"{dep.model_name}@{r.champion_before}",
                                    audit=lambda a, s, d, why=None: store.audit.append(actor, a, s, d, why),
                                    force_reason=f"undo of rollout {r.id}" + (f": {reason}" if reason else ""))

        r = rollout.undo(store, endpoint, _me(), reason, restore_champion)
        traffic = store.endpoints.get(endpoint).traffic
    log(f"rollout {r.id} undone; traffic {_pct(traffic)}"
        + (f"; champion back to v{restored[0]}" if restored else ""))
