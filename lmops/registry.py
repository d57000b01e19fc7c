"""The model registry: versions of a model, their evidence, and the alias that says which to serve.

Built on the MLflow Model Registry at the tracking URI (lmops/tracking.py). A version is a run's
`checkpoint/` artifact folder (safetensors checkpoint + tokenizer), tagged with what it was made from
(dataset version, run, git commit, tokenizer and checkpoint sha256) and how it did (`eval.<metric>`
tags, `gates=passed|failed`), with a model card. Two aliases carry the life cycle:
- challenger: the last registered version;
- champion: the promoted version, the one to serve. `promote` moves it only when the version passes
  the gates again, relative gates judged against the champion of that moment (not the one at
  registration), and, with registry.require_approval, after an approver's `approve`.
  `force_reason` overrides failed gates (never a missing approval) and is audited as such.

State changes call `audit(action, subject, details, reason)` when given (Store.audit with the actor
bound, in the CLI), subject `model:NAME/VERSION`: model.registered, model.alias_set (challenger),
model.approved, model.gate_overridden, model.promoted (the champion alias moved).
"""

from __future__ import annotations

import math
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from lmops import tracking
from lmops.config import Config
from lmops.errors import LmopsError
from lmops.evaluate import GateResult, check_gates, scalar_metrics
from lmops.workspace import Workspace

Audit = Callable[[str, str, dict, str | None], None]

CHAMPION, CHALLENGER = "champion", "challenger"
TAG_GATES = "gates"  # passed | failed (at registration)
TAG_GATES_FAILED = "gates.failed"
TAG_APPROVED_BY, TAG_APPROVED_AT = "approved_by", "approved_at"
TAG_MODEL_CARD = "model_card"
TAG_OVERRIDE = "gate_override"
EVAL_PREFIX = "eval."
DESCRIPTION_LIMIT = 5000  # MLflow's column for a version's description


def _subject(name: str, version: str | int) -> str:
    return f"model:{name}/{version}"


def _audit(audit: Audit | None, action: str, subject: str, details: dict, reason: str | None = None) -> None:
    if audit is not None:
        audit(action, subject, details, reason)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _mlflow_error(what: str, err: MlflowException) -> LmopsError:
    return LmopsError(f"{what}: MLflow failed ({tracking._first_line(err)})")


# ----------------------------------------------------------------------------- register

def register(ws: Workspace, cfg: Config, run_id: str, ckpt_path: Path, eval_results: dict,
             gate_results: list[GateResult], dataset_id: str | None, audit: Audit | None = None) -> str:
    """Register the run's checkpoint as a new version of registry.model_name, alias it challenger,
    write its model card; return the version number.

    The checkpoint is logged to the run first unless the run already holds this very file (same
    sha256), so a version always points at the bytes that were evaluated.
    """
    c = tracking.client(ws, cfg)
    name = cfg.registry.model_name
    ckpt_path = Path(ckpt_path)
    if ckpt_path.is_dir():
        ckpt_path = ckpt_path / tracking.CHECKPOINT_FILE
    try:
        run = c.get_run(run_id)
    except MlflowException as err:
        raise LmopsError(f"run {run_id}: not found at {tracking.tracking_uri(ws, cfg)} "
                         f"({tracking._first_line(err)}); register a run of this workspace's tracking store") from None
    sha = tracking.file_sha256(ckpt_path)
    if run.data.tags.get(tracking.TAG_CHECKPOINT_SHA) != sha:
        tracking.log_checkpoint(run_id, ckpt_path, c)
    run = c.get_run(run_id)
    rtags = run.data.tags
    dataset_id = dataset_id or rtags.get(tracking.TAG_DATASET)
    gate_results = [GateResult(**g) if isinstance(g, dict) else g for g in gate_results]  # as stored in JSON
    passed = all(g.passed for g in gate_results)
    tags = {
        tracking.TAG_RUN: rtags.get(tracking.TAG_RUN, run.info.run_name or ""),
        "run_id": run_id,
        tracking.TAG_GIT_COMMIT: rtags.get(tracking.TAG_GIT_COMMIT, "unknown"),
        tracking.TAG_TOKENIZER: rtags.get(tracking.TAG_TOKENIZER, "unknown"),
        tracking.TAG_CHECKPOINT_SHA: sha,
        tracking.TAG_VERSION: rtags.get(tracking.TAG_VERSION, tracking.lmops_version()),
        TAG_GATES: "passed" if passed else "failed",
    }
    if dataset_id:
        tags[tracking.TAG_DATASET] = dataset_id
    failed = [g.name for g in gate_results if not g.passed]
    if failed:
        tags[TAG_GATES_FAILED] = ",".join(failed)
    tags |= {f"{EVAL_PREFIX}{k}": repr(v) for k, v in scalar_metrics(eval_results).items()}
    try:
        try:
            c.get_registered_model(name)
        except MlflowException:
            c.create_registered_model(name, description="Language models trained with lmops; "
                                      "alias 'champion' is the one to serve, 'challenger' the newest.")
        mv = c.create_model_version(name, source=f"{run.info.artifact_uri}/{tracking.CHECKPOINT_ARTIFACT}",
                                    run_id=run_id, tags=tags)
        version = str(mv.version)
        card = model_card(name, version, run, ckpt_path, eval_results, gate_results, dataset_id)
        card_file = f"model_cards/{name}-v{version}.md"
        c.log_text(run_id, card, card_file)
        c.set_model_version_tag(name, version, TAG_MODEL_CARD, f"{run.info.artifact_uri}/{card_file}")
        description = card if len(card) <= DESCRIPTION_LIMIT else card[:DESCRIPTION_LIMIT - 200] + \
            f"\n\n(cut; the whole card is the run artifact {card_file})"
        c.update_model_version(name, version, description=description)
    except MlflowException as err:
        raise _mlflow_error(f"registering run {run_id} as {name}", err) from None
    finite = {k: v for k, v in scalar_metrics(eval_results).items() if math.isfinite(v)}  # audit JSON has no NaN
    _audit(audit, "model.registered", _subject(name, version),
           {"run_id": run_id, "dataset_id": dataset_id, "gates": tags[TAG_GATES], "checkpoint_sha256": sha,
            "metrics": finite})
    _move_alias(c, name, CHALLENGER, version, audit, "model.alias_set")
    return version


def _move_alias(c: MlflowClient, name: str, alias: str, version: str, audit: Audit | None, action: str,
                details: dict | None = None, reason: str | None = None) -> None:
    previous = _aliases(c, name).get(alias)
    c.set_registered_model_alias(name, alias, version)
    _audit(audit, action, _subject(name, version),
           {"alias": alias, "from": previous, "to": version} | (details or {}), reason)


def _aliases(c: MlflowClient, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in (c.get_registered_model(name).aliases or {}).items()}


# ----------------------------------------------------------------------------- promote and approve

def eval_metrics(mv: ModelVersion) -> dict[str, float]:
    """A version's evaluation, read back from its eval.<metric> tags."""
    out = {}
    for key, value in (mv.tags or {}).items():
        if key.startswith(EVAL_PREFIX):
            try:
                out[key.removeprefix(EVAL_PREFIX)] = float(value)
            except ValueError:
                continue
    return out


def champion_metrics(ws: Workspace, cfg: Config) -> dict[str, float] | None:
    """The current champion's evaluation (for check_gates), None while there is none."""
    c = tracking.client(ws, cfg)
    name = cfg.registry.model_name
    try:
        version = _aliases(c, name).get(CHAMPION)
    except MlflowException:
        return None  # no registered model yet
    return eval_metrics(c.get_model_version(name, version)) if version else None


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
    champion = eval_metrics(c.get_model_version(name, current)) if current else None
    gates = check_gates(eval_metrics(mv), cfg.evaluate.gates, champion)
    failed = [g for g in gates if not g.passed]
    if failed and force_reason is None:
        listed = "; ".join(f"{g.name}: {g.detail}" for g in failed)
        raise LmopsError(f"{name} v{version} not promoted, gates failed ({listed}); champion stays "
                         f"{'v' + current if current else 'unset'}; train a better model, or force with a reason")
    if failed and not force_reason.strip():
        raise LmopsError(f"{name} v{version}: a gate override needs a reason; say why the failed gates do not matter")
    if cfg.registry.require_approval:
        approver = (mv.tags or {}).get(TAG_APPROVED_BY)
        allowed = cfg.registry.approvers
        if not approver or (allowed and approver not in allowed):
            who = f"one of {', '.join(allowed)}" if allowed else "an approver"
            raise LmopsError(f"{name} v{version} needs approval by {who} before promotion "
                             f"(registry.require_approval); run `lmops approve {version}`")
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
    """Where a version came from: version -> run -> dataset version -> tokenizer -> code, and its
    aliases, evaluation, gates and approval."""
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
        },
        "run": {
            "id": mv.run_id, "name": run.info.run_name if run else tag(tracking.TAG_RUN),
            "status": run.info.status if run else "deleted", "experiment_id": run.info.experiment_id if run else None,
            "checkpoint_step": rtags.get(tracking.TAG_CHECKPOINT_STEP),
        },
        "dataset": _dataset_lineage(ws, tag(tracking.TAG_DATASET)),
        "tokenizer": {"sha256": tag(tracking.TAG_TOKENIZER)},
        "code": {"git_commit": tag(tracking.TAG_GIT_COMMIT), "git_repo": rtags.get(tracking.TAG_GIT_REPO),
                 "lmops_version": tag(tracking.TAG_VERSION)},
        "eval": eval_metrics(mv),
    }


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
    ds = lin["dataset"]
    dataset = run.add(f"dataset {ds['id'] or '(not recorded)'}"
                      + (f" ({ds['documents']} documents)" if "documents" in ds else ""))
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
    """The version's checkpoint as a local file, its tokenizer beside it (for Checkpoint and
    load_tokenizer): .lmops/models/NAME/VERSION/ckpt.safetensors, downloaded once and checked
    against the sha256 recorded at registration."""
    mv = resolve(ws, cfg, ref)
    name, version = mv.name, str(mv.version)
    dest = ws.state / "models" / name / version
    ckpt = dest / tracking.CHECKPOINT_FILE
    if ckpt.is_file():
        return ckpt
    import mlflow.artifacts

    tmp = dest.with_name(f".{version}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        uri = tracking.client(ws, cfg).get_model_version_download_uri(name, version)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp),
                                                         tracking_uri=tracking.tracking_uri(ws, cfg)))
        got = local / tracking.CHECKPOINT_FILE
        if not got.is_file():
            raise LmopsError(f"{name} v{version}: its artifacts at {uri} hold no {tracking.CHECKPOINT_FILE}; "
                             "register the run's checkpoint again")
        want = (mv.tags or {}).get(tracking.TAG_CHECKPOINT_SHA)
        if want and tracking.file_sha256(got) != want:
            raise LmopsError(f"{name} v{version}: downloaded checkpoint does not match the sha256 recorded at "
                             f"registration; its artifacts at {uri} were changed, register it again")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(local, dest)
    except MlflowException as err:
        raise _mlflow_error(f"downloading {name} v{version}", err) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ckpt


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
    lines = [
        f"# {name} v{version}", "",
        "A decoder-only transformer (Llama family) trained from scratch with lmops "
        f"{tags.get(tracking.TAG_VERSION, '?')}" + (f": {n_params / 1e6:.2f}M parameters" if n_params else "") + ".", "",
        "## Lineage", "",
        "| | |", "|---|---|",
        f"| model version | `{name}` v{version} |",
        f"| MLflow run | `{run.info.run_id}` ({run.info.run_name}) |",
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
        "",
    ]
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"
