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
    no_args_is_help=True, pretty_exceptions_enable=False,
)
tokenizer_app = typer.Typer(help="Train a tokenizer and encode the corpus into token shards.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")
data_app = typer.Typer(help="DataOps: ingest, clean, deduplicate and scrub corpora into immutable dataset versions.", no_args_is_help=True)
app.add_typer(data_app, name="data")
pipeline_app = typer.Typer(help="Run the pipeline (ingest -> validate -> tokenize -> train -> evaluate -> register -> promote) and list its runs.", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")
models_app = typer.Typer(help="The model registry: versions of the model, their aliases, gates and metrics.", no_args_is_help=True)
app.add_typer(models_app, name="models")
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
ModelRunOpt = Annotated[Optional[str], typer.Option("--run", "-r", help="A run of .lmops/runs/; default: the champion, else the run trained last.")]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"lmops {version('lmops')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
):
    """lmops: a language model from raw text to a monitored endpoint.

    Start with `lmops quickstart`, or `lmops init DIR` for a workspace of your own. Shell completion:
    `lmops --install-completion`.
    """


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
    force: Annotated[bool, typer.Option(help="Overwrite an existing lmops.yaml (and CI files, with --ci).")] = False,
    ci: Annotated[Optional[str], typer.Option("--ci", help="Also write the CI/CD pipeline: github (.github/workflows/lmops.yml), azure (azure-pipelines.yml) or both; later: `lmops ci generate`.")] = None,
):
    """Create a workspace: lmops.yaml (every default with its reason), .lmops/ for state, corpus/ for text."""
    from lmops.workspace import init_workspace

    if ci is not None:  # refused before anything is written
        from lmops.ship import ci as ship_ci

        which = ship_ci.systems(ci)
        ship_ci.check_writable(directory.expanduser().resolve(), which, force)
    ws = init_workspace(directory, force=force)
    log(f"workspace ready: {ws.root}\n  put .txt/.md files in {ws.root / 'corpus'} (or set data.corpus in lmops.yaml), "
        "then run `lmops train`")
    if ci is not None:
        for path in ship_ci.write_files(ws.root, which, force=force):
            log(f"wrote {path}; its header lists the secrets, variables and environments to set in the CI")
        log(f"  its jobs install {ship_ci.default_install()} with pip; for another source: "
            "lmops ci generate --force --install SPEC")


@tokenizer_app.command("train")
@friendly
def tokenizer_train(workspace: WorkspaceOpt = None, set_: SetOpt = None):
    """Train the tokenizer of lmops.yaml (tokenizer.kind: char or bpe) on the training split of the
    corpus's dataset version (ingested first if the corpus changed) and encode both splits; cached."""
    from lmops.pipeline import prepare_data

    ws, cfg = _workspace_and_config(workspace, set_)
    data = prepare_data(ws, cfg, progress=sys.stderr.isatty(), log=log, again="lmops tokenizer train")
    log(f"dataset {data['dataset'][:12]}: tokenizer and token shards in {data['tokens_dir']}")


@app.command()
@friendly
def train(
    workspace: WorkspaceOpt = None,
    set_: SetOpt = None,
    run: RunOpt = "main",
    resume: Annotated[bool, typer.Option(help="Continue the run from its last checkpoint, exactly.")] = False,
    stop_at: Annotated[Optional[int], typer.Option(help="Checkpoint and stop after this step (resume later); the schedule still spans train.max_steps.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    init_from: Annotated[Optional[str], typer.Option(help="Start from this model's weights and tokenizer (train.init_from): champion, a version, a run folder or checkpoint, a Hugging Face model folder (a Llama, or another architecture transformers loads).")] = None,
):
    """Train the model of lmops.yaml on the corpus's dataset version.

    The corpus (data.corpus) is ingested into a dataset version when it changed, validated and
    tokenized first; each of these is cached, so a second `lmops train` starts training at once.
    The MLflow run records the dataset as its input. With train.init_from (or --init-from) training
    continues a model: its weights, its tokenizer, a new learning-rate schedule.

    Data-parallel on several processes: torchrun --standalone --nproc_per_node 2 -m lmops train
    """
    from lmops import stages, warmstart
    from lmops.errors import Interrupted

    if init_from is not None:
        set_ = [*(set_ or []), f"train.init_from={init_from}"]
    ws, cfg = _workspace_and_config(workspace, set_)
    _share_cpu(cfg)
    show = progress and sys.stderr.isatty()
    data = _data_on_every_rank(ws, cfg, show)
    try:
        result = stages.train(ws, cfg, data, ws.run_dir(run), resume=resume, stop_at=stop_at, progress=show, log=log,
                              base=warmstart.resolve(ws, cfg))
    except Interrupted as err:
        raise LmopsError(f"{err}; continue with `lmops train --run {run} --resume`") from None
    if stages.is_main_process():
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
        log(f"step {result.step}: {metrics}\ncheckpoint: {result.checkpoint}")


def _share_cpu(cfg) -> None:
    """train.share_cpu, before anything starts PyTorch's threads (lmops/resources.py)."""
    from lmops.resources import share_cpu

    share_cpu(cfg.train.share_cpu, cfg.train.threads, log)


def _data_on_every_rank(ws, cfg, progress: bool) -> dict:
    """prepare_data on the main process; under torchrun the others wait for it and get its outputs."""
    from lmops.pipeline import prepare_data
    from lmops.train import resolve_device, setup_distributed

    ddp = setup_distributed(resolve_device(cfg.train.device).type)
    if ddp.world == 1:
        return prepare_data(ws, cfg, progress=progress, log=log)
    import torch.distributed as dist

    box: list = [None]
    if ddp.main:
        try:
            box[0] = prepare_data(ws, cfg, progress=progress, log=log)
        except LmopsError as err:
            box[0] = {"error": str(err)}
    dist.broadcast_object_list(box, src=0)
    if "error" in box[0]:
        raise LmopsError(box[0]["error"])
    return box[0]


def _audit_as_me(store):
    from lmops.store import default_actor

    actor = default_actor()
    return lambda action, subject, details, reason=None: store.audit.append(actor, action, subject, details, reason)


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
    from lmops import stages

    ws, cfg = _workspace_and_config(workspace, set_)
    run_dir = stages.run_folder(ws, run)
    out = stages.evaluate(ws, cfg, run_dir)
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
    from lmops import stages

    ws, cfg, store = _store(workspace)
    with store:
        version = stages.register(ws, cfg, stages.run_folder(ws, run), _audit_as_me(store))
    log(f"registered {cfg.registry.model_name} version {version} (alias challenger)")


@app.command()
@friendly
def promote(
    ref: Annotated[str, typer.Argument(help="Version to promote: challenger, a number, NAME@alias.")] = "challenger",
    workspace: WorkspaceOpt = None,
    force_reason: Annotated[Optional[str], typer.Option(help="Promote despite failed gates; the reason goes to the audit log.")] = None,
):
    """Move the champion alias to a version whose gates pass (and approved, when registry.require_approval)."""
    from lmops import stages

    ws, cfg, store = _store(workspace)
    with store:
        version = stages.promote(ws, cfg, ref, _audit_as_me(store), force_reason=force_reason)
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


@models_app.command("list")
@friendly
def models_list(workspace: WorkspaceOpt = None):
    """Registered versions, newest first: aliases (champion, challenger), gates, approval, metrics, run."""
    from rich.table import Table

    from lmops import registry

    ws, cfg = _workspace_and_config(workspace, None)
    versions = registry.list_versions(ws, cfg)
    if not versions:
        log(f"no versions of {cfg.registry.model_name} yet: `lmops register` or `lmops pipeline run` makes one")
        return
    table = Table("version", "aliases", "created (UTC)", "gates", "approved by", "val_bpb", "safety", "run",
                  title=cfg.registry.model_name, title_justify="left")
    for v in versions:
        gates = {"passed": "[green]passed[/]", "failed": "[red]failed[/]"}.get(v["gates"] or "", "?")
        table.add_row(v["version"] + ("" if v["complete"] else " [yellow](incomplete)[/]"),
                      " ".join(f"@{a}" for a in v["aliases"]), v["created"][:19].replace("T", " "), gates,
                      v["approved_by"] or "", _num(v["val_bpb"]), _num(v["safety_pass_rate"], ".0%"),
                      v["run_name"] or (v["run_id"] or "")[:12])
    console.print(table)


def _num(x: float | None, spec: str = ".4f") -> str:
    return "" if x is None else format(x, spec)


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
    run: ModelRunOpt = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="A checkpoint file or run folder instead of a run of the workspace.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 200,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy; higher is more random.")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option(min=1, help="Sample among the k likeliest tokens only.")] = 200,
    top_p: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Sample from the smallest set of tokens holding this much probability.")] = None,
    seed: Annotated[int, typer.Option(help="Same seed, same text.")] = 1337,
    num_samples: Annotated[int, typer.Option(min=1, help="Independent samples to draw.")] = 1,
):
    """Sample text from the champion, a run or a checkpoint."""
    from lmops.sample import generate_text

    path = checkpoint
    if path is None:
        from lmops import stages

        ws, cfg = _workspace_and_config(workspace, None)
        path, what = stages.model_checkpoint(ws, cfg, run)
        log(f"[dim]sampling from {what}[/]")
    for i, text in enumerate(generate_text(path, prompt, max_tokens, temperature, top_k, top_p, seed, num_samples)):
        if num_samples > 1:
            typer.echo(f"--- sample {i + 1}")
        typer.echo(text)


@app.command("export")
@friendly
def export(
    out: Annotated[Path, typer.Argument(help="Folder to write (must be new or empty).")],
    workspace: WorkspaceOpt = None,
    run: ModelRunOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing non-empty folder.")] = False,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="A registered version instead (NAME@alias, NAME@3, 3).")] = None,
    adapter: Annotated[bool, typer.Option("--adapter", help="A LoRA fine-tune's adapter alone, as a PEFT adapter (the Hugging Face module names: Llama's, or its own architecture's) of its base's export, instead of the merged model.")] = False,
):
    """Export the champion (or a run, or a version) as a Hugging Face LlamaForCausalLM folder (config,
    safetensors, tokenizer); a model of another architecture (fine-tuned from a GPT-2, OPT, ... folder)
    as a folder of its own architecture. A LoRA fine-tune exports merged; with --adapter, its adapter
    alone: load it with peft.PeftModel.from_pretrained(the base's export, OUT)."""
    from lmops import stages
    from lmops.checkpoint import Checkpoint
    from lmops.hf import export_hf
    from lmops.model import GPT

    if model is not None and run is not None:
        raise LmopsError("give --model or --run, not both")
    ws, cfg = _workspace_and_config(workspace, None)
    if model is not None:
        from lmops import registry

        mv = registry.resolve(ws, cfg, model)
        ckpt, what = registry.download_checkpoint(ws, cfg, f"{mv.name}@{mv.version}"), f"{mv.name} v{mv.version}"
    else:
        ckpt, what = stages.model_checkpoint(ws, cfg, run)
    if adapter:
        from lmops.lora import export_hf_adapter

        path = export_hf_adapter(ckpt, out, overwrite=overwrite)
        log(f"exported the LoRA adapter of {what} to {path}; load with "
            f"peft.PeftModel.from_pretrained(<its base exported by `lmops export`>, {str(path)!r})")
        return
    loaded = Checkpoint(ckpt).model()
    if isinstance(loaded, GPT):
        path = export_hf(loaded, out, tokenizer_dir=ckpt.parent, overwrite=overwrite)
    else:  # another architecture (lmops/transformers_lm.py): its own Hugging Face folder
        from lmops.transformers_lm import export_folder

        path = export_folder(loaded, out, tokenizer_dir=ckpt.parent, overwrite=overwrite)
    log(f"exported {what} to {path}; load with transformers.AutoModelForCausalLM.from_pretrained({str(path)!r})")


@app.command("import")
@friendly
def import_(
    folder: Annotated[Path, typer.Argument(help="A Hugging Face model folder (config.json + safetensors): a Llama, or another causal-LM architecture transformers loads.")],
    workspace: WorkspaceOpt = None,
    run: RunOpt = "imported",
):
    """Import a Hugging Face model as a run checkpoint (then `lmops generate --run RUN`).

    A Llama becomes lmops's own model; another architecture (GPT-2, OPT, Qwen2, ...) is kept as the
    transformers model (needs transformers: pip install 'lmops[hf]')."""
    from lmops.checkpoint import CKPT_NAME, save_checkpoint
    from lmops.hf import load_folder
    from lmops.workspace import find_workspace

    run_dir = find_workspace(workspace).run_dir(run)
    model = load_folder(folder)
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
    from_requests: Annotated[bool, typer.Option("--from-requests", help="Take the prompts of the request log instead (data.use_production_prompts must be true), mixed with the corpus by data.mix.")] = False,
    endpoint: Annotated[Optional[str], typer.Option(help="With --from-requests: only this endpoint's requests (default: all).")] = None,
    since: Annotated[Optional[str], typer.Option(help="With --from-requests: from how far back (1h, 7d) or an ISO time (default: 24h).")] = None,
    until: Annotated[Optional[str], typer.Option(help="With --from-requests: up to how far back or an ISO time (default: now).")] = None,
    where: Annotated[Optional[str], typer.Option(help="With --from-requests: 'drifted' keeps only requests inside monitor runs that raised a prompt drift alert.")] = None,
):
    """Ingest text into a new dataset version: clean, filter, scrub PII, deduplicate, validate.

    Prints the validation report; exits 1 when a gate of lmops.yaml fails (data.min_documents,
    data.max_duplicate_ratio). Bad files are quarantined in .lmops/quarantine/ with the reason.
    With --from-requests the documents are the logged prompts of a window (never one moderation
    blocked), mixed with the corpus's dataset version, which becomes the new version's parent.
    """
    from lmops import stages
    from lmops.store import default_actor

    if from_requests and sources:
        raise LmopsError("give either sources or --from-requests, not both")
    if not from_requests and any(x is not None for x in (endpoint, since, until, where)):
        raise LmopsError("--endpoint, --since, --until and --where select requests: use them with --from-requests")
    ws, cfg, store = _store(workspace, set_)
    with store:
        if from_requests:
            from lmops.data.production import describe, ingest_requests

            version = ingest_requests(ws, cfg, store, default_actor(), endpoint=endpoint, since=since, until=until,
                                      where=where, progress=sys.stderr.isatty())
        else:
            version = stages.ingest(ws, cfg, store, default_actor(), sources, progress=sys.stderr.isatty())
    totals = version.manifest["totals"]
    log(f"dataset {version.short_id}: {totals['documents']} documents ({totals['train']['documents']} train, "
        f"{totals['val']['documents']} validation), {totals['chars']:,} characters -> {version.path}")
    if from_requests:
        for line in describe(version):
            log(line)
    failures = stages.gate_failures(version, cfg)
    if failures:
        raise LmopsError("data gates failed: " + "; ".join(failures))


@data_app.command("list")
@friendly
def data_list(workspace: WorkspaceOpt = None):
    """Dataset versions, oldest first, each with its verdict on the data gates of lmops.yaml."""
    from rich.table import Table

    from lmops import stages
    from lmops.data.dataset import list_datasets

    ws, cfg = _workspace_and_config(workspace, None)
    table = Table("dataset", "created (UTC)", "documents", "train", "val", "characters", "parent", "gates")
    for v in list_datasets(ws.state):
        t = v.manifest["totals"]
        failed = stages.gate_failures(v, cfg)
        table.add_row(v.short_id, v.manifest.get("created_at", "")[:19].replace("T", " "), str(t["documents"]),
                      str(t["train"]["documents"]), str(t["val"]["documents"]), f"{t['chars']:,}",
                      (v.manifest.get("parent") or "")[:12],
                      f"[red]FAILED[/] ({failed[0]}{f' and {len(failed) - 1} more' if len(failed) > 1 else ''})"
                      if failed else "passed")
    console.print(table)


@data_app.command("show")
@friendly
def data_show(ref: Annotated[str, typer.Argument(help="Dataset id, unique prefix, or 'latest'.")] = "latest",
              workspace: WorkspaceOpt = None):
    """One dataset version: its totals, the request-log window of its production prompts (if any), and
    the validation report it was made with."""
    from lmops.data.dataset import load_dataset
    from lmops.data.ingest import render_report
    from lmops.data.production import describe
    from lmops.workspace import find_workspace

    v = load_dataset(find_workspace(workspace).state, ref)
    t = v.manifest["totals"]
    log(f"dataset {v.id}\n  {v.path}\n  {t['documents']} documents ({t['train']['documents']} train, "
        f"{t['val']['documents']} validation), {t['chars']:,} characters; parent {v.manifest.get('parent') or '-'}")
    for line in describe(v):
        log(f"  {line}")
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
    _share_cpu(cfg)
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
        alive = store.pipeline.lock_holder_alive()
        table = Table("run", "started", "by", "status", "steps (* = cached, ! = not succeeded)", "seconds")
        for run in store.pipeline.list_runs(limit):
            steps = " ".join(f"{st.name}{'*' if st.cached else ''}{'' if st.status == 'succeeded' else '!'}" for st in run.steps)
            took = f"{run.duration_s:.1f}" if run.duration_s is not None else ""
            status = run.status
            if status == "running" and not alive:  # the next run marks it failed
                status = "[red]gone[/] (its process died)"
            table.add_row(str(run.id), f"{run.started_at:%Y-%m-%d %H:%M:%S}", run.started_by, status, steps, took)
        console.print(table)


@pipeline_app.command("show")
@friendly
def pipeline_show(run_id: Annotated[str, typer.Argument(help="A run id from `lmops pipeline list`.")], workspace: WorkspaceOpt = None):
    """One pipeline run: each step's status, cache key, timing, outputs and error."""
    import json

    _, _, store = _store(workspace)
    with store:
        run = store.pipeline.get_run(run_id)
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
        holder = store.pipeline.break_lock()
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
        key, secret = store.keys.create(name, role, default_actor())
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
        for k in store.keys.list():
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
        key = store.keys.revoke(ref, by=default_actor())
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
        for e in store.audit.list(limit, subject=subject):
            table.add_row(str(e.seq), e.timestamp[:19].replace("T", " "), e.actor, e.action, e.subject,
                          json.dumps(e.details, sort_keys=True)[:80], e.reason or "")
        console.print(table)


@audit_app.command("verify")
@friendly
def audit_verify(workspace: WorkspaceOpt = None):
    """Check the hash chain of the audit log: any edited, deleted or reordered entry is found."""
    _, _, store = _store(workspace)
    with store:
        result = store.audit.verify()
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
    endpoint: Annotated[Optional[str], typer.Option("--endpoint", "-e", help="Serve this endpoint's deployments (lmops endpoint create / lmops deploy) by their traffic weights, following changes in the store and driving its rollouts; instead of --model.")] = None,
    bundle: Annotated[Optional[Path], typer.Option("--bundle", help="Serve a model bundle (`lmops package`) after checking every file against its manifest; instead of --model.")] = None,
):
    """Serve a model behind an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models).

    Bearer API keys (`lmops keys create`), per-key rate limits, moderation, Prometheus /metrics,
    a request log in the workspace store. Stop with Ctrl-C: in-flight streams finish first.
    With --endpoint, a request may pick a deployment with the header x-lmops-deployment; every
    answer names its deployment and model version (headers x-lmops-deployment, x-lmops-model-version).
    """
    from lmops.serve.app import serve as run_server

    ws, cfg = _workspace_and_config(workspace, set_)
    if bundle is not None:
        from lmops.ship.bundle import require_bundle

        if endpoint:
            raise LmopsError("--bundle and --endpoint: give one (an endpoint's deployments may be bundles: "
                             "`lmops deploy NAME --model BUNDLE_DIR`)")
        require_bundle(bundle)  # its files are checked where every bundle's are: by the model source loading it
        model = str(bundle.resolve())
    run_server(ws, cfg, None if endpoint else model, host or cfg.serve.host, port or cfg.serve.port, endpoint)


@app.command()
@friendly
def package(
    model: Annotated[str, typer.Argument(help="What to package: NAME@alias, NAME@version, a version, a checkpoint or run folder, or a Hugging Face Llama folder.")],
    out: Annotated[Path, typer.Argument(help="The bundle's folder (new or empty).")],
    workspace: WorkspaceOpt = None,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option(help="Replace what OUT holds.")] = False,
):
    """Write a model bundle: weights, tokenizer, bundle.json (name, version, lineage), model card,
    requirements.lock and a sha256 manifest that `lmops serve --bundle` checks before loading."""
    from lmops.ship.bundle import write_bundle

    ws, cfg = _workspace_and_config(workspace, set_)
    meta = write_bundle(ws, cfg, model, out, force=force)
    log(f"bundle of {meta['name']} v{meta['version']} in {out}\n  serve it: lmops serve --bundle {out}  "
        f"(check it: cd {out} && sha256sum -c MANIFEST.sha256)")


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
    from lmops.data.demo import write_demo_corpus
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


# endpoint, deploy, undeploy, traffic, rollout: lmops/cli_deploy.py adds them to app
from lmops import cli_deploy  # noqa: E402, F401
# ci generate: lmops/cli_ci.py; k8s export, azure export: lmops/cli_export.py
from lmops import cli_ci, cli_export  # noqa: E402, F401
# monitor run|watch|show|alerts: lmops/cli_monitor.py
from lmops import cli_monitor  # noqa: E402, F401
# loop run|watch|status|retrain|approve: lmops/cli_loop.py
from lmops import cli_loop  # noqa: E402, F401


def main() -> None:
    app()


if __name__ == "__main__":
    main()
