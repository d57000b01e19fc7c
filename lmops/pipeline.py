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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lmops import stages
from lmops.config import Config
from lmops.errors import LmopsError
from lmops.util import first_line, sha256_file, sha256_json
from lmops.workspace import Workspace

ABANDONED = "its process is gone (killed or crashed) while the run was in progress"
STEPS = ("ingest", "validate", "tokenize", "train", "evaluate", "register", "promote")
NEEDS = {"validate": "ingest", "tokenize": "ingest", "train": "tokenize", "evaluate": "train", "register": "evaluate",
         "promote": "register"}


# The modules each step runs: a change to them (or to the pipeline and the config schema, which
# every step depends on) invalidates that step's cache, and only that step's.
CODE = {
    "ingest": ["data/ingest.py", "data/dataset.py", "safety.py"],
    "validate": ["data/ingest.py"],
    "tokenize": ["tokenizer.py", "data/dataset.py", "warmstart.py"],
    "train": ["model.py", "transformers_lm.py", "train.py", "checkpoint.py", "tracking.py", "warmstart.py", "lora.py"],
    "evaluate": ["evaluate.py", "model.py", "transformers_lm.py", "checkpoint.py", "safety.py"],
    "register": ["registry.py", "tracking.py", "lora.py"],
    "promote": ["registry.py"],
}


@functools.cache
def code_version(step: str) -> str:
    """Hash of the lmops sources a step runs."""
    root = Path(__file__).parent
    files = ["pipeline.py", "stages.py", "config.py", "util.py", *CODE[step]]
    return sha256_json([(f, sha256_file(root / f)) for f in files])


def _source_fingerprint(ws: Workspace, sources: list[str]) -> list:
    """(path, size, sha256) of every file ingest would read: the ingest step's input."""
    from lmops.data.ingest import source_files

    files, _ = source_files(sources, ws.root, exclude=ws.state)
    return [(str(p), p.stat().st_size, sha256_file(p)) for p in files]


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
    dataset: str | None = None  # given: the ingest step takes this dataset version instead of data.corpus

    @functools.cached_property
    def base(self):
        """train.init_from resolved once per run (lmops.warmstart.BaseModel, or None from scratch): the
        champion it names is the one of this run's start."""
        from lmops import warmstart

        return warmstart.resolve(self.ws, self.cfg)

    def audit(self, action: str, subject: str, details: dict, reason: str | None = None) -> None:
        self.store.audit.append(self.actor, action, subject, details, reason)

    def section(self, *names: str) -> dict:
        return {n: getattr(self.cfg, n).model_dump(mode="json") for n in names}


# ----------------------------------------------------------------------------- keys: what each step reads

def _key(ctx: Context, name: str, *parts) -> str:
    return sha256_json([name, code_version(name), *parts])


DATA_GATES = {"min_documents", "max_duplicate_ratio"}  # read by validate only, not by ingest
PRODUCTION = {"use_production_prompts", "mix"}  # read by `data ingest --from-requests` only, not by the corpus's
KEYS: dict[str, Callable[[Context], str]] = {
    "ingest": lambda c: _key(c, "ingest", ["dataset", c.dataset]) if c.dataset is not None else
                        _key(c, "ingest", _source_fingerprint(c.ws, c.cfg.data.corpus),
                             c.cfg.data.model_dump(mode="json", exclude=DATA_GATES | PRODUCTION), c.section("safety")),
    "validate": lambda c: _key(c, "validate", c.outputs["ingest"]["dataset"], c.cfg.data.model_dump(mode="json", include=DATA_GATES)),
    "tokenize": lambda c: _key(c, "tokenize", c.outputs["ingest"]["dataset"],
                               _base_tokenizer(c.base) if c.cfg.train.init_from else c.section("tokenizer")),
    # the base by its weights, not by the name init_from gives them (champion today, 3 tomorrow)
    "train": lambda c: _key(c, "train", c.keys["tokenize"], c.section("model"),
                            c.cfg.train.model_dump(mode="json", exclude={"init_from", "share_cpu"}),
                            c.base.sha256 if c.cfg.train.init_from else None),
    "evaluate": lambda c: _key(c, "evaluate", c.keys["train"], c.section("evaluate", "safety")),
    "register": lambda c: _key(c, "register", c.keys["evaluate"], c.section("registry", "tracking")),
    "promote": lambda c: _key(c, "promote", c.outputs["register"]["version"], c.section("registry")),
}


def _base_tokenizer(base) -> str:
    from lmops.tokenizer import TOKENIZER_FILE

    return sha256_file(base.tokenizer_dir / TOKENIZER_FILE)


def _outputs_present(name: str, outputs: dict) -> bool:
    """A cached step counts only while the files it made are still there."""
    paths = {"ingest": ["path"], "tokenize": ["tokens_dir", "tokenizer_dir"], "train": ["checkpoint"]}.get(name, [])
    return all(Path(outputs.get(p, "")).exists() for p in paths)


# ----------------------------------------------------------------------------- steps: lmops/stages.py with their outputs

def step_ingest(ctx: Context) -> dict:
    if ctx.dataset is not None:  # a dataset version made elsewhere (the loop's, from production prompts)
        from lmops.data.dataset import load_dataset

        return {"dataset": ctx.dataset, "path": str(load_dataset(ctx.ws.state, ctx.dataset).path)}
    version = stages.ingest(ctx.ws, ctx.cfg, ctx.store, ctx.actor, progress=ctx.progress)
    return {"dataset": version.id, "path": str(version.path)}


def step_validate(ctx: Context) -> dict:
    stages.validate(ctx.ws, ctx.cfg, ctx.outputs["ingest"]["dataset"])
    return {"dataset": ctx.outputs["ingest"]["dataset"], "gates": "passed"}


def step_tokenize(ctx: Context) -> dict:
    out = ctx.ws.state / "pipeline" / "tokenize" / ctx.keys["tokenize"][:16]
    return stages.tokenize(ctx.ws, ctx.cfg, ctx.outputs["ingest"]["dataset"], out, log=ctx.log, base=ctx.base)


def step_train(ctx: Context) -> dict:
    """Train in a run folder named by the step's key: a run of the same key that was interrupted (Ctrl-C,
    a crash) left a checkpoint there with the same data and config, so it is resumed, exactly."""
    from lmops.checkpoint import CKPT_NAME, Checkpoint
    from lmops.train import read_run_info

    run_dir = ctx.ws.runs_dir / f"pipeline-{ctx.keys['train'][:12]}"
    ckpt = run_dir / CKPT_NAME
    resume = ckpt.is_file() and Checkpoint(ckpt).meta.get("step", 0) < ctx.cfg.train.max_steps
    result = stages.train(ctx.ws, ctx.cfg, ctx.outputs["tokenize"], run_dir, resume=resume, progress=ctx.progress,
                          log=ctx.log, base=ctx.base)

    return {"checkpoint": str(result.checkpoint), "run_dir": str(run_dir),
            "mlflow_run_id": read_run_info(run_dir)["mlflow_run_id"], "metrics": result.metrics}


def step_evaluate(ctx: Context) -> dict:
    return stages.evaluate(ctx.ws, ctx.cfg, Path(ctx.outputs["train"]["run_dir"]))


def step_register(ctx: Context) -> dict:
    version = stages.register(ctx.ws, ctx.cfg, Path(ctx.outputs["train"]["run_dir"]), ctx.audit)
    ctx.log(f"registered {ctx.cfg.registry.model_name} version {version} (alias challenger)")
    return {"version": str(version)}


def step_promote(ctx: Context) -> dict:
    version = stages.promote(ctx.ws, ctx.cfg, ctx.outputs["register"]["version"], ctx.audit)
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
                 log: Callable[[str], None] = print, steps: list[str] | None = None,
                 again: str = "lmops pipeline run", dataset: str | None = None) -> PipelineResult:
    """Run steps (default pipeline.steps) in order, each skipped while its cache key finds outputs.
    again: the command a failure's advice says to run once fixed. dataset: a dataset version id the
    ingest step takes as its output, instead of ingesting data.corpus.

    Every step ends marked in the store, whatever stops it (an error, a bug, Ctrl-C); a run whose
    process was killed outright stays 'running' until the next run, which marks it failed.
    """
    from lmops.store import Store, default_actor

    steps = list(cfg.pipeline.steps if steps is None else steps)
    for i, name in enumerate(steps):
        if name in NEEDS and NEEDS[name] not in steps[:i]:
            raise LmopsError(f"pipeline.steps: '{name}' needs '{NEEDS[name]}' before it")
    if from_step is not None and from_step not in steps:
        raise LmopsError(f"--from {from_step}: not a step of this pipeline ({', '.join(steps)})")
    store = Store.for_workspace(ws, cfg)
    ctx = Context(ws, cfg, store, log, progress, default_actor(), dataset=dataset)
    with store, store.pipeline.lock():
        for gone in store.pipeline.close_abandoned(ABANDONED):  # we hold the lock: no other run is alive
            log(f"[yellow]pipeline run {gone} was left running by a process that is gone: marked failed[/]")
        run = store.pipeline.start_run(sha256_json(cfg.to_dict()), ctx.actor)
        ran, cached = [], []
        for name in steps:
            t0 = time.perf_counter()
            key = KEYS[name](ctx)
            ctx.keys[name] = key
            forced = from_step is not None and steps.index(name) >= steps.index(from_step)
            hit = None if forced else store.pipeline.find_cached_step(name, key)
            if hit is not None and _outputs_present(name, hit.outputs):
                ctx.outputs[name] = hit.outputs
                store.pipeline.finish_step(store.pipeline.start_step(run.id, name, key).id, "succeeded", hit.outputs, cached=True)
                cached.append(name)
                log(f"[dim]{name:9} cached ({key[:12]}), nothing changed[/]")
                continue
            log(f"[bold]{name:9}[/] running")
            step = store.pipeline.start_step(run.id, name, key)
            try:
                ctx.outputs[name] = RUN[name](ctx)
            except BaseException as err:
                known = isinstance(err, (LmopsError, KeyboardInterrupt))
                message = (str(err) or "interrupted") if known else f"{type(err).__name__}: {first_line(err)}"
                store.pipeline.finish_step(step.id, "failed", {}, error=message)
                store.pipeline.finish_run(run.id, "failed", error=f"{name}: {message}")
                if not known:
                    raise  # a bug: its traceback matters more than advice
                raise LmopsError(f"pipeline step '{name}' failed: {message}; earlier steps are kept: fix it and run "
                                 f"`{again}` again (done steps are skipped"
                                 + (", training resumes from its checkpoint)" if name == "train" else ")")) from None
            store.pipeline.finish_step(step.id, "succeeded", ctx.outputs[name])
            ran.append(name)
            log(f"{name:9} done in {time.perf_counter() - t0:.1f} s")
        store.pipeline.finish_run(run.id, "succeeded")
    return PipelineResult(run.id, ran, cached, ctx.outputs)


DATA_STEPS = ("ingest", "validate", "tokenize")


def prepare_data(ws: Workspace, cfg: Config, progress: bool = False, log: Callable[[str], None] = print,
                 again: str = "lmops train") -> dict:
    """The dataset version of data.corpus as it is now, validated and tokenized (each step cached like
    the pipeline's, and recorded as a pipeline run): what `lmops train` trains on. Returns the tokenize
    step's outputs (dataset, tokens_dir, tokenizer_dir)."""
    return run_pipeline(ws, cfg, progress=progress, log=log, steps=list(DATA_STEPS), again=again).outputs["tokenize"]
