"""The `lmops` command: a thin Typer layer over the package. Errors a user can fix print one line."""

from __future__ import annotations

import functools
import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from lmops.errors import LmopsError

app = typer.Typer(
    help="lmops: a language model from raw text to a monitored endpoint.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)
tokenizer_app = typer.Typer(help="Train a tokenizer and encode the corpus into token shards.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")
data_app = typer.Typer(help="DataOps: ingest, clean, deduplicate and scrub corpora into immutable dataset versions.", no_args_is_help=True)
app.add_typer(data_app, name="data")
pipeline_app = typer.Typer(help="Run the pipeline (ingest -> validate -> tokenize -> train -> evaluate -> register -> promote) and list its runs.", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")
keys_app = typer.Typer(help="API keys of the server: created with a role, stored only as hashes, shown once.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
audit_app = typer.Typer(help="The audit log: every state change, who, when, what and why, hash-chained.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
console = Console(stderr=True)

WorkspaceOpt = Annotated[
    Optional[Path],
    typer.Option("--workspace", "-w", envvar="LMOPS_WORKSPACE", show_envvar=True,
                 help="Workspace folder (holds lmops.yaml). Default: the current folder or its nearest parent with one."),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a config key for this command, e.g. --set train.max_steps=500 (repeatable)."),
]
RunOpt = Annotated[str, typer.Option("--run", "-r", help="Run name: its checkpoints live in .lmops/runs/RUN.")]


def friendly(fn):
    """Print LmopsError as one line and exit 1; anything else is a bug and keeps its traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LmopsError as err:
            console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
    return wrapper


def log(msg: str) -> None:
    console.print(msg, highlight=False, soft_wrap=True)


def _workspace_and_config(workspace: Path | None, overrides: list[str] | None):
    from lmops.config import override
    from lmops.workspace import find_workspace

    ws = find_workspace(workspace)
    cfg = ws.config()
    return ws, (override(cfg, overrides) if overrides else cfg)


def _store(workspace: Path | None, overrides: list[str] | None = None):
    from lmops.store import Store

    ws, cfg = _workspace_and_config(workspace, overrides)
    return ws, cfg, Store.for_workspace(ws, cfg)


@app.command()
@friendly
def init(
    directory: Annotated[Path, typer.Argument(help="Folder for the new workspace (created if missing).")] = Path("."),
    force: Annotated[bool, typer.Option(help="Overwrite an existing lmops.yaml.")] = False,
):
    """Create a workspace: lmops.yaml (every default with its reason), .lmops/ for state, corpus/ for text."""
    from lmops.workspace import init_workspace

    ws = init_workspace(directory, force=force)
    log(f"workspace ready: {ws.root}\n  put .txt/.md files in {ws.root / 'corpus'} (or set data.corpus in lmops.yaml), "
        "then run `lmops train`")


@tokenizer_app.command("train")
@friendly
def tokenizer_train(workspace: WorkspaceOpt = None, set_: SetOpt = None):
    """Train the tokenizer set in lmops.yaml (tokenizer.kind: char or bpe) on the corpus."""
    from lmops.data.prepare import ensure_tokenizer

    ws, cfg = _workspace_and_config(workspace, set_)
    ensure_tokenizer(ws, cfg, force=True, log=log)


@tokenizer_app.command("encode")
@friendly
def tokenizer_encode(workspace: WorkspaceOpt = None, set_: SetOpt = None):
    """Encode the corpus into train/val token shards (numpy memmap files); skipped when nothing changed."""
    from lmops.data.prepare import prepare

    ws, cfg = _workspace_and_config(workspace, set_)
    out = prepare(ws, cfg, log=log)
    log(f"token shards current in {out}")


@app.command()
@friendly
def train(
    workspace: WorkspaceOpt = None,
    set_: SetOpt = None,
    run: RunOpt = "main",
    resume: Annotated[bool, typer.Option(help="Continue the run from its last checkpoint, exactly.")] = False,
    stop_at: Annotated[Optional[int], typer.Option(help="Checkpoint and stop after this step (resume later); the schedule still spans train.max_steps.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Train the model in lmops.yaml on the corpus: tokenizer and shards are prepared first if needed.

    Data-parallel on several processes: torchrun --standalone --nproc_per_node 2 --no-python lmops train
    """
    from lmops.data.prepare import prepare
    from lmops.train import train as run_training

    from lmops import tracking
    from lmops.train import update_run_info

    ws, cfg = _workspace_and_config(workspace, set_)
    tokens = prepare(ws, cfg, log=log) if _is_main_process() else ws.tokens_dir
    _barrier_if_distributed()
    with tracking.start_training_run(ws, cfg, None, ws.tokenizer_path, run, resume=resume, log=log) as tracked:
        result = run_training(cfg, tokens, ws.run_dir(run), ws.tokenizer_path.parent, resume=resume, stop_at=stop_at,
                              progress=progress and sys.stderr.isatty(), log=log, on_metrics=tracked.log_row)
        if _is_main_process():
            tracked.log_checkpoint(result.checkpoint)
            update_run_info(ws.run_dir(run), mlflow_run_id=tracked.run_id)
    if _is_main_process():
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
        log(f"step {result.step}: {metrics}\ncheckpoint: {result.checkpoint}")


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _barrier_if_distributed() -> None:
    """Under torchrun, other ranks wait while rank 0 prepares the shards."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        from lmops.train import resolve_device

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if resolve_device("auto").type == "cuda" else "gloo")
        dist.barrier()


def _latest_run(ws) -> str:
    """The run whose checkpoint was written last: what `lmops evaluate` and `register` act on by default."""
    from lmops.train import CKPT_NAME

    runs = sorted(ws.runs_dir.glob(f"*/{CKPT_NAME}"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise LmopsError(f"no trained run in {ws.runs_dir}; run `lmops train` or `lmops pipeline run`")
    return runs[-1].parent.name


def _audit_as_me(store):
    from lmops.store import default_actor

    actor = default_actor()
    return lambda action, subject, details, reason=None: store.audit(actor, action, subject, details, reason)


@app.command()
@friendly
def evaluate(
    workspace: WorkspaceOpt = None,
    set_: SetOpt = None,
    run: Annotated[Optional[str], typer.Option("--run", "-r", help="Run to evaluate; default: the latest trained run.")] = None,
):
    """Evaluate a run: held-out loss/perplexity/bits per byte, prompt checks, decode speed, size, safety suite.

    Results go to the run's MLflow run and .lmops/runs/RUN/evaluation.json; the gates of lmops.yaml
    (evaluate.gates) are checked against the current champion: exits 1 if one fails.
    """
    from lmops.checkpoint import Checkpoint
    from lmops.pipeline import evaluate_run
    from lmops.train import CKPT_NAME

    ws, cfg = _workspace_and_config(workspace, set_)
    run_dir = ws.run_dir(run or _latest_run(ws))
    tokens_dir = Path(Checkpoint(run_dir / CKPT_NAME).meta.get("tokens_dir", ws.tokens_dir))
    out = evaluate_run(ws, cfg, run_dir, tokens_dir)
    r = out["results"]
    log(f"{run_dir.name}: val loss {r['val_loss']:.4f}, ppl {r['val_ppl']:.2f}, bpb {r['val_bpb']:.4f}, "
        f"safety {r['safety_pass_rate']:.0%}, decode {r['decode_tokens_per_s']:,.0f} tok/s, {r['n_params']:,} parameters")
    if not out["passed"]:
        failed = [g["name"] for g in out["gates"] if not g["passed"]]
        raise LmopsError(f"gates failed: {', '.join(failed)} (see the table above)")


@app.command()
@friendly
def register(
    workspace: WorkspaceOpt = None,
    run: Annotated[Optional[str], typer.Option("--run", "-r", help="Evaluated run to register; default: the latest trained run.")] = None,
):
    """Register an evaluated run as a new model version, tagged with its lineage and gate verdict; alias challenger."""
    from lmops.pipeline import register_run

    ws, cfg, store = _store(workspace)
    with store:
        version = register_run(ws, cfg, ws.run_dir(run or _latest_run(ws)), _audit_as_me(store))
    log(f"registered {cfg.registry.model_name} version {version} (alias challenger)")


@app.command()
@friendly
def promote(
    ref: Annotated[str, typer.Argument(help="Version to promote: challenger, a number, NAME@alias.")] = "challenger",
    workspace: WorkspaceOpt = None,
    force_reason: Annotated[Optional[str], typer.Option(help="Promote despite failed gates; the reason goes to the audit log.")] = None,
):
    """Move the champion alias to a version whose gates pass (and approved, when registry.require_approval)."""
    from lmops import registry

    ws, cfg, store = _store(workspace)
    with store:
        version = registry.promote(ws, cfg, ref, audit=_audit_as_me(store), force_reason=force_reason)
    log(f"{cfg.registry.model_name} version {version} is champion")


@app.command()
@friendly
def approve(
    version: Annotated[str, typer.Argument(help="Version number to approve.")],
    workspace: WorkspaceOpt = None,
    as_: Annotated[Optional[str], typer.Option("--as", help="Approver name; default LMOPS_USER or your user name. Must be in registry.approvers when that list is set.")] = None,
):
    """Approve a model version for promotion (recorded on the version and in the audit log)."""
    from lmops import registry
    from lmops.store import default_actor

    ws, cfg, store = _store(workspace)
    with store:
        registry.approve(ws, cfg, version, as_ or default_actor(), audit=_audit_as_me(store))
    log(f"version {version} approved by {as_ or default_actor()}")


@app.command()
@friendly
def lineage(
    ref: Annotated[str, typer.Argument(help="NAME@alias, NAME@version, @alias or a version number.")] = "@champion",
    workspace: WorkspaceOpt = None,
):
    """The chain behind a model version: alias -> version -> run -> dataset -> corpus files, tokenizer, code."""
    from lmops import registry

    ws, cfg = _workspace_and_config(workspace, None)
    console.print(registry.render_lineage(registry.lineage(ws, cfg, ref)))


@app.command()
@friendly
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")] = "\n",
    workspace: WorkspaceOpt = None,
    run: RunOpt = "main",
    checkpoint: Annotated[Optional[Path], typer.Option(help="A checkpoint file or run folder; default: the run's.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 200,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy; higher is more random.")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option(min=1, help="Sample among the k likeliest tokens only.")] = 200,
    top_p: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Sample from the smallest set of tokens holding this much probability.")] = None,
    seed: Annotated[int, typer.Option(help="Same seed, same text.")] = 1337,
    num_samples: Annotated[int, typer.Option(min=1, help="Independent samples to draw.")] = 1,
):
    """Sample text from a trained checkpoint."""
    from lmops.sample import generate_text

    path = checkpoint
    if path is None:
        from lmops.workspace import find_workspace

        path = find_workspace(workspace).run_dir(run)
    for i, text in enumerate(generate_text(path, prompt, max_tokens, temperature, top_k, top_p, seed, num_samples)):
        if num_samples > 1:
            typer.echo(f"--- sample {i + 1}")
        typer.echo(text)


@app.command("export")
@friendly
def export(
    out: Annotated[Path, typer.Argument(help="Folder to write (must be new or empty).")],
    workspace: WorkspaceOpt = None,
    run: RunOpt = "main",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing non-empty folder.")] = False,
):
    """Export a run's model as a Hugging Face LlamaForCausalLM folder (config, safetensors, tokenizer)."""
    from lmops.checkpoint import Checkpoint
    from lmops.hf import export_hf
    from lmops.workspace import find_workspace

    run_dir = find_workspace(workspace).run_dir(run)
    model = Checkpoint(run_dir).model()
    path = export_hf(model, out, tokenizer_dir=run_dir, overwrite=overwrite)
    log(f"exported to {path}; load with transformers.AutoModelForCausalLM.from_pretrained({str(path)!r})")


@app.command("import")
@friendly
def import_(
    folder: Annotated[Path, typer.Argument(help="A Hugging Face Llama folder (config.json + model.safetensors).")],
    workspace: WorkspaceOpt = None,
    run: RunOpt = "imported",
):
    """Import a Hugging Face Llama model as a run checkpoint (then `lmops generate --run RUN`)."""
    from lmops.checkpoint import save_checkpoint
    from lmops.hf import import_hf
    from lmops.train import CKPT_NAME
    from lmops.workspace import find_workspace

    run_dir = find_workspace(workspace).run_dir(run)
    model = import_hf(folder)
    save_checkpoint(run_dir / CKPT_NAME, model, meta={"step": 0, "imported_from": str(folder.resolve())})
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).exists():
            shutil.copy2(folder / name, run_dir / name)
    log(f"imported {model.num_params() / 1e6:.2f}M parameters into run '{run}' ({run_dir})")


@data_app.command("ingest")
@friendly
def data_ingest(
    sources: Annotated[Optional[list[str]], typer.Argument(help="Files, folders or globs (.txt .md .jsonl .csv .parquet, gzipped too); default: data.corpus.")] = None,
    workspace: WorkspaceOpt = None,
    set_: SetOpt = None,
):
    """Ingest text into a new dataset version: clean, filter, scrub PII, deduplicate, validate.

    Prints the validation report; exits 1 when a gate of lmops.yaml fails (data.min_documents,
    data.max_duplicate_ratio). Bad files are quarantined in .lmops/quarantine/ with the reason.
    """
    from lmops.data.ingest import check_gates
    from lmops.pipeline import ingest_dataset
    from lmops.store import default_actor

    ws, cfg, store = _store(workspace, set_)
    with store:
        version = ingest_dataset(ws, cfg, store, default_actor(), sources, progress=sys.stderr.isatty())
    totals = version.manifest["totals"]
    log(f"dataset {version.short_id}: {totals['documents']} documents ({totals['train']['documents']} train, "
        f"{totals['val']['documents']} validation), {totals['chars']:,} characters -> {version.path}")
    failures = check_gates(version.report, cfg.data)
    if failures:
        raise LmopsError("data gates failed: " + "; ".join(failures))


@data_app.command("list")
@friendly
def data_list(workspace: WorkspaceOpt = None):
    """Dataset versions, oldest first."""
    from rich.table import Table

    from lmops.data.dataset import list_datasets
    from lmops.workspace import find_workspace

    table = Table("dataset", "created (UTC)", "documents", "train", "val", "characters", "parent")
    for v in list_datasets(find_workspace(workspace).state):
        t = v.manifest["totals"]
        table.add_row(v.short_id, v.manifest.get("created_at", "")[:19].replace("T", " "), str(t["documents"]),
                      str(t["train"]["documents"]), str(t["val"]["documents"]), f"{t['chars']:,}",
                      (v.manifest.get("parent") or "")[:12])
    console.print(table)


@data_app.command("show")
@friendly
def data_show(ref: Annotated[str, typer.Argument(help="Dataset id, unique prefix, or 'latest'.")] = "latest",
              workspace: WorkspaceOpt = None):
    """One dataset version: its totals and the validation report it was made with."""
    from lmops.data.dataset import load_dataset
    from lmops.data.ingest import render_report
    from lmops.workspace import find_workspace

    v = load_dataset(find_workspace(workspace).state, ref)
    t = v.manifest["totals"]
    log(f"dataset {v.id}\n  {v.path}\n  {t['documents']} documents ({t['train']['documents']} train, "
        f"{t['val']['documents']} validation), {t['chars']:,} characters; parent {v.manifest.get('parent') or '-'}")
    console.print(render_report(v.report))


@data_app.command("diff")
@friendly
def data_diff(a: Annotated[str, typer.Argument(help="Older dataset (id or prefix).")],
              b: Annotated[str, typer.Argument(help="Newer dataset (id, prefix or 'latest').")] = "latest",
              workspace: WorkspaceOpt = None):
    """What changed between two dataset versions: documents added and removed, splits, report figures."""
    from lmops.data.dataset import diff_datasets, load_dataset
    from lmops.workspace import find_workspace

    state = find_workspace(workspace).state
    d = diff_datasets(load_dataset(state, a), load_dataset(state, b))
    log(f"{d['a'][:12]} -> {d['b'][:12]}: +{d['added_count']} documents, -{d['removed_count']}, "
        f"{d['unchanged_count']} unchanged")
    for split, n in d["splits"].items():
        log(f"  {split}: {n['a']} -> {n['b']} documents")
    for key, change in d["report"].items():
        log(f"  {key}: {change['a']} -> {change['b']}")


@pipeline_app.command("run")
@friendly
def pipeline_run(
    workspace: WorkspaceOpt = None,
    set_: SetOpt = None,
    from_: Annotated[Optional[str], typer.Option("--from", help="Run this step and all after it again, even if cached.")] = None,
):
    """Run the pipeline; steps whose inputs did not change are skipped (cached)."""
    from lmops.pipeline import run_pipeline

    ws, cfg = _workspace_and_config(workspace, set_)
    result = run_pipeline(ws, cfg, from_step=from_, progress=sys.stderr.isatty(), log=log)
    if not result.ran:
        log("nothing changed: every step was cached")
    log(f"pipeline run {result.run_id}: ran {', '.join(result.ran) or 'nothing'}"
        + (f"; cached {', '.join(result.cached)}" if result.cached else ""))


@pipeline_app.command("list")
@friendly
def pipeline_list(workspace: WorkspaceOpt = None, limit: Annotated[int, typer.Option(help="Most recent runs to show.")] = 20):
    """Recent pipeline runs with their status and steps."""
    from rich.table import Table

    _, _, store = _store(workspace)
    with store:
        table = Table("run", "started", "by", "status", "steps (* = cached)", "seconds")
        for run in store.list_pipeline_runs(limit):
            steps = " ".join(f"{st.name}{'*' if st.cached else ''}{'' if st.status == 'succeeded' else '!'}" for st in run.steps)
            took = f"{run.duration_s:.1f}" if run.duration_s is not None else ""
            table.add_row(str(run.id), f"{run.started_at:%Y-%m-%d %H:%M:%S}", run.started_by, run.status, steps, took)
        console.print(table)


@pipeline_app.command("show")
@friendly
def pipeline_show(run_id: Annotated[str, typer.Argument(help="A run id from `lmops pipeline list`.")], workspace: WorkspaceOpt = None):
    """One pipeline run: each step's status, cache key, timing, outputs and error."""
    import json

    _, _, store = _store(workspace)
    with store:
        run = store.get_pipeline_run(run_id)
        log(f"run {run.id}: {run.status} (started {run.started_at:%Y-%m-%d %H:%M:%S} by {run.started_by})"
            + (f"\n  error: {run.error}" if run.error else ""))
        for st in run.steps:
            log(f"  {st.name:9} {st.status:9} {'cached ' if st.cached else ''}key {st.cache_key[:12]}"
                + (f"  {st.duration_s:.1f} s" if st.duration_s is not None else ""))
            if st.outputs:
                log("            " + json.dumps(st.outputs, default=str)[:300])
            if st.error:
                log(f"            error: {st.error}")


@app.command()
@friendly
def unlock(workspace: WorkspaceOpt = None):
    """Break the workspace's pipeline lock left by a crashed run (check that it really is gone first)."""
    _, _, store = _store(workspace)
    with store:
        holder = store.break_lock()
        log(f"lock broken (was held by pid {holder.pid} on {holder.host})" if holder else "no lock was held")


@keys_app.command("create")
@friendly
def keys_create(
    name: Annotated[str, typer.Argument(help="What the key is for, e.g. 'chat-frontend'.")],
    role: Annotated[str, typer.Option(help="inference (call the model) < deployer (also metrics, deployments) < admin.")] = "inference",
    workspace: WorkspaceOpt = None,
):
    """Create an API key; the secret is printed once (stdout) and only its hash is kept."""
    from lmops.store import ROLES, default_actor

    if role not in ROLES:
        raise LmopsError(f"--role {role!r}: use one of {', '.join(ROLES)}")
    _, _, store = _store(workspace)
    with store:
        key, secret = store.create_api_key(name, role, default_actor())
    log(f"key {key.prefix} ({key.role}) created for '{name}'; the secret below is shown only now, keep it safe:")
    typer.echo(secret)


@keys_app.command("list")
@friendly
def keys_list(workspace: WorkspaceOpt = None):
    """API keys with their role and state (secrets are never shown again)."""
    from rich.table import Table

    _, _, store = _store(workspace)
    with store:
        table = Table("id", "prefix", "name", "role", "created (UTC)", "by", "revoked")
        for k in store.list_api_keys():
            table.add_row(str(k.id), k.prefix, k.name, k.role, f"{k.created_at:%Y-%m-%d %H:%M}", k.created_by,
                          f"{k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "")
        console.print(table)


@keys_app.command("revoke")
@friendly
def keys_revoke(ref: Annotated[str, typer.Argument(help="Key id or prefix (from `lmops keys list`).")], workspace: WorkspaceOpt = None):
    """Revoke an API key: the server refuses it within auth.key_cache_ttl_s seconds."""
    from lmops.store import default_actor

    _, _, store = _store(workspace)
    with store:
        key = store.revoke_api_key(ref, by=default_actor())
    log(f"key {key.prefix} ('{key.name}', {key.role}) revoked")


@audit_app.command("list")
@friendly
def audit_list(
    workspace: WorkspaceOpt = None,
    limit: Annotated[int, typer.Option(help="Most recent entries to show.")] = 50,
    subject: Annotated[Optional[str], typer.Option(help="Only entries about this subject, e.g. model:lmops-model/3.")] = None,
):
    """Recent audit entries, newest first."""
    import json

    from rich.table import Table

    _, _, store = _store(workspace)
    with store:
        table = Table("seq", "when (UTC)", "who", "action", "subject", "details", "why")
        for e in store.list_audit(limit, subject=subject):
            table.add_row(str(e.seq), e.timestamp[:19].replace("T", " "), e.actor, e.action, e.subject,
                          json.dumps(e.details, sort_keys=True)[:80], e.reason or "")
        console.print(table)


@audit_app.command("verify")
@friendly
def audit_verify(workspace: WorkspaceOpt = None):
    """Check the hash chain of the audit log: any edited, deleted or reordered entry is found."""
    _, _, store = _store(workspace)
    with store:
        result = store.verify_audit()
    if not result.ok:
        raise LmopsError(f"audit log TAMPERED at entry {result.first_bad_seq}: {result.reason}")
    log(f"audit log intact: {result.entries} entries, hash chain verified")


@app.command()
@friendly
def serve(
    model: Annotated[str, typer.Option("--model", "-m", help="NAME@alias (reloads when the alias moves), NAME@version, a version, a run or checkpoint folder, or a Hugging Face Llama folder.")] = "@champion",
    workspace: WorkspaceOpt = None,
    set_: SetOpt = None,
    host: Annotated[Optional[str], typer.Option(help="Address to listen on; default serve.host.")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port; default serve.port.")] = None,
):
    """Serve a model behind an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models).

    Bearer API keys (`lmops keys create`), per-key rate limits, moderation, Prometheus /metrics,
    a request log in the workspace store. Stop with Ctrl-C: in-flight streams finish first.
    """
    from lmops.serve.app import serve as run_server

    ws, cfg = _workspace_and_config(workspace, set_)
    run_server(ws, cfg, model, host or cfg.serve.host, port or cfg.serve.port)


QUICKSTART = [
    "tokenizer.vocab_size=2048",  # the demo corpus is ~465 KB: a small vocabulary leaves fewer rows untrained
    "train.eval_interval=100", "train.checkpoint_interval=100",
]


@app.command()
@friendly
def quickstart(
    directory: Annotated[Path, typer.Argument(help="Folder for the demo workspace.")] = Path("lmops-quickstart"),
    steps: Annotated[int, typer.Option(min=1, help="Training steps (about 10 per second on 2 CPU cores).")] = 500,
):
    """Demo: a workspace on Python's own documentation (no download) through the whole pipeline.

    ingest -> validate -> tokenize -> train -> evaluate -> register -> promote, then a sample from the
    champion. Run it again: every step is cached.
    """
    from lmops.config import Config, override
    from lmops.data.corpus import write_demo_corpus
    from lmops.pipeline import run_pipeline
    from lmops.sample import generate_text
    from lmops.workspace import CONFIG_FILE, Workspace, init_workspace

    root = directory.resolve()
    if (root / CONFIG_FILE).exists():
        ws = Workspace(root)
    else:
        ws = init_workspace(root, config=override(Config(), [*QUICKSTART, f"train.max_steps={steps}"]))
    write_demo_corpus(root / "corpus")
    log(f"[bold]workspace[/] {ws.root}, corpus: the documentation that ships with Python (corpus/python-docs/)")
    cfg = ws.config()
    result = run_pipeline(ws, cfg, progress=sys.stderr.isatty(), log=log)
    run_dir = Path(result.outputs["train"]["run_dir"])
    log(f"[bold]sample[/] from the champion (version {result.outputs.get('promote', {}).get('champion', '?')}):")
    typer.echo(generate_text(run_dir, "The ", 120, 0.8, 200, None, 1337, 1)[0])
    log(f"""
next, in {ws.root}:
  lmops generate --run {run_dir.name} "The list"     sample more
  lmops lineage @champion                         corpus -> dataset -> run -> model version -> alias
  lmops audit verify                              the hash-chained audit log
  lmops pipeline run                              again: every step cached
  lmops keys create me && lmops serve             the champion behind an OpenAI-compatible API on :8000
  mlflow ui --backend-store-uri sqlite:///.lmops/mlflow.db   runs, metrics, registry""")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
