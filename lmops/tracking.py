"""Experiment tracking with MLflow: each training run's config, metrics, tokenizer and checkpoint.

With no `tracking.tracking_uri`, runs go to a SQLite file in the workspace (.lmops/mlflow.db) and
their artifacts to .lmops/mlartifacts: tracking needs no server, and

    mlflow ui --backend-store-uri sqlite:///.lmops/mlflow.db

run in the workspace shows them. Any MLflow URI works instead (an MLflow server, Databricks, an Azure
ML workspace); the registry (lmops/registry.py) uses the same URI, so a registered model version
always points at a run this store knows.

Metrics are buffered and sent by a background thread with one `log_batch` call every FLUSH_ROWS rows
or FLUSH_SECONDS: a request per step, or a synchronous one every few, would slow a small model's
training, which takes milliseconds a step.

A run's model is logged as a standard MLflow model (log_model): a weights-only checkpoint and the
tokenizer under a pyfunc flavor that generates text (lmops/mlflow_model.py), which the registry
registers and `mlflow.pyfunc.load_model` loads. The run's dataset version is an MLflow input of the
run (context `training`).

The default SQLite store is created atomically: its schema is built in a temporary file beside it,
renamed into place when whole, under a file lock (a first setup killed midway leaves no half-made
database; one left by an older lmops is rebuilt when it holds nothing).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException

from lmops.config import Config
from lmops.errors import LmopsError
from lmops.util import first_line, sha256_file
from lmops.workspace import Workspace

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
CHECKPOINT_ARTIFACT = "checkpoint"  # run artifact folder of versions registered before MLflow models
MODEL_NAME = "model"  # the logged model's name in its run
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
FLUSH_ROWS = 50
FLUSH_SECONDS = 2.0

# Run tags (the registry copies them onto model versions, lineage reads them back)
TAG_GIT_COMMIT = "lmops.git_commit"
TAG_GIT_REPO = "lmops.git_repo"  # "workspace" or "lmops": whose commit TAG_GIT_COMMIT is
TAG_VERSION = "lmops.version"
TAG_DATASET = "lmops.dataset_id"
TAG_TOKENIZER = "lmops.tokenizer_sha256"
TAG_RUN = "lmops.run"
TAG_BASE = "lmops.base_model"  # a warm start's base: NAME@VERSION when registered, else its path
TAG_BASE_SHA = "lmops.base_model_sha256"
TAG_CHECKPOINT_SHA = "lmops.checkpoint_sha256"
TAG_CHECKPOINT_STEP = "lmops.checkpoint_step"
TAG_MODEL_ID = "lmops.model_id"  # the run's logged MLflow model of the checkpoint TAG_CHECKPOINT_SHA names
TAG_WEIGHTS_SHA = "lmops.weights_sha256"  # its weights-only checkpoint (what a download is checked against)
TAG_LORA = "lmops.lora"  # a LoRA run's settings (JSON: r, alpha, dropout, target_modules)
TAG_ADAPTER_SHA = "lmops.adapter_sha256"  # a LoRA model's adapter file (what a download is checked against)
INPUT_TAG_DATASET = "lmops.dataset_id"  # the whole dataset id, on the run's dataset input


def tracking_uri(ws: Workspace, cfg: Config) -> str:
    return cfg.tracking.tracking_uri or f"sqlite:///{ws.state / DB_FILE}"


def configure(ws: Workspace, cfg: Config, _retry: bool = False) -> str:
    """Point MLflow (tracking and registry) at the workspace's URI, create the experiment if missing,
    make it the active one; return the URI. The default SQLite store is created first if missing
    (atomically, see create_local_store)."""
    uri = tracking_uri(ws, cfg)
    local = cfg.tracking.tracking_uri is None
    if local:
        create_local_store(ws.state / DB_FILE)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    name = cfg.tracking.experiment
    try:
        c = MlflowClient(uri, uri)
        exp = c.get_experiment_by_name(name)
        if exp is None:
            location = (ws.state / ARTIFACTS_DIR).as_uri() if local else None
            c.create_experiment(name, artifact_location=location)
        elif exp.lifecycle_stage == "deleted":
            raise LmopsError(f"MLflow experiment '{name}' at {uri} is deleted; restore it (`mlflow experiments "
                             f"restore --experiment-id {exp.experiment_id}`) or set tracking.experiment")
        mlflow.set_experiment(name)
    except LmopsError:
        raise
    except Exception as err:  # MlflowException, or SQLAlchemy's own from a database it cannot read
        db = ws.state / DB_FILE
        if local and not _retry and _half_made(db):
            create_local_store(db, rebuild=True)
            return configure(ws, cfg, _retry=True)
        if local and not _sqlite_readable(db):
            raise _unreadable_store(db, err) from None
        if local:  # a readable database MLflow refused: out-of-date schema, locked by another process, ...
            raise LmopsError(f"{db}: MLflow failed on the tracking database ({first_line(err)})") from None
        raise LmopsError(f"tracking.tracking_uri {uri}: MLflow failed ({first_line(err)}); "
                         "check the URI and that the server is up") from None
    return uri


def _unreadable_store(db: Path, err: Exception) -> LmopsError:
    return LmopsError(f"{db}: not a usable MLflow tracking database ({first_line(err)}); move it aside "
                      f"(`mv {db} {db}.bad`) to start an empty one, or restore it from a backup")


def create_local_store(db: Path, rebuild: bool = False) -> None:
    """Make db a whole MLflow SQLite database if there is none (rebuild: replace a half-made one).

    MLflow creates its schema in many steps (tables, then dozens of migrations); a process killed
    among them leaves a database that every later MLflow call fails on. So the schema is built in a
    temporary file beside db and renamed over db when whole, under a lock so that two first runs do
    not race. A database an older lmops left half-made (schema not complete, and nothing in it) is
    rebuilt the same way (configure checks when MLflow fails on it); a corrupt one is never replaced."""
    if db.is_file() and not rebuild:
        return
    from filelock import FileLock

    db.parent.mkdir(parents=True, exist_ok=True)
    # MLflow's first use of a SQLite file creates its tables and says so on stderr at INFO
    for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with FileLock(str(db.with_name(f".{db.name}.lock"))):
        if db.is_file() and not (rebuild and _half_made(db)):
            return  # another process made (or rebuilt) it while this one waited
        _drop_engines(f"sqlite:///{db}")
        for stale in db.parent.glob(f".{db.name}.tmp-*"):  # left by a setup killed midway (we hold the lock)
            stale.unlink(missing_ok=True)
        tmp = db.with_name(f".{db.name}.tmp-{os.getpid()}")
        try:
            MlflowClient(f"sqlite:///{tmp}").search_experiments(max_results=1)  # MLflow makes its schema
            _drop_engines(f"sqlite:///{tmp}")
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, db)
            _fsync_dir(db.parent)
        finally:
            tmp.unlink(missing_ok=True)
            for suffix in ("-journal", "-wal", "-shm"):
                Path(f"{tmp}{suffix}").unlink(missing_ok=True)


def _half_made(db: Path) -> bool:
    """Whether db is an MLflow database whose schema creation stopped midway and that holds nothing:
    its schema revision is not MLflow's newest, and it has no runs, models or experiments but
    MLflow's Default. A file SQLite cannot read is not half-made (configure reports it)."""
    try:
        con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not tables:
                return True  # SQLite made the file, MLflow wrote nothing yet
            revision = con.execute("SELECT version_num FROM alembic_version").fetchone() \
                if "alembic_version" in tables else None
            from mlflow.store.db.utils import _get_latest_schema_revision

            if revision is not None and revision[0] == _get_latest_schema_revision():
                return False
            for table, most in (("runs", 0), ("registered_models", 0), ("experiments", 1)):
                if table in tables and con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] > most:
                    return False  # has content: an upgrade for `mlflow db upgrade`, not a half-made store
            return True
        finally:
            con.close()
    except sqlite3.DatabaseError:
        return False


def _sqlite_readable(db: Path) -> bool:
    """Whether SQLite can read db's schema (False for garbage or a damaged file)."""
    try:
        con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
        try:
            con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        finally:
            con.close()
        return True
    except sqlite3.DatabaseError:
        return False


def _drop_engines(uri: str) -> None:
    """Close the connections MLflow's stores keep open on uri (they would go on reading the old file)."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore

    for store in (TrackingStore, RegistryStore):
        engine = getattr(store, "_engine_map", {}).pop(uri, None)
        if engine is not None:
            engine.dispose()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def client(ws: Workspace, cfg: Config) -> MlflowClient:
    """A client for the workspace's tracking and registry URI (configured first)."""
    uri = configure(ws, cfg)
    return MlflowClient(uri, uri)




def git_commit(root: Path) -> tuple[str, str]:
    """(commit, whose): HEAD of the workspace's git repository, else of the lmops checkout, else
    ("unknown", "none")."""
    for folder, whose in ((root, "workspace"), (Path(__file__).resolve().parent, "lmops")):
        try:
            out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "unknown", "none"  # no git at all
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip(), whose
    return "unknown", "none"


def lmops_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmops")
    except PackageNotFoundError:
        return "unknown"


def flatten_config(cfg: Config) -> dict[str, str]:
    """'section.key' -> value as MLflow params (strings; lists, dicts, None and booleans as JSON)."""
    out = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            text = value if isinstance(value, str) else json.dumps(value)
            out[f"{section}.{key}"] = text[:6000]  # MLflow's limit on a param value
    return out


@dataclass
class TrainingRun:
    """An MLflow run being trained: pass `log_row` as `on_metrics` to lmops.train.train.

    log_row only appends to a buffer; a background thread sends it, so a slow tracking store (SQLite
    commits, a remote server) never stalls a training step. close() sends what is left.
    """

    run_id: str
    client: MlflowClient | None  # None on the other processes of a torchrun: only rank 0 tracks
    log: Callable[[str], None] = print
    pending: list[Metric] = field(default_factory=list)
    warned: bool = False
    logged_through: dict[str, int] = field(default_factory=dict)  # metric -> last step MLflow has (resume)
    on_first_row: Callable[[], None] | None = None  # run once, before the first row is buffered
    rows: int = 0  # rows received (sent or skipped as already logged)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._sender = threading.Thread(target=self._send_loop, name="mlflow-metrics", daemon=True)
        if self.client is not None:
            self._sender.start()

    def log_row(self, row: dict) -> None:
        """One training step's row: every number but step and time becomes a metric at that step,
        except a metric MLflow already has at that step or later (a resumed run re-does the steps
        after its last checkpoint, which a crashed process may have logged already)."""
        step, ts = int(row["step"]), int(time.time() * 1000)
        metrics = [Metric(key, float(value), ts, step) for key, value in row.items()
                   if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool)
                   and step > self.logged_through.get(key, -1)]
        if self.client is None:
            return
        if self.rows == 0 and self.on_first_row is not None:
            self.on_first_row()
        self.rows += 1
        with self._lock:
            self.pending.extend(metrics)
            if len(self.pending) >= FLUSH_ROWS * max(1, len(metrics)):
                self._wake.set()

    def _send_loop(self) -> None:
        while True:
            self._wake.wait(FLUSH_SECONDS)
            self._wake.clear()
            self._send()
            if self._closed:
                return

    def _send(self) -> None:
        """Send the buffered metrics. A failure (server down) keeps them for the next try rather than
        stopping the training; the rows are in metrics.jsonl anyway."""
        with self._lock:
            batch, self.pending = self.pending, []
        try:
            for i in range(0, len(batch), 1000):  # MLflow's batch limit
                self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])
        except MlflowException as err:
            with self._lock:
                self.pending = batch[i:] + self.pending
            if not self.warned:
                self.log(f"warning: MLflow logging failed ({first_line(err)}); retrying later (metrics.jsonl has "
                         "every row)")
                self.warned = True

    def close(self) -> None:
        """Send everything still buffered and stop the sender."""
        if self.client is None or self._closed:
            return
        self._closed = True
        self._wake.set()
        self._sender.join()
        if self.pending:
            self._send()

    def log_model(self, ckpt_path: Path) -> str:
        """The checkpoint as the run's MLflow model (the module's log_model); its URI, "" on a process
        that does not track. The metrics buffered so far are sent first: the model links the run's
        metrics at its step."""
        if self.client is None:
            return ""
        self._send()
        return log_model(self.run_id, ckpt_path, self.client)


@contextmanager
def start_training_run(ws: Workspace, cfg: Config, dataset_id: str | None, tokenizer_path: Path, run_name: str,
                       resume: bool = False, log: Callable[[str], None] = print, base=None) -> Iterator[TrainingRun]:
    """An MLflow run for a training run: params, tags, the dataset version (an MLflow input, context
    `training`) and config/tokenizer artifacts logged at the start, metrics as they come, status
    FINISHED or FAILED at the end.

    resume: continue the newest MLflow run of that name (as `lmops train --resume` continues the
    checkpoint), so one training run stays one MLflow run; params already logged keep their values,
    and metrics MLflow has up to some step are not logged again for the steps training re-does.
    A resumed run is touched only when training sends its first row: a resume refused before any
    step (the checkpoint does not match the config) leaves the run as it was, FINISHED stays FINISHED.
    Under torchrun only rank 0 creates a run; the other processes get one that logs nothing.
    """
    if int(os.environ.get("RANK", "0")) > 0:
        yield TrainingRun("", None, log)
        return
    c = client(ws, cfg)
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    tokenizer_path = Path(tokenizer_path)
    commit, whose = git_commit(ws.root)
    tags = {
        TAG_RUN: run_name, TAG_GIT_COMMIT: commit, TAG_GIT_REPO: whose, TAG_VERSION: lmops_version(),
        TAG_TOKENIZER: sha256_file(tokenizer_path), "mlflow.source.git.commit": commit,
    }
    if dataset_id is not None:
        tags[TAG_DATASET] = dataset_id
    if base is not None:  # a warm start: the model it started from (lmops.warmstart.BaseModel)
        tags |= {TAG_BASE: base.version or base.label, TAG_BASE_SHA: base.sha256}
    found = _latest_run(c, exp.experiment_id, run_name) if resume else None
    run = found or c.create_run(exp.experiment_id, run_name=run_name, tags=tags)
    run_id, resumed = run.info.run_id, found is not None

    def start() -> None:
        """Everything but the metrics: at once for a new run, at the first row for a resumed one."""
        if resumed:
            c.update_run(run_id, status="RUNNING")
            c.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        params = [Param(k, v) for k, v in flatten_config(cfg).items() if k not in run.data.params]
        for i in range(0, len(params), 100):  # MLflow's limit of params per batch
            c.log_batch(run_id, params=params[i:i + 100])
        if dataset_id is not None:
            log_dataset(ws, c, run_id, dataset_id)
        c.log_text(run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), "config/lmops.yaml")
        for name in TOKENIZER_FILES:
            if (tokenizer_path.parent / name).is_file():
                c.log_artifact(run_id, str(tokenizer_path.parent / name), "tokenizer")

    if resumed:
        tracked = TrainingRun(run_id, c, log, logged_through=_last_steps(c, run), on_first_row=start)
    else:
        start()
        tracked = TrainingRun(run_id, c, log)
    _active[run_id] = tracked
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        yield tracked
        status = RunStatus.to_string(RunStatus.FINISHED)
    finally:
        _active.pop(run_id, None)
        tracked.close()
        refused = resumed and tracked.rows == 0 and status != RunStatus.to_string(RunStatus.FINISHED)
        if not refused:  # a resume refused before its first step did not touch the run: its status stays
            try:
                c.set_terminated(run_id, status)
            except MlflowException as err:
                log(f"warning: could not mark MLflow run {run_id} {status} ({first_line(err)})")


_active: dict[str, TrainingRun] = {}  # run id -> its TrainingRun while start_training_run is open


def _last_steps(c: MlflowClient, run) -> dict[str, int]:
    """metric -> the highest step MLflow has of it in run."""
    return {key: max((m.step for m in c.get_metric_history(run.info.run_id, key)), default=-1)
            for key in run.data.metrics}


def log_dataset(ws: Workspace, c: MlflowClient, run_id: str, dataset_id: str) -> None:
    """The dataset version as an MLflow input of the run (context `training`): name its short id,
    digest its id's first 36 characters (MLflow's column width), source its folder; the whole id is
    the input's tag lmops.dataset_id. An id that is not a dataset version of this workspace is
    logged with no source folder."""
    from mlflow.data.dataset_source_registry import get_registered_sources
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from lmops.data.dataset import load_dataset

    try:
        version = load_dataset(ws.state, dataset_id)
        name, full, path = version.short_id, version.id, version.path
    except LmopsError:
        name, full, path = dataset_id[:12], dataset_id, ws.state / "datasets" / dataset_id
    local = next(s for s in get_registered_sources() if s._get_source_type() == "local")
    dataset = MetaDataset(local(str(path)), name=name, digest=full[:36])
    c.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[
        InputTag(MLFLOW_DATASET_CONTEXT, "training"), InputTag(INPUT_TAG_DATASET, full)])])


def training_dataset(run) -> dict | None:
    """The dataset input a run was trained on (log_dataset), or None: id, name, digest, source."""
    for item in (run.inputs.dataset_inputs if run is not None and run.inputs else []):
        tags = {t.key: t.value for t in item.tags}
        if tags.get("mlflow.data.context") == "training":
            d = item.dataset
            source = json.loads(d.source).get("uri") if d.source and d.source.startswith("{") else d.source
            return {"id": tags.get(INPUT_TAG_DATASET, d.digest), "name": d.name, "digest": d.digest, "source": source}
    return None


def _latest_run(c: MlflowClient, experiment_id: str, run_name: str):
    """The newest run tagged with run_name, or None. MLflow's filter strings have no escapes: a name
    is quoted with the quote it does not contain, and one holding both is matched here instead."""
    quote = next((q for q in ("'", '"') if q not in run_name), None)
    where = f"tags.`{TAG_RUN}` = {quote}{run_name}{quote}" if quote else ""
    found = c.search_runs([experiment_id], filter_string=where, order_by=["attributes.start_time DESC"],
                          max_results=1 if quote else 1000)
    return next((r for r in found if r.data.tags.get(TAG_RUN) == run_name), None)


def log_model(run_id: str, ckpt_path: Path, mlflow_client: MlflowClient | None = None) -> str:
    """Log a checkpoint as the run's MLflow model and return its URI (models:/m-...): the weights
    only (a new lmops checkpoint without optimizer or RNG state, safetensors), the tokenizer files
    beside ckpt_path, and the pyfunc flavor of lmops/mlflow_model.py (generates text), with its
    signature, an input example and explicit pip requirements (no slow environment inference).

    Called while start_training_run is open, it sends the run's buffered metrics first: the model
    links the run's metrics at the checkpoint's step. Uses the URI set by configure() (a client
    given must be for that URI). Tags the run with the checkpoint's sha256 and step, the model's id
    and its weights' sha256 (the registry records them and checks downloads against the latter);
    the model carries the same tags.

    A LoRA run on a registered base version is logged as its adapter instead of the merged weights
    (lmops/lora.py write_adapter: PEFT's files + the base version and its sha256), tagged with the
    adapter's sha256 and the settings; the registry merges it onto the base when it downloads it. On
    any other base (a path, a Hugging Face folder) there is no version to merge with later: merged.
    """
    from lmops import lora
    from lmops.checkpoint import CKPT_NAME, Checkpoint, save_checkpoint

    ckpt_path = Path(ckpt_path)
    if ckpt_path.is_dir():
        ckpt_path = ckpt_path / CKPT_NAME
    if not ckpt_path.is_file():
        raise LmopsError(f"{ckpt_path}: no checkpoint to log; train one with `lmops train`")
    c = mlflow_client or MlflowClient()
    if run_id in _active:  # logged during training: the metrics buffered so far first (the model links
        _active[run_id]._send()  # the run's metrics at its step)
    sha = sha256_file(ckpt_path)
    ckpt = Checkpoint(ckpt_path)
    step = ckpt.meta.get("step")
    # in the system's temporary folder, not the run's: a kill here leaves no copy of the weights there
    with tempfile.TemporaryDirectory(prefix="lmops-model-") as tmp:
        folder = Path(tmp) / "model"
        if ckpt.meta.get("lora") and (ckpt.meta.get("base") or {}).get("version"):
            adapter = lora.write_adapter(folder, ckpt, sha)
            tags = {TAG_CHECKPOINT_SHA: sha, TAG_ADAPTER_SHA: sha256_file(adapter)}
        else:
            weights = save_checkpoint(folder / CKPT_NAME, ckpt.model(), meta=ckpt.meta | {"source_sha256": sha})
            tags = {TAG_CHECKPOINT_SHA: sha, TAG_WEIGHTS_SHA: sha256_file(weights)}
        if ckpt.meta.get("lora"):
            tags[TAG_LORA] = json.dumps(ckpt.meta["lora"], sort_keys=True)
        for name in TOKENIZER_FILES:
            if (ckpt_path.parent / name).is_file():
                _link_or_copy(ckpt_path.parent / name, folder / name)
        if step is not None:
            tags[TAG_CHECKPOINT_STEP] = str(step)
        info = _log_pyfunc(run_id, folder, int(step or 0), tags)
    tags[TAG_MODEL_ID] = info.model_id
    c.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return info.model_uri


def _log_pyfunc(run_id: str, folder: Path, step: int, tags: dict[str, str]):
    """mlflow.pyfunc's model of folder (checkpoint + tokenizer) logged to run_id: lmops/mlflow_model.py
    as the model's code (models from code: nothing pickled), the lmops package as its code_paths."""
    import mlflow.pyfunc
    from mlflow.models import Model

    import lmops
    from lmops import mlflow_model

    package = Path(lmops.__file__).parent
    says = logging.getLogger("mlflow.pyfunc")  # "Validating input example against model signature" at INFO
    level = says.level
    says.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(), quiet_downloads():
            warnings.simplefilter("ignore", UserWarning)  # MLflow's hints about type hints and env vars
            return Model.log(None, flavor=mlflow.pyfunc, name=MODEL_NAME, run_id=run_id, step=step, tags=tags,
                             python_model=str(package / "mlflow_model.py"),
                             artifacts={mlflow_model.ARTIFACT: str(folder)}, code_paths=[str(package)],
                             signature=mlflow_model.signature(),
                             input_example=(["Once upon a time"], {"max_tokens": 4, "seed": 1}),
                             pip_requirements=_pip_requirements(), metadata={"lmops_version": lmops_version()})
    finally:
        says.setLevel(level)


def _pip_requirements() -> list[str]:
    """What the model's code imports, pinned to the versions here (a local build label such as
    torch's +cpu dropped: pip indexes do not know it)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("mlflow", "torch", "numpy", "pandas", "safetensors", "tokenizers", "pydantic", "pyyaml"):
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out


@contextmanager
def quiet_downloads() -> Iterator[None]:
    """No MLflow progress bars while lmops moves artifacts (MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        dst.hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)


def _checkpoint_meta(path: Path) -> dict:
    """The JSON meta of an lmops checkpoint, read from the safetensors header only (no tensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return json.loads((f.metadata() or {}).get("meta", "{}"))
    except Exception:  # not an lmops checkpoint: no meta to report, Checkpoint() says why when loading
        return {}
