"""The pipeline: ingest -> validate -> tokenize -> train -> evaluate -> register -> promote.

Each step's output is cached under a key of its inputs: content hashes of what it reads, the config
sections it depends on, and the code version. A re-run with nothing changed skips every step and
says so; change one input and only the steps downstream of it run. Every pipeline run and step is
recorded in the metadata store (status, timings, outputs); a failing step stops the run, earlier
outputs stay, and a re-run (or `--from STEP`) continues from there. One pipeline at a time per
workspace: a lock in the store refuses a second.

Heavy imports (torch, MLflow) happen inside the steps that need them, so a fully cached re-run
costs little more than hashing the corpus.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lmops.config import Config
from lmops.errors import LmopsError
from lmops.workspace import Workspace

STEPS = ("ingest", "validate", "tokenize", "train", "evaluate", "register", "promote")
NEEDS = {"validate": "ingest", "tokenize": "ingest", "train": "tokenize", "evaluate": "train", "register": "evaluate",
         "promote": "register"}


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# The modules each step runs: a change to them (or to the pipeline and the config schema, which
# every step depends on) invalidates that step's cache, and only that step's.
CODE = {
    "ingest": ["data/ingest.py", "data/dataset.py", "data/corpus.py", "safety.py"],
    "validate": ["data/ingest.py"],
    "tokenize": ["tokenizer.py", "data/dataset.py"],
    "train": ["model.py", "train.py", "checkpoint.py", "tracking.py"],
    "evaluate": ["evaluate.py", "model.py", "checkpoint.py", "safety.py"],
    "register": ["registry.py", "tracking.py"],
    "promote": ["registry.py"],
}


@functools.cache
def code_version(step: str) -> str:
    """Hash of the lmops sources a step runs."""
    root = Path(__file__).parent
    files = ["pipeline.py", "config.py", *CODE[step]]
    return _sha256_json([(f, _sha256_file(root / f)) for f in files])


def _source_fingerprint(ws: Workspace, sources: list[str]) -> list:
    """(path, size, sha256) of every file ingest would read: the ingest step's input."""
    from lmops.data.ingest import source_files

    files, _ = source_files(sources, ws.root, exclude=ws.state)
    return [(str(p), p.stat().st_size, _sha256_file(p)) for p in files]


@dataclass
class Context:
    ws: Workspace
    cfg: Config
    store: object
    log: Callable[[str], None]
    progress: bool
    actor: str
    outputs: dict[str, dict] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)

    def audit(self, action: str, subject: str, details: dict, reason: str | None = None) -> None:
        self.store.audit(self.actor, action, subject, details, reason)

    def section(self, *names: str) -> dict:
        return {n: getattr(self.cfg, n).model_dump(mode="json") for n in names}


# ----------------------------------------------------------------------------- keys: what each step reads

def _key(ctx: Context, name: str, *parts) -> str:
    return _sha256_json([name, code_version(name), *parts])


DATA_GATES = {"min_documents", "max_duplicate_ratio"}  # read by validate only, not by ingest
KEYS: dict[str, Callable[[Context], str]] = {
    "ingest": lambda c: _key(c, "ingest", _source_fingerprint(c.ws, c.cfg.data.corpus),
                             c.cfg.data.model_dump(mode="json", exclude=DATA_GATES), c.section("safety")),
    "validate": lambda c: _key(c, "validate", c.outputs["ingest"]["dataset"], c.cfg.data.model_dump(mode="json", include=DATA_GATES)),
    "tokenize": lambda c: _key(c, "tokenize", c.outputs["ingest"]["dataset"], c.section("tokenizer")),
    "train": lambda c: _key(c, "train", c.keys["tokenize"], c.section("model", "train")),
    "evaluate": lambda c: _key(c, "evaluate", c.keys["train"], c.section("evaluate", "safety")),
    "register": lambda c: _key(c, "register", c.keys["evaluate"], c.section("registry", "tracking")),
    "promote": lambda c: _key(c, "promote", c.outputs["register"]["version"], c.section("registry")),
}


def _outputs_present(name: str, outputs: dict) -> bool:
    """A cached step counts only while the files it made are still there."""
    paths = {"ingest": ["path"], "tokenize": ["tokens_dir", "tokenizer_dir"], "train": ["checkpoint"]}.get(name, [])
    return all(Path(outputs.get(p, "")).exists() for p in paths)


# ----------------------------------------------------------------------------- steps: what each step does

def ingest_dataset(ws: Workspace, cfg: Config, store, actor: str, sources: list[str] | None = None,
                   progress: bool = False):
    """Ingest sources (default data.corpus) into a dataset version, recorded in the store and the audit
    log; the terminal gets the validation report. Returns the DatasetVersion."""
    from rich.console import Console

    from lmops.data.dataset import write_dataset
    from lmops.data.ingest import ingest, render_report

    result = ingest(sources or cfg.data.corpus, cfg.data, cfg.safety, ws.root, ws.state, progress=progress)
    Console(stderr=True).print(render_report(result.report))
    previous = store.list_datasets()
    version = write_dataset(result.documents, result.report, ws.state, cfg.data.val_fraction,
                            parent=previous[-1].id if previous else None)
    known = {d.id for d in previous}
    n = version.manifest["totals"]["documents"]
    store.add_dataset(version.id, version.short_id, str(version.path), version.manifest.get("parent"), n, actor,
                      {k: result.report[k] for k in ("documents_in", "documents_out", "duplicate_ratio", "pii")})
    if version.id not in known:
        store.audit(actor, "dataset.created", f"dataset:{version.short_id}", {"id": version.id, "documents": n})
    return version


def step_ingest(ctx: Context) -> dict:
    version = ingest_dataset(ctx.ws, ctx.cfg, ctx.store, ctx.actor, progress=ctx.progress)
    return {"dataset": version.id, "path": str(version.path)}


def step_validate(ctx: Context) -> dict:
    from lmops.data.dataset import load_dataset
    from lmops.data.ingest import check_gates

    version = load_dataset(ctx.ws.state, ctx.outputs["ingest"]["dataset"])
    report = json.loads((version.path / "report.json").read_text())
    failures = check_gates(report, ctx.cfg.data)
    if failures:
        raise LmopsError("data gates failed: " + "; ".join(failures))
    return {"dataset": version.id, "gates": "passed"}


def step_tokenize(ctx: Context) -> dict:
    from lmops.data.dataset import iter_documents, load_dataset
    from lmops.tokenizer import EOT, encode_splits, save_tokenizer, train_tokenizer

    version = load_dataset(ctx.ws.state, ctx.outputs["ingest"]["dataset"])
    texts = {split: [text for _, text in iter_documents(version, split)] for split in ("train", "val")}
    if not texts["val"]:
        raise LmopsError(f"dataset {version.short_id} has no validation documents; add documents or raise data.val_fraction")
    tc = ctx.cfg.tokenizer
    tok = train_tokenizer(texts["train"], tc.kind, tc.vocab_size, tc.min_frequency)
    out = ctx.ws.state / "pipeline" / "tokenize" / ctx.keys["tokenize"][:16]
    save_tokenizer(tok, out)
    meta = encode_splits(tok, {s: EOT.join(t) for s, t in texts.items()}, out)
    ctx.log(f"tokenizer: {meta['vocab_size']} tokens; {meta['train_tokens']:,} training and {meta['val_tokens']:,} "
            "validation tokens")
    return {"tokens_dir": str(out), "tokenizer_dir": str(out), "tokenizer_sha256": meta["tokenizer_sha256"]}


def step_train(ctx: Context) -> dict:
    from lmops import tracking
    from lmops.train import train, update_run_info

    tok = ctx.outputs["tokenize"]
    run_dir = ctx.ws.runs_dir / f"pipeline-{ctx.keys['train'][:12]}"
    with tracking.start_training_run(ctx.ws, ctx.cfg, ctx.outputs["ingest"]["dataset"], Path(tok["tokenizer_dir"]) / "tokenizer.json",
                                     run_dir.name) as run:
        result = train(ctx.cfg, Path(tok["tokens_dir"]), run_dir, Path(tok["tokenizer_dir"]), progress=ctx.progress,
                       log=ctx.log, on_metrics=run.log_row)
        tracking.log_checkpoint(run.run_id, result.checkpoint)
    update_run_info(run_dir, mlflow_run_id=run.run_id, dataset=ctx.outputs["ingest"]["dataset"])
    return {"checkpoint": str(result.checkpoint), "run_dir": str(run_dir), "mlflow_run_id": run.run_id,
            "metrics": result.metrics}


def step_evaluate(ctx: Context) -> dict:
    tr = ctx.outputs["train"]
    return evaluate_run(ctx.ws, ctx.cfg, Path(tr["run_dir"]), Path(ctx.outputs["tokenize"]["tokens_dir"]))


def evaluate_run(ws: Workspace, cfg: Config, run_dir: Path, tokens_dir: Path) -> dict:
    """Evaluate a run's checkpoint, log it to the run's MLflow run, check the gates against the
    champion; the terminal gets the gate table, run_dir/evaluation.json the whole result."""
    from rich.console import Console

    from lmops import evaluate, registry, tracking
    from lmops.train import CKPT_NAME, read_run_info, update_run_info

    tracking.configure(ws, cfg)
    results = evaluate.evaluate_checkpoint(run_dir / CKPT_NAME, tokens_dir, cfg)
    evaluate.log_evaluation(read_run_info(run_dir).get("mlflow_run_id"), results)
    gates = evaluate.check_gates(results, cfg.evaluate.gates, registry.champion_metrics(ws, cfg))
    Console(stderr=True).print(evaluate.render_gates(gates))
    out = {"results": results, "gates": [g.__dict__ for g in gates], "passed": all(g.passed for g in gates)}
    (run_dir / "evaluation.json").write_text(json.dumps(out, indent=2, default=str))
    update_run_info(run_dir, evaluated=True)
    return out


def step_register(ctx: Context) -> dict:
    from lmops import registry

    version = register_run(ctx.ws, ctx.cfg, Path(ctx.outputs["train"]["run_dir"]), ctx.audit)
    ctx.log(f"registered {ctx.cfg.registry.model_name} version {version} (alias challenger)")
    return {"version": str(version)}


def register_run(ws: Workspace, cfg: Config, run_dir: Path, audit) -> str:
    """Register an evaluated run's checkpoint as a new model version (alias challenger)."""
    from lmops import registry
    from lmops.train import CKPT_NAME, read_run_info

    info = read_run_info(run_dir)
    evaluation = run_dir / "evaluation.json"
    if "mlflow_run_id" not in info or not evaluation.exists():
        raise LmopsError(f"{run_dir}: not a tracked, evaluated run; train it with `lmops train` and "
                         f"`lmops evaluate --run {run_dir.name}` first")
    ev = json.loads(evaluation.read_text())
    return str(registry.register(ws, cfg, info["mlflow_run_id"], run_dir / CKPT_NAME, ev["results"], ev["gates"],
                                 info.get("dataset"), audit=audit))


def step_promote(ctx: Context) -> dict:
    from lmops import registry

    version = registry.promote(ctx.ws, ctx.cfg, ref=ctx.outputs["register"]["version"], audit=ctx.audit)
    ctx.log(f"promoted {ctx.cfg.registry.model_name} version {version} to champion")
    return {"champion": str(version)}


RUN: dict[str, Callable[[Context], dict]] = {
    "ingest": step_ingest, "validate": step_validate, "tokenize": step_tokenize, "train": step_train,
    "evaluate": step_evaluate, "register": step_register, "promote": step_promote,
}


# ----------------------------------------------------------------------------- the runner

@dataclass
class PipelineResult:
    run_id: str
    ran: list[str]
    cached: list[str]
    outputs: dict[str, dict]


def run_pipeline(ws: Workspace, cfg: Config, from_step: str | None = None, progress: bool = False,
                 log: Callable[[str], None] = print) -> PipelineResult:
    from lmops.store import Store, default_actor

    steps = list(cfg.pipeline.steps)
    for i, name in enumerate(steps):
        if name in NEEDS and NEEDS[name] not in steps[:i]:
            raise LmopsError(f"pipeline.steps: '{name}' needs '{NEEDS[name]}' before it")
    if from_step is not None and from_step not in steps:
        raise LmopsError(f"--from {from_step}: not a step of this pipeline ({', '.join(steps)})")
    store = Store.for_workspace(ws, cfg)
    ctx = Context(ws, cfg, store, log, progress, default_actor())
    with store.pipeline_lock():
        run = store.start_pipeline_run(_sha256_json(cfg.to_dict()), ctx.actor)
        ran, cached = [], []
        for name in steps:
            t0 = time.perf_counter()
            key = KEYS[name](ctx)
            ctx.keys[name] = key
            forced = from_step is not None and steps.index(name) >= steps.index(from_step)
            hit = None if forced else store.find_cached_step(name, key)
            if hit is not None and _outputs_present(name, hit.outputs):
                ctx.outputs[name] = hit.outputs
                store.finish_step(store.start_step(run.id, name, key).id, "succeeded", hit.outputs, cached=True)
                cached.append(name)
                log(f"[dim]{name:9} cached ({key[:12]}), nothing changed[/]")
                continue
            log(f"[bold]{name:9}[/] running")
            step = store.start_step(run.id, name, key)
            try:
                ctx.outputs[name] = RUN[name](ctx)
            except (LmopsError, KeyboardInterrupt) as err:
                message = str(err) or "interrupted"
                store.finish_step(step.id, "failed", {}, error=message)
                store.finish_pipeline_run(run.id, "failed", error=f"{name}: {message}")
                raise LmopsError(f"pipeline step '{name}' failed: {message}; earlier steps are kept: fix it and run "
                                 f"`lmops pipeline run` again (done steps are skipped)") from None
            store.finish_step(step.id, "succeeded", ctx.outputs[name])
            ran.append(name)
            log(f"{name:9} done in {time.perf_counter() - t0:.1f} s")
        store.finish_pipeline_run(run.id, "succeeded")
    return PipelineResult(run.id, ran, cached, ctx.outputs)
