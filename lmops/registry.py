"""The model registry: versions of a model, their evidence, and the alias that says which to serve.

Built on the MLflow Model Registry at the tracking URI (lmops/tracking.py). A version is the run's
logged MLflow model (tracking.log_model: weights-only checkpoint + tokenizer, a pyfunc that generates
text, so `mlflow.pyfunc.load_model("models:/NAME@champion")` works), tagged with what it was made
from (dataset version, run, git commit, tokenizer and checkpoint sha256) and its gate verdict
(`gates=passed|failed`), with a model card. Its evaluation is `eval.<metric>` MLflow metrics of the
run, linked to the logged model. Two aliases carry the life cycle:
- challenger: the last registered version;
- champion: the promoted version, the one to serve. `promote` moves it only when the version passes
  the gates again, relative gates judged against the champion of that moment (not the one at
  registration), and, with registry.require_approval, after an approver's `approve`.
  `force_reason` overrides failed gates (never a missing approval) and is audited as such.

State changes call `audit(action, subject, details, reason)` when given (Store.audit with the actor
bound, in the CLI), subject `model:NAME/VERSION`: model.registered, model.alias_set (challenger),
model.approved, model.gate_overridden, model.promoted (the champion alias moved).

Registration is idempotent per run and checkpoint: a version already made from them is returned,
and one a crash left unfinished (no `lmops.registration=complete` tag) is finished: model card,
audit entries, challenger alias, each step done once and marked on the version. A kill at any point
leaves either no version or one the next `register` completes; the window between an audit entry
and its mark is the only place a crash can repeat an entry (never lose one).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from lmops import tracking
from lmops.checkpoint import CKPT_NAME
from lmops.config import Config
from lmops.errors import LmopsError
from lmops.evaluate import GateResult, check_gates, scalar_metrics
from lmops.util import first_line, sha256_file
from lmops.workspace import Workspace

Audit = Callable[[str, str, dict, str | None], None]

CHAMPION, CHALLENGER = "champion", "challenger"
TAG_GATES = "gates"  # passed | failed (at registration)
TAG_GATES_FAILED = "gates.failed"
TAG_APPROVED_BY, TAG_APPROVED_AT = "approved_by", "approved_at"
TAG_MODEL_CARD = "model_card"
TAG_OVERRIDE = "gate_override"
# JSON {version, dataset, metrics}: the champion of the time measured on this version's validation split
# (stages.champion_on_this_split); promote compares with it while that version is still the champion
TAG_CHAMPION_BASIS = "lmops.champion_basis"
TAG_NEEDS_APPROVAL = "lmops.needs_approval"  # why this version needs an approver, whatever require_approval
EVAL_PREFIX = "eval."  # evaluation metrics (MLflow metrics; tags on versions registered before)
TAG_STATE = "lmops.registration"  # "complete" once card, audit entries and alias are done
TAG_DONE = "lmops.registration.done."  # + step: a completion step done (card, registered, challenger)
DESCRIPTION_LIMIT = 5000  # MLflow's column for a version's description


def _subject(name: str, version: str | int) -> str:
    return f"model:{name}/{version}"


def _audit(audit: Audit | None, action: str, subject: str, details: dict, reason: str | None = None) -> None:
    if audit is not None:
        audit(action, subject, details, reason)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _mlflow_error(what: str, err: MlflowException) -> LmopsError:
    return LmopsError(f"{what}: MLflow failed ({first_line(err)})")


# ----------------------------------------------------------------------------- register

def register(ws: Workspace, cfg: Config, run_id: str, ckpt_path: Path, eval_results: dict,
             gate_results: list[GateResult], dataset_id: str | None, audit: Audit | None = None) -> str:
    """Register the run's checkpoint as a version of registry.model_name (its MLflow model), alias
    it challenger, write its model card; return the version number.

    The checkpoint is logged to the run as an MLflow model first unless the run's model is of this
    very file (same sha256), so a version always holds the bytes that were evaluated; eval_results
    become `eval.<metric>` metrics linked to that model (unless they are there already, as
    evaluate.log_evaluation logs them). Idempotent: a version of this run and checkpoint is returned
    (and finished, if a crash stopped its registration) instead of registering another.
    """
    c = tracking.client(ws, cfg)
    name = cfg.registry.model_name
    ckpt_path = Path(ckpt_path)
    if ckpt_path.is_dir():
        ckpt_path = ckpt_path / CKPT_NAME
    try:
        run = c.get_run(run_id)
    except MlflowException as err:
        raise LmopsError(f"run {run_id}: not found at {tracking.tracking_uri(ws, cfg)} "
                         f"({first_line(err)}); register a run of this workspace's tracking store") from None
    sha = sha256_file(ckpt_path)
    gate_results = [GateResult(**g) if isinstance(g, dict) else g for g in gate_results]  # as stored in JSON
    try:
        try:
            c.get_registered_model(name)
        except MlflowException:
            c.create_registered_model(name, description="Language models trained with lmops; "
                                      "alias 'champion' is the one to serve, 'challenger' the newest.")
        mv = _version_of(c, name, run_id, sha)
        if mv is None:
            model_id = _model_of(c, run, sha)
            if model_id is None:
                tracking.log_model(run_id, ckpt_path, c)
                run = c.get_run(run_id)
                model_id = run.data.tags[tracking.TAG_MODEL_ID]
            _link_evaluation(c, run_id, model_id, eval_results)
            tags = _version_tags(c, run, model_id, sha, gate_results, dataset_id)
            if eval_results.get("champion_basis"):  # the champion on this version's validation split
                tags[TAG_CHAMPION_BASIS] = json.dumps(eval_results["champion_basis"], sort_keys=True)
            mv = c.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, tags=tags,
                                        model_id=model_id)
        if (mv.tags or {}).get(TAG_STATE) != "complete":
            _complete(c, mv, run, ckpt_path, eval_results, gate_results, audit)
    except MlflowException as err:
        raise _mlflow_error(f"registering run {run_id} as {name}", err) from None
    return str(mv.version)


def _quoted(value: str) -> str:
    """value in an MLflow filter string, which has no escapes: quoted with a quote it does not hold."""
    quote = next((q for q in ("'", '"') if q not in value), None)
    if quote is None:
        raise LmopsError(f"{value!r}: a model name or run id may not hold both kinds of quote")
    return f"{quote}{value}{quote}"


def _version_of(c: MlflowClient, name: str, run_id: str, sha: str) -> ModelVersion | None:
    """The (first) version of name registered from run_id's checkpoint with this sha256."""
    found = c.search_model_versions(f"name = {_quoted(name)} and run_id = {_quoted(run_id)}")
    mine = [mv for mv in found if (mv.tags or {}).get(tracking.TAG_CHECKPOINT_SHA) == sha]
    return min(mine, key=lambda mv: int(mv.version)) if mine else None


def _model_of(c: MlflowClient, run, sha: str) -> str | None:
    """The id of the run's logged model of the checkpoint with this sha256, None if it has none."""
    tags = run.data.tags
    model_id = tags.get(tracking.TAG_MODEL_ID)
    if not model_id or tags.get(tracking.TAG_CHECKPOINT_SHA) != sha:
        return None
    try:
        c.get_logged_model(model_id)
    except MlflowException:
        return None  # deleted since
    return model_id


def _version_tags(c: MlflowClient, run, model_id: str, sha: str, gate_results: list[GateResult],
                  dataset_id: str | None) -> dict[str, str]:
    rtags = run.data.tags
    dataset_id = dataset_id or (tracking.training_dataset(run) or {}).get("id") or rtags.get(tracking.TAG_DATASET)
    failed = [g.name for g in gate_results if not g.passed]
    tags = {
        tracking.TAG_RUN: rtags.get(tracking.TAG_RUN, run.info.run_name or ""),
        "run_id": run.info.run_id,
        tracking.TAG_GIT_COMMIT: rtags.get(tracking.TAG_GIT_COMMIT, "unknown"),
        tracking.TAG_TOKENIZER: rtags.get(tracking.TAG_TOKENIZER, "unknown"),
        tracking.TAG_CHECKPOINT_SHA: sha,
        tracking.TAG_MODEL_ID: model_id,
        tracking.TAG_VERSION: rtags.get(tracking.TAG_VERSION, tracking.lmops_version()),
        TAG_GATES: "failed" if failed else "passed",
    }
    model_tags = c.get_logged_model(model_id).tags
    for key in (tracking.TAG_WEIGHTS_SHA, tracking.TAG_ADAPTER_SHA, tracking.TAG_LORA):  # a LoRA model: no weights
        if model_tags.get(key):
            tags[key] = model_tags[key]
    for key in (tracking.TAG_BASE, tracking.TAG_BASE_SHA):  # a warm start's (and a LoRA adapter's) base
        if rtags.get(key):
            tags[key] = rtags[key]
    if dataset_id:
        tags[tracking.TAG_DATASET] = dataset_id
    if failed:
        tags[TAG_GATES_FAILED] = ",".join(failed)
    return tags


def _link_evaluation(c: MlflowClient, run_id: str, model_id: str, results: dict) -> None:
    """results' numbers as eval.<metric> metrics of the run linked to its model, unless the model
    has exactly these already (evaluate.log_evaluation links them when it knows the model)."""
    scalars = scalar_metrics(results)
    if _same(_model_evaluation(c, model_id), scalars):
        return
    ts, step = int(time.time() * 1000), int(results.get("checkpoint_step", 0) or 0)
    metrics = [Metric(f"{EVAL_PREFIX}{k}", v, ts, step, model_id=model_id) for k, v in scalars.items()]
    for i in range(0, len(metrics), 1000):
        c.log_batch(run_id, metrics=metrics[i:i + 1000])


def _same(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or math.isnan(a[k]) and math.isnan(b[k]) for k in a)


def _complete(c: MlflowClient, mv: ModelVersion, run, ckpt_path: Path, results: dict,
              gate_results: list[GateResult], audit: Audit | None) -> None:
    """Finish a version's registration: model card, the model.registered audit entry, the
    challenger alias (and its audit entry), then the completion tag. Each step is marked on the
    version when done, so a re-run after a crash does only what is left."""
    name, version = mv.name, str(mv.version)
    tags = dict(mv.tags or {})
    run_id = run.info.run_id

    def done(step: str) -> bool:
        return tags.get(TAG_DONE + step) == "1"

    def mark(step: str) -> None:
        c.set_model_version_tag(name, version, TAG_DONE + step, "1")

    if not done("card"):
        card = model_card(name, version, run, ckpt_path, results, gate_results, tags.get(tracking.TAG_DATASET))
        card_file = f"model_cards/{name}-v{version}.md"
        c.log_text(run_id, card, card_file)
        c.set_model_version_tag(name, version, TAG_MODEL_CARD, f"{run.info.artifact_uri}/{card_file}")
        description = card if len(card) <= DESCRIPTION_LIMIT else card[:DESCRIPTION_LIMIT - 200] + \
            f"\n\n(cut; the whole card is the run artifact {card_file})"
        c.update_model_version(name, version, description=description)
        mark("card")
    if not done("registered"):
        finite = {k: v for k, v in scalar_metrics(results).items() if math.isfinite(v)}  # audit JSON has no NaN
        _audit(audit, "model.registered", _subject(name, version),
               {"run_id": run_id, "dataset_id": tags.get(tracking.TAG_DATASET), "gates": tags.get(TAG_GATES),
                "checkpoint_sha256": tags.get(tracking.TAG_CHECKPOINT_SHA), "model_uri": mv.source,
                "metrics": finite})
        mark("registered")
    if not done("challenger"):
        current = _aliases(c, name).get(CHALLENGER)
        if current is None or int(current) <= int(version):  # a newer version registered meanwhile keeps it
            _move_alias(c, name, CHALLENGER, version, audit, "model.alias_set")
        mark("challenger")
    c.set_model_version_tag(name, version, TAG_STATE, "complete")


def _move_alias(c: MlflowClient, name: str, alias: str, version: str, audit: Audit | None, action: str,
                details: dict | None = None, reason: str | None = None) -> None:
    previous = _aliases(c, name).get(alias)
    c.set_registered_model_alias(name, alias, version)
    _audit(audit, action, _subject(name, version),
           {"alias": alias, "from": previous, "to": version} | (details or {}), reason)


def _aliases(c: MlflowClient, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in (c.get_registered_model(name).aliases or {}).items()}


# ----------------------------------------------------------------------------- promote and approve

def eval_metrics(mv: ModelVersion, client: MlflowClient | None = None) -> dict[str, float]:
    """A version's evaluation: the eval.<metric> metrics linked to its model (the newest value of
    each); for a version registered before they were metrics, its eval.<metric> tags."""
    model_id = model_id_of(mv)
    if model_id:
        found = _model_evaluation(client or MlflowClient(), model_id)
        if found:
            return found
    out = {}
    for key, value in (mv.tags or {}).items():
        if key.startswith(EVAL_PREFIX):
            try:
                out[key.removeprefix(EVAL_PREFIX)] = float(value)
            except ValueError:
                continue
    return out


def model_id_of(mv: ModelVersion) -> str | None:
    """The id of the logged MLflow model a version is (MLflow's SQL registry does not keep
    ModelVersion.model_id: the version's tag, else its models:/m-... source), None for a version
    registered before lmops logged MLflow models."""
    source = mv.source or ""
    from_source = source.removeprefix("models:/") if re.fullmatch(r"models:/m-[0-9a-f]+", source) else None
    return mv.model_id or (mv.tags or {}).get(tracking.TAG_MODEL_ID) or from_source


def _model_evaluation(c: MlflowClient, model_id: str) -> dict[str, float]:
    """metric -> the newest eval.<metric> value linked to the logged model."""
    try:
        metrics = c.get_logged_model(model_id).metrics or []
    except MlflowException:
        return {}
    newest: dict[str, Metric] = {}
    for m in metrics:
        if m.key.startswith(EVAL_PREFIX) and (m.key not in newest or m.timestamp >= newest[m.key].timestamp):
            newest[m.key] = m
    return {k.removeprefix(EVAL_PREFIX): float(m.value) for k, m in newest.items()}


def champion_metrics(ws: Workspace, cfg: Config) -> dict[str, float] | None:
    """The current champion's evaluation (for check_gates), None while there is none."""
    c = tracking.client(ws, cfg)
    name = cfg.registry.model_name
    try:
        version = _aliases(c, name).get(CHAMPION)
    except MlflowException:
        return None  # no registered model yet
    return eval_metrics(c.get_model_version(name, version), c) if version else None


def promote(ws: Workspace, cfg: Config, ref: str = CHALLENGER, audit: Audit | None = None,
            force_reason: str | None = None) -> str:
    """Move the champion alias to ref's version if it passes evaluate.gates against the current
    champion (and is approved when registry.require_approval); return the version.

    force_reason: promote even though gates fail; the override and its reason are audited.
    Promoting the champion again does nothing.
    """
    c = tracking.client(ws, cfg)
    mv = resolve(ws, cfg, ref)
    name, version = mv.name, str(mv.version)
    current = _aliases(c, name).get(CHAMPION)
    if current == version:
        return version
    champion = eval_metrics(c.get_model_version(name, current), c) if current else None
    basis = json.loads((mv.tags or {}).get(TAG_CHAMPION_BASIS) or "{}")
    if champion is not None and basis.get("version") == current:  # measured on this version's split
        champion = {**champion, **basis["metrics"]}
    gates = check_gates(eval_metrics(mv, c), cfg.evaluate.gates, champion)
    failed = [g for g in gates if not g.passed]
    if failed and force_reason is None:
        listed = "; ".join(f"{g.name}: {g.detail}" for g in failed)
        raise LmopsError(f"{name} v{version} not promoted, gates failed ({listed}); champion stays "
                         f"{'v' + current if current else 'unset'}; train a better model, or force with a reason")
    if failed and not force_reason.strip():
        raise LmopsError(f"{name} v{version}: a gate override needs a reason; say why the failed gates do not matter")
    missing = approval_missing(cfg, mv)
    if missing:
        raise LmopsError(missing)
    details = {"previous_champion": current, "gates": {g.name: g.passed for g in gates}}
    try:
        if failed:
            c.set_model_version_tag(name, version, TAG_OVERRIDE, force_reason)
            _audit(audit, "model.gate_overridden", _subject(name, version),
                   {"failed": {g.name: g.detail for g in failed}, "previous_champion": current}, force_reason)
        _move_alias(c, name, CHAMPION, version, audit, "model.promoted", details, force_reason)
    except MlflowException as err:
        raise _mlflow_error(f"promoting {name} v{version}", err) from None
    return version


def approval_missing(cfg: Config, mv: ModelVersion) -> str | None:
    """Why mv may not become champion yet for want of an approval (registry.require_approval, or the
    version's own TAG_NEEDS_APPROVAL, which the loop sets with loop.approve_before_promotion); None: it may."""
    tags = mv.tags or {}
    why = "registry.require_approval" if cfg.registry.require_approval else tags.get(TAG_NEEDS_APPROVAL)
    if not why:
        return None
    approver, allowed = tags.get(TAG_APPROVED_BY), cfg.registry.approvers
    if approver and (not allowed or approver in allowed):
        return None
    who = f"one of {', '.join(allowed)}" if allowed else "an approver"
    return (f"{mv.name} v{mv.version} needs approval by {who} before promotion ({why}); "
            f"run `lmops approve {mv.version}`")


def approve(ws: Workspace, cfg: Config, version: str, approver: str, audit: Audit | None = None) -> str:
    """Record approver's approval of a version (a ref works too); return the version."""
    allowed = cfg.registry.approvers
    if allowed and approver not in allowed:
        raise LmopsError(f"{approver!r} may not approve: registry.approvers is {', '.join(allowed)}; ask one of them")
    c = tracking.client(ws, cfg)
    mv = resolve(ws, cfg, str(version))
    name, v = mv.name, str(mv.version)
    c.set_model_version_tag(name, v, TAG_APPROVED_BY, approver)
    c.set_model_version_tag(name, v, TAG_APPROVED_AT, _now())
    _audit(audit, "model.approved", _subject(name, v), {"approver": approver, "gates": (mv.tags or {}).get(TAG_GATES)})
    return v


# ----------------------------------------------------------------------------- look-ups

_VERSION = re.compile(r"v?(\d+)")


def resolve(ws: Workspace, cfg: Config, ref: str) -> ModelVersion:
    """The model version a reference names: NAME@alias, NAME@3, @alias, 3 (or v3), a bare alias
    (`champion`), or an MLflow URI models:/NAME/3, models:/NAME@alias. The name defaults to
    registry.model_name."""
    c = tracking.client(ws, cfg)
    name, sel = cfg.registry.model_name, ref.strip()
    if sel.startswith("models:/"):
        rest = sel.removeprefix("models:/")
        name, sel = rest.split("@", 1) if "@" in rest else rest.rsplit("/", 1) if "/" in rest else (rest, "")
    elif "@" in sel:
        head, sel = sel.split("@", 1)
        name = head or name
    if not sel:
        raise LmopsError(f"model reference {ref!r}: say which version, e.g. {name}@champion or {name}@3")
    try:
        aliases = _aliases(c, name)
    except MlflowException:
        raise LmopsError(f"no registered model '{name}' at {tracking.tracking_uri(ws, cfg)}; "
                         "register one first (`lmops register`)") from None
    number = _VERSION.fullmatch(sel)
    version = number[1] if number else aliases.get(sel)
    if version is None:
        known = ", ".join(f"{a} (v{v})" for a, v in sorted(aliases.items())) or "none yet"
        raise LmopsError(f"{name}@{sel}: no such alias (aliases: {known}); promote or register a version first")
    try:
        return c.get_model_version(name, version)
    except MlflowException:
        raise LmopsError(f"{name} has no version {version}; list them in `mlflow ui` or use an alias") from None


def lineage(ws: Workspace, cfg: Config, ref: str) -> dict:
    """Where a version came from: version -> run -> dataset version (the run's MLflow input, else its
    tag) -> tokenizer -> code, and its aliases, evaluation (metrics), gates and approval."""
    c = tracking.client(ws, cfg)
    mv = resolve(ws, cfg, ref)
    tags = mv.tags or {}
    try:
        run = c.get_run(mv.run_id) if mv.run_id else None
    except MlflowException:
        run = None  # deleted since: the version's own tags still tell the story
    rtags = run.data.tags if run else {}

    def tag(key: str) -> str | None:
        return tags.get(key) or rtags.get(key)

    return {
        "model": {
            "name": mv.name, "version": str(mv.version), "aliases": sorted(mv.aliases or []), "source": mv.source,
            "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc).isoformat(timespec="seconds"),
            "gates": tags.get(TAG_GATES), "gates_failed": tags.get(TAG_GATES_FAILED),
            "approved_by": tags.get(TAG_APPROVED_BY), "gate_override": tags.get(TAG_OVERRIDE),
            "model_card": tags.get(TAG_MODEL_CARD), "checkpoint_sha256": tags.get(tracking.TAG_CHECKPOINT_SHA),
            "model_id": model_id_of(mv), "complete": tags.get(TAG_STATE) == "complete",
        },
        "run": {
            "id": mv.run_id, "name": run.info.run_name if run else tag(tracking.TAG_RUN),
            "status": run.info.status if run else "deleted", "experiment_id": run.info.experiment_id if run else None,
            "checkpoint_step": rtags.get(tracking.TAG_CHECKPOINT_STEP),
        },
        "base": {"model": tag(tracking.TAG_BASE), "sha256": tag(tracking.TAG_BASE_SHA),  # a warm start's
                 "lora": json.loads(tag(tracking.TAG_LORA) or "null"),  # a LoRA fine-tune's settings
                 "adapter": bool(tag(tracking.TAG_ADAPTER_SHA))},  # the version holds the adapter alone
        "dataset": _dataset_lineage(ws, (tracking.training_dataset(run) or {}).get("id") or tag(tracking.TAG_DATASET)),
        "tokenizer": {"sha256": tag(tracking.TAG_TOKENIZER)},
        "code": {"git_commit": tag(tracking.TAG_GIT_COMMIT), "git_repo": rtags.get(tracking.TAG_GIT_REPO),
                 "lmops_version": tag(tracking.TAG_VERSION)},
        "eval": eval_metrics(mv, c),
        "loop": _loop_lineage(ws, cfg, str(mv.version)),
    }


def _loop_lineage(ws: Workspace, cfg: Config, version: str) -> dict | None:
    """The loop run that made version (lmops/loop.py): the alert, the request-log window, the rollout, the
    endpoint; None for a version trained otherwise."""
    from lmops.store import Store

    with Store.for_workspace(ws, cfg) as store:
        runs = [r for r in store.loop.list(500) if r.details.get("version") == version]
        if not runs:
            return None
        r = runs[0]
        alert = next((a for a in store.alerts.list(1000, endpoint=r.endpoint) if a.id == r.alert_id), None)
        rollout = store.rollouts.get(r.details["rollout"]) if r.details.get("rollout") else None
    return {"run": r.id, "status": r.status, "outcome": r.outcome, "reason": r.reason, "endpoint": r.endpoint,
            "alert": {"id": alert.id, "signal": alert.signal, "message": alert.message} if alert else None,
            "window": [t.isoformat(timespec="seconds") if t else None for t in (r.window_start, r.window_end)],
            "base": r.details.get("base"), "dataset": r.details.get("dataset"),
            "rollout": {"id": rollout.id, "status": rollout.status, "deployment": rollout.target} if rollout else None}


def _dataset_lineage(ws: Workspace, dataset_id: str | None) -> dict:
    """The dataset version and the corpus files it was made from (when the version is in this workspace)."""
    from lmops.data.dataset import load_dataset

    out: dict = {"id": dataset_id}
    if dataset_id:
        try:
            version = load_dataset(ws.state, dataset_id)
        except LmopsError:
            return out
        out["documents"] = version.manifest["totals"]["documents"]
        from lmops.data.production import describe

        out["production"] = describe(version)  # where its production prompts came from, if any
        out["sources"] = [{"path": s.get("path"), "sha256": s.get("sha256")} for s in version.report.get("sources", [])]
    return out


def render_lineage(lin: dict):
    """lineage() as a rich Tree, from the version down to the code."""
    from rich.tree import Tree

    m, r = lin["model"], lin["run"]
    aliases = f" [bold cyan]@{', @'.join(m['aliases'])}[/]" if m["aliases"] else ""
    gates = {"passed": "[green]gates passed[/]", "failed": "[red]gates failed[/]"}.get(m["gates"] or "", "gates ?")
    root = Tree(f"[bold]{m['name']} v{m['version']}[/]{aliases}  {gates}"
                + (f", approved by {m['approved_by']}" if m["approved_by"] else "")
                + (f", [yellow]override: {m['gate_override']}[/]" if m["gate_override"] else ""))
    run = root.add(f"run [bold]{r['name']}[/] {r['id']} ({r['status']}"
                   + (f", step {r['checkpoint_step']}" if r["checkpoint_step"] else "") + ")")
    loop = lin.get("loop")
    if loop:
        a = loop["alert"]
        trigger = root.add(f"loop run {loop['run']} ({loop['outcome'] or loop['status']}; `lmops loop status "
                           f"{loop['run']}`)" + (f": alert {a['id']} {a['signal']}" if a else ": started by hand"))
        trigger.add(f"request log of {loop['endpoint']}: {loop['window'][0]} .. {loop['window'][1]}")
        if loop["rollout"]:
            ro = loop["rollout"]
            trigger.add(f"rollout {ro['id']} of {ro['deployment']} on endpoint {loop['endpoint']}: {ro['status']} "
                        f"(`lmops rollout status {loop['endpoint']}`)")
    base = lin.get("base") or {}
    if base.get("model"):
        lora = base.get("lora")
        run.add(f"started from [bold]{base['model']}[/]  sha256 {(base['sha256'] or '?')[:12]}"
                + (f"  (`lmops lineage {base['model']}`)" if "@" in base["model"] else "")
                + (f"; LoRA r={lora['r']} on {', '.join(lora['target_modules'])}"
                   + (", the version holds the adapter" if base.get("adapter") else ", registered merged")
                   if lora else ""))
    ds = lin["dataset"]
    dataset = run.add(f"dataset {ds['id'] or '(not recorded)'}"
                      + (f" ({ds['documents']} documents)" if "documents" in ds else ""))
    for line in ds.get("production", []):
        dataset.add(line.strip())
    sources = ds.get("sources", [])
    if sources:
        files = dataset.add(f"{len(sources)} corpus file(s)")
        for src in sources[:5]:
            files.add(f"{src['path']}  sha256 {(src['sha256'] or '?')[:12]}")
        if len(sources) > 5:
            files.add(f"... and {len(sources) - 5} more (`lmops data show {ds['id'][:12]}`)")
    tok = dataset.add(f"tokenizer sha256 {(lin['tokenizer']['sha256'] or '?')[:16]}")
    code = lin["code"]
    tok.add(f"code git {(code['git_commit'] or 'unknown')[:12]}"
            + (f" ({code['git_repo']})" if code["git_repo"] and code["git_repo"] != "none" else "")
            + f", lmops {code['lmops_version'] or '?'}")
    if lin["eval"]:
        ev = root.add("evaluation")
        for key in ("val_bpb", "val_loss", "safety_pass_rate", "distinct_2", "repetition", "decode_tokens_per_s"):
            if key in lin["eval"]:
                ev.add(f"{key} {lin['eval'][key]:.4g}")
    return root


def download_checkpoint(ws: Workspace, cfg: Config, ref: str) -> Path:
    """The version's weights-only checkpoint as a local file, its tokenizer beside it (for Checkpoint
    and load_tokenizer): .lmops/models/NAME/VERSION/ckpt.safetensors, the `model` artifact of its
    MLflow model, downloaded once (no progress bars) and checked against the sha256 recorded at
    registration. A version registered before MLflow models gives its run's training checkpoint.
    A LoRA version's artifact is its adapter (lmops/lora.py): the adapter (checked against its sha256)
    is merged onto its base version's checkpoint (downloaded the same way, checked against the sha256
    the run started from) into that file, once, the adapter files kept beside it."""
    from lmops import lora, mlflow_model

    mv = resolve(ws, cfg, ref)
    name, version = mv.name, str(mv.version)
    dest = ws.state / "models" / name / version
    ckpt = dest / CKPT_NAME
    if ckpt.is_file():
        return ckpt
    import mlflow.artifacts

    tags = mv.tags or {}
    tmp = dest.with_name(f".{version}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        uri = tracking.client(ws, cfg).get_model_version_download_uri(name, version)
        if model_id_of(mv):
            uri, want = f"{uri.rstrip('/')}/artifacts/{mlflow_model.ARTIFACT}", tags.get(tracking.TAG_WEIGHTS_SHA)
        else:
            want = tags.get(tracking.TAG_CHECKPOINT_SHA)
        with tracking.quiet_downloads():
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp),
                                                             tracking_uri=tracking.tracking_uri(ws, cfg)))
        got = local / CKPT_NAME
        if not got.is_file() and lora.is_adapter(local):
            _merge_adapter(ws, cfg, local, f"{name} v{version}", tags.get(tracking.TAG_ADAPTER_SHA))
            want = None  # made here, of checked parts
        if not got.is_file():
            raise LmopsError(f"{name} v{version}: its artifacts at {uri} hold no {CKPT_NAME}; "
                             "register the run's checkpoint again")
        if want and sha256_file(got) != want:
            raise LmopsError(f"{name} v{version}: downloaded checkpoint does not match the sha256 recorded at "
                             f"registration; its artifacts at {uri} were changed, register it again")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(local, dest)
    except MlflowException as err:
        raise _mlflow_error(f"downloading {name} v{version}", err) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ckpt


def _merge_adapter(ws: Workspace, cfg: Config, folder: Path, what: str, adapter_sha: str | None) -> None:
    """folder (a LoRA version's downloaded artifact) gets ckpt.safetensors: its adapter merged onto its base."""
    from lmops import lora
    from lmops.checkpoint import Checkpoint, save_checkpoint

    if adapter_sha and sha256_file(folder / lora.ADAPTER_WEIGHTS) != adapter_sha:
        raise LmopsError(f"{what}: downloaded adapter does not match the sha256 recorded at registration; its "
                         "artifacts were changed, register it again")
    base = lora.read_info(folder)["base"]
    base_ckpt = download_checkpoint(ws, cfg, base["version"])
    if sha256_file(base_ckpt) != base["sha256"]:
        raise LmopsError(f"{what}: a LoRA adapter of {base['version']}, whose weights are not the ones it was trained "
                         f"on (sha256 {base['sha256'][:12]}); its base version was changed")
    model = lora.merged_model(folder, Checkpoint(base_ckpt).model())
    save_checkpoint(folder / CKPT_NAME, model, meta=lora.read_info(folder)["meta"])


def list_versions(ws: Workspace, cfg: Config) -> list[dict]:
    """The versions of registry.model_name, newest first: version, aliases, created, run (id and
    name), gates verdict, approved_by, whether its registration is complete, and key metrics
    (val_bpb, val_loss, safety_pass_rate; None when not evaluated). [] when nothing is registered."""
    c = tracking.client(ws, cfg)
    name = cfg.registry.model_name
    try:
        aliases = _aliases(c, name)
    except MlflowException:
        return []
    by_version: dict[str, list[str]] = {}
    for alias, v in aliases.items():
        by_version.setdefault(v, []).append(alias)
    out = []
    for mv in sorted(c.search_model_versions(f"name = {_quoted(name)}"), key=lambda mv: -int(mv.version)):
        tags = mv.tags or {}
        metrics = eval_metrics(mv, c)
        out.append({
            "version": str(mv.version), "aliases": sorted(by_version.get(str(mv.version), [])),
            "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc).isoformat(timespec="seconds"),
            "run_id": mv.run_id, "run_name": tags.get(tracking.TAG_RUN), "gates": tags.get(TAG_GATES),
            "approved_by": tags.get(TAG_APPROVED_BY), "complete": tags.get(TAG_STATE) == "complete",
            **{k: metrics.get(k) for k in LIST_METRICS},
        })
    return out


LIST_METRICS = ("val_bpb", "val_loss", "safety_pass_rate")


# ----------------------------------------------------------------------------- model card

def model_card(name: str, version: str, run, ckpt_path: Path, results: dict, gates: list[GateResult],
               dataset_id: str | None) -> str:
    """The model card (markdown): lineage, metrics, gates, intended use, limitations, training setup."""
    meta = tracking._checkpoint_meta(ckpt_path)
    conf = meta.get("config", {})
    model, train, tokcfg, data = (conf.get(k, {}) for k in ("model", "train", "tokenizer", "data"))
    tokens = meta.get("tokens", {})
    tags = run.data.tags
    metrics = scalar_metrics(results)
    n_params = metrics.get("n_params")
    nan = float("nan")
    rep, dist, safe = (metrics.get(k, nan) for k in ("repetition", "distinct_2", "safety_pass_rate"))
    base = tags.get(tracking.TAG_BASE)
    how = "trained from scratch" if not base else \
        f"fine-tuned from {base}" + (" with LoRA adapters" if meta.get("lora") else "")
    lines = [
        f"# {name} v{version}", "",
        f"A decoder-only transformer (Llama family) {how} with lmops "
        f"{tags.get(tracking.TAG_VERSION, '?')}" + (f": {n_params / 1e6:.2f}M parameters" if n_params else "") + ".", "",
        "## Lineage", "",
        "| | |", "|---|---|",
        f"| model version | `{name}` v{version} |",
        f"| MLflow run | `{run.info.run_id}` ({run.info.run_name}) |",
        *([f"| base model | `{base}` (sha256 `{tags.get(tracking.TAG_BASE_SHA, '?')[:16]}`) |"] if base else []),
        f"| dataset version | `{dataset_id or 'not recorded'}` |",
        f"| tokenizer sha256 | `{tags.get(tracking.TAG_TOKENIZER, '?')}` |",
        f"| git commit | `{tags.get(tracking.TAG_GIT_COMMIT, 'unknown')}` ({tags.get(tracking.TAG_GIT_REPO, '?')}) |",
        f"| checkpoint | step {meta.get('step', '?')}, sha256 `{tags.get(tracking.TAG_CHECKPOINT_SHA, '?')}` |",
        "", "## Evaluation", "",
        "| metric | value |", "|---|---|",
        *(f"| {k} | {v:.6g} |" for k, v in metrics.items()),
        "", "## Gates", "",
        "| gate | rule | value | threshold | result | detail |", "|---|---|---|---|---|---|",
        *(f"| {g.name} | {g.metric} {g.op} | {_num(g.value)} | {_num(g.threshold)} | "
          f"{'pass' if g.passed else '**FAIL**'} | {g.detail} |" for g in gates),
        "", "## Intended use", "",
        "Research, teaching and experiments with the life cycle of language models: continuing text in the "
        "style and domain of its training corpus. It is a base model, not instruction-tuned: it continues "
        "text, it does not follow instructions or answer questions reliably.",
        "", "## Limitations", "",
        "- Small and trained briefly: it makes up facts, loses coherence over long outputs and repeats itself "
        f"(repetition {rep:.2f}, distinct bigrams {dist:.2f} on the fixed prompts).",
        "- It knows only its corpus: other domains and languages are out of scope.",
        f"- The safety suite is {int(metrics.get('safety_prompts', 0))} fixed prompts checked for PII and blocklisted "
        f"terms (pass rate {safe:.2f}); it is a smoke test, not a guarantee. "
        "Moderate inputs and outputs when serving.",
        "- Not for decisions about people, medical, legal or financial advice, or any high-stakes use.",
        "", "## Training", "",
        f"- model: {model.get('n_layer', '?')} layers, width {model.get('d_model', '?')}, "
        f"{model.get('n_head', '?')} heads, context {model.get('block_size', '?')} tokens",
        f"- tokenizer: {tokcfg.get('kind', '?')}, {tokens.get('vocab_size', '?')} tokens",
        f"- data: {', '.join(map(str, data.get('corpus', []))) or '?'}; {tokens.get('train_tokens', '?')} training and "
        f"{tokens.get('val_tokens', '?')} validation tokens",
        f"- optimisation: {train.get('max_steps', '?')} steps, batch {train.get('batch_size', '?')} x "
        f"{train.get('grad_accum', '?')}, lr {train.get('lr', '?')} (cosine to {train.get('min_lr', '?')}), "
        f"seed {train.get('seed', '?')}",
        *([f"- LoRA fine-tune of {(meta.get('base') or {}).get('version') or (meta.get('base') or {}).get('label')}: "
           f"r={meta['lora']['r']}, alpha {meta['lora']['alpha']:g} on {', '.join(meta['lora']['target_modules'])}"
           + ("; the version holds the adapter, merged onto its base when downloaded"
              if (meta.get('base') or {}).get('version') else "; registered merged (its base is no registered version)")]
          if meta.get("lora") else []),
        "",
    ]
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"
