"""The stages of a model's life cycle, one function each: ingest, validate, tokenize, train, evaluate,
register, promote.

The pipeline (lmops/pipeline.py) chains them under cache keys, the CLI calls them one at a time:
neither holds stage logic of its own, so `lmops train` and `lmops pipeline run` train the same way on
the same data. Every training run reads a dataset version (ingested from data.corpus first when there
is none for the corpus as it is now) and its tokenizer and token shards; a run folder's run.json
records which, and the MLflow run logs the dataset as its input.

Heavy imports (torch, MLflow) happen inside the stages that need them, so a pipeline whose steps are
all cached costs little more than hashing the corpus.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from lmops.config import Config
from lmops.errors import LmopsError
from lmops.workspace import Workspace

Log = Callable[[str], None]
Audit = Callable[[str, str, dict, str | None], None]
EVALUATION_FILE = "evaluation.json"  # beside a run's checkpoint: the whole result of `evaluate`


def is_main_process() -> bool:
    """Rank 0 under torchrun (and a plain process): the one that prepares data, tracks and writes."""
    return os.environ.get("RANK", "0") == "0"


def ingest(ws: Workspace, cfg: Config, store, actor: str, sources: list[str] | None = None, progress: bool = False):
    """Ingest sources (default data.corpus) into a dataset version, recorded in the store and the
    audit log; the terminal gets the validation report. Returns the DatasetVersion."""
    from rich.console import Console

    from lmops.data.dataset import write_dataset
    from lmops.data.ingest import ingest as run_ingest
    from lmops.data.ingest import render_report

    result = run_ingest(sources or cfg.data.corpus, cfg.data, cfg.safety, ws.root, ws.state, progress=progress)
    Console(stderr=True).print(render_report(result.report))
    previous = store.datasets.list()
    version = write_dataset(result.documents, result.report, ws.state, cfg.data.val_fraction,
                            parent=previous[-1].id if previous else None, split_within=cfg.data.split_within_chars)
    known = {d.id for d in previous}
    n = version.manifest["totals"]["documents"]
    store.datasets.add(version.id, version.short_id, str(version.path), version.manifest.get("parent"), n, actor,
                      {k: result.report[k] for k in ("documents_in", "documents_out", "duplicate_ratio", "pii")})
    if version.id not in known:
        store.audit.append(actor, "dataset.created", f"dataset:{version.short_id}", {"id": version.id, "documents": n})
    return version


def gate_failures(version, cfg: Config) -> list[str]:
    """What keeps a dataset version from being trained on: the data gates of its report, and a side of
    the split with no documents (found here, not a step later when tokenizing)."""
    from lmops.data.ingest import check_gates

    failures = check_gates(version.report, cfg.data)
    totals = version.manifest["totals"]
    for split, name in (("train", "training"), ("val", "validation")):
        if totals[split]["documents"] == 0:
            failures.append(f"no {name} documents of {totals['documents']}: add documents, or change "
                            f"data.val_fraction ({cfg.data.val_fraction}) or data.split_within_chars "
                            f"({cfg.data.split_within_chars}) so that both sides get some")
    return failures


def validate(ws: Workspace, cfg: Config, dataset_id: str) -> None:
    """Raise LmopsError listing every gate the dataset version fails."""
    from lmops.data.dataset import load_dataset

    version = load_dataset(ws.state, dataset_id)
    failures = gate_failures(version, cfg)
    if failures:
        raise LmopsError(f"data gates failed for dataset {version.short_id}: " + "; ".join(failures))


def tokenize(ws: Workspace, cfg: Config, dataset_id: str, out: Path, log: Log = print, base=None) -> dict:
    """Train the tokenizer of cfg.tokenizer on the dataset's training split (or, warm-starting, take
    the base model's: a lmops.warmstart.BaseModel) and encode both splits into out (tokenizer.json +
    train.bin/val.bin + meta.json)."""
    from lmops.data.dataset import iter_documents, load_dataset
    from lmops.tokenizer import EOT, encode_splits, save_tokenizer, train_tokenizer

    version = load_dataset(ws.state, dataset_id)
    texts = {split: [text for _, text in iter_documents(version, split)] for split in ("train", "val")}
    if not texts["val"] or not texts["train"]:
        raise LmopsError(f"dataset {version.short_id}: " + "; ".join(gate_failures(version, cfg)))
    if base is not None:
        from lmops.warmstart import tokenizer_of

        tok, whose = tokenizer_of(base), f"{base.label}'s tokenizer"
    else:
        tc = cfg.tokenizer
        tok, whose = train_tokenizer(texts["train"], tc.kind, tc.vocab_size, tc.min_frequency), "tokenizer"
    save_tokenizer(tok, out)
    meta = encode_splits(tok, {s: EOT.join(t) for s, t in texts.items()}, out)
    log(f"{whose}: {meta['vocab_size']} tokens; {meta['train_tokens']:,} training and {meta['val_tokens']:,} "
        f"validation tokens -> {out}")
    return {"dataset": version.id, "tokens_dir": str(out), "tokenizer_dir": str(out),
            "tokenizer_sha256": meta["tokenizer_sha256"]}


def train(ws: Workspace, cfg: Config, data: dict, run_dir: Path, resume: bool = False, stop_at: int | None = None,
          progress: bool = False, log: Log = print, base=None):
    """Train on a tokenize output (`data`: dataset, tokens_dir, tokenizer_dir), tracked as an MLflow run
    named after run_dir whose input is the dataset; from base's weights when given (a
    lmops.warmstart.BaseModel, recorded on the run). Returns lmops.train.TrainResult; on the main
    process run_dir/run.json names the MLflow run, the dataset, the token shards and the base model."""
    from lmops import tracking
    from lmops.train import train as run_training
    from lmops.train import update_run_info

    tokenizer_dir, tokens_dir = Path(data["tokenizer_dir"]), Path(data["tokens_dir"])
    with tracking.start_training_run(ws, cfg, data["dataset"], tokenizer_dir / "tokenizer.json", run_dir.name,
                                     resume=resume, log=log, base=base) as run:
        result = run_training(cfg, tokens_dir, run_dir, tokenizer_dir, resume=resume, stop_at=stop_at,
                              progress=progress, log=log, on_metrics=run.log_row, base=base)
        if is_main_process():  # under torchrun the other processes only train
            tracking.log_model(run.run_id, result.checkpoint)
    if is_main_process():
        update_run_info(run_dir, mlflow_run_id=run.run_id, dataset=data["dataset"], tokens_dir=str(tokens_dir),
                        tokenizer_dir=str(tokenizer_dir), base=base.to_dict() if base is not None else None)
    return result


def evaluate(ws: Workspace, cfg: Config, run_dir: Path) -> dict:
    """Evaluate a run's checkpoint on the validation split it was trained with, log it to the run's
    MLflow run, check the gates against the champion; the terminal gets the gate table and
    run_dir/evaluation.json the whole result."""
    from rich.console import Console

    from lmops import evaluate as ev
    from lmops import registry, tracking
    from lmops.checkpoint import CKPT_NAME, Checkpoint
    from lmops.train import read_run_info, update_run_info

    info = read_run_info(run_dir)
    tokens_dir = info.get("tokens_dir") or Checkpoint(run_dir / CKPT_NAME).meta.get("tokens_dir")
    if not tokens_dir or not Path(tokens_dir).is_dir():
        raise LmopsError(f"{run_dir}: the token shards it was trained on ({tokens_dir or 'not recorded'}) are gone; "
                         "train it again with `lmops train` or `lmops pipeline run`")
    tracking.configure(ws, cfg)
    results = ev.evaluate_checkpoint(run_dir / CKPT_NAME, Path(tokens_dir), cfg)
    ev.log_evaluation(info.get("mlflow_run_id"), results)
    champion = registry.champion_metrics(ws, cfg)
    basis = champion_on_this_split(ws, cfg, Path(tokens_dir), info.get("dataset")) if champion else None
    if basis is not None:  # the champion measured on the same validation split: a fair comparison
        results["champion_basis"] = basis
        champion = {**champion, **basis["metrics"]}
    gates = ev.check_gates(results, cfg.evaluate.gates, champion)
    Console(stderr=True).print(ev.render_gates(gates))
    out = {"results": results, "gates": [g.__dict__ for g in gates], "passed": all(g.passed for g in gates)}
    (run_dir / EVALUATION_FILE).write_text(json.dumps(out, indent=2, default=str))
    update_run_info(run_dir, evaluated=True)
    return out


def champion_on_this_split(ws: Workspace, cfg: Config, tokens_dir: Path, dataset_id: str | None) -> dict | None:
    """The champion's held-out loss on this run's validation split, when it reads the same tokens (a
    warm start keeps the champion's tokenizer) but was evaluated on another dataset: its registered
    val_bpb was measured on other text, and a run trained on new, harder data would fail the relative
    gates against a number from easier text. {version, dataset, metrics}, or None (same dataset, or
    another tokenizer: the registered numbers are what there is)."""
    import torch

    from lmops import evaluate as ev
    from lmops import registry, tracking
    from lmops.checkpoint import Checkpoint
    from lmops.tokenizer import load_meta, load_tokenizer, load_tokens, tokenizer_sha256
    from lmops.train import resolve_device

    mv = registry.resolve(ws, cfg, f"{cfg.registry.model_name}@{registry.CHAMPION}")
    if dataset_id is not None and (mv.tags or {}).get(tracking.TAG_DATASET) == dataset_id:
        return None
    path = registry.download_checkpoint(ws, cfg, f"{mv.name}@{mv.version}")
    meta = load_meta(tokens_dir)
    if tokenizer_sha256(load_tokenizer(path.parent)) != meta.get("tokenizer_sha256"):
        return None
    device = resolve_device(cfg.train.device)
    model = Checkpoint(path).model(device).float().eval()
    with torch.no_grad():
        got = ev.heldout_loss(model, load_tokens(tokens_dir, "val"), meta, cfg.evaluate.batch_size, device)
    metrics = {k: got[k] for k in ("val_loss", "val_ppl", "val_bpb")}
    return {"version": str(mv.version), "dataset": dataset_id, "metrics": metrics}


def register(ws: Workspace, cfg: Config, run_dir: Path, audit: Audit | None) -> str:
    """Register an evaluated run's checkpoint as a new model version (alias challenger); return it."""
    from lmops import registry
    from lmops.checkpoint import CKPT_NAME
    from lmops.train import read_run_info

    info = read_run_info(run_dir)
    evaluation = run_dir / EVALUATION_FILE
    if "mlflow_run_id" not in info or not evaluation.exists():
        raise LmopsError(f"{run_dir}: not a tracked, evaluated run; train it with `lmops train` and "
                         f"`lmops evaluate --run {run_dir.name}` first")
    ev = json.loads(evaluation.read_text())
    return str(registry.register(ws, cfg, info["mlflow_run_id"], run_dir / CKPT_NAME, ev["results"], ev["gates"],
                                 info.get("dataset"), audit=audit))


def promote(ws: Workspace, cfg: Config, ref: str, audit: Audit | None, force_reason: str | None = None) -> str:
    """Move the champion alias to ref's version if its gates pass (lmops.registry.promote)."""
    from lmops import registry

    return registry.promote(ws, cfg, ref, audit=audit, force_reason=force_reason)


# ----------------------------------------------------------------------------- which run

def trained_runs(ws: Workspace) -> list[str]:
    """Names of the runs with a checkpoint, oldest checkpoint first."""
    from lmops.checkpoint import CKPT_NAME

    found = sorted(ws.runs_dir.glob(f"*/{CKPT_NAME}"), key=lambda p: p.stat().st_mtime)
    return [p.parent.name for p in found]


def run_folder(ws: Workspace, run: str | None) -> Path:
    """The folder of run (default: the one trained last), or an LmopsError naming the runs there are."""
    runs = trained_runs(ws)
    if run is None:
        if not runs:
            raise LmopsError(f"no trained run in {ws.runs_dir}; run `lmops train` or `lmops pipeline run`")
        return ws.run_dir(runs[-1])
    if run not in runs:
        known = ", ".join(runs[-8:]) if runs else "none yet (run `lmops train` or `lmops pipeline run`)"
        raise LmopsError(f"no trained run '{run}' in {ws.runs_dir}; runs: {known}")
    return ws.run_dir(run)


def model_checkpoint(ws: Workspace, cfg: Config, run: str | None) -> tuple[Path, str]:
    """(checkpoint, what it is) for commands that use a model: the run given, else the champion, else
    the run trained last."""
    from lmops.checkpoint import CKPT_NAME

    if run is None and (cfg.tracking.tracking_uri or (ws.state / "mlflow.db").exists()):  # else: no registry yet
        from lmops import registry

        try:
            mv = registry.resolve(ws, cfg, f"{cfg.registry.model_name}@{registry.CHAMPION}")
        except LmopsError:
            mv = None  # no registered model or no champion yet: the latest run is the next best guess
        if mv is not None:
            path = registry.download_checkpoint(ws, cfg, f"{mv.name}@{mv.version}")
            return path, f"{mv.name} v{mv.version} (champion)"
    folder = run_folder(ws, run)
    return folder / CKPT_NAME, f"run {folder.name}"
