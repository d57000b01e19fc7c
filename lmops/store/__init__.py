"""The metadata store: datasets, pipeline runs and their steps, the workspace lock, the audit log, and
for the server its API keys and request log.

One SQL database (lmops/store/db.py: SQLite in the workspace by default, PostgreSQL by URL), one
module per domain, each with its tables, the frozen records callers get (never ORM objects, so no
session outlives the method that opened it) and the operations on them:

    store.datasets   dataset versions              (lmops/store/datasets.py)
    store.pipeline   pipeline runs, steps, lock    (lmops/store/pipeline.py)
    store.audit      the hash-chained audit log    (lmops/store/audit.py)
    store.keys       API keys, stored as hashes    (lmops/store/keys.py)
    store.requests   the request log               (lmops/store/requests.py)
    store.endpoints  endpoints, deployments, traffic (lmops/store/endpoints.py)
    store.scores     scored live and shadow answers (lmops/store/scores.py)
    store.rollouts   rollouts, their analyses and driver lease (lmops/store/rollouts.py)
    store.monitor    monitor results per run and signal (lmops/store/monitor.py)
    store.alerts     alerts and their webhook delivery  (lmops/store/monitor.py)
    store.feedback   users' scores of completions       (lmops/store/monitor.py)
    store.loop       the loop's runs: alert -> retrain -> canary (lmops/store/loop.py)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from alembic.util import CommandError
from sqlalchemy import URL, exc, make_url
from sqlalchemy.orm import sessionmaker

from lmops.errors import LmopsError
from lmops.store.audit import GENESIS, AuditEntry, AuditLog, AuditVerification, audit_hash
from lmops.store.datasets import DatasetRecord, Datasets
from lmops.store.endpoints import Endpoints
from lmops.store.db import (
    MIGRATIONS, VERSION_TABLE, Base, alembic_config, create, default_actor, mask_url, migrate, utcnow,
)
from lmops.store.monitor import Alert, Alerts, Feedback, FeedbackLog, MonitorResult, MonitorResults
from lmops.store.loop import LoopRun, LoopRuns
from lmops.store.keys import KEY_PREFIX, ROLES, ApiKey, ApiKeys
from lmops.store.pipeline import LockHolder, PipelineRun, PipelineRuns, StepRun
from lmops.store.requests import REQUEST_FIELDS, RequestLog, RequestRecord, request_row
from lmops.store.rollouts import Rollout, Rollouts
from lmops.store.scores import AnswerScore, AnswerScores
from lmops.util import first_line

if TYPE_CHECKING:
    from lmops.config import Config
    from lmops.workspace import Workspace

DB_FILE = "lmops.db"

__all__ = [
    "Alert", "Feedback", "MonitorResult", "DB_FILE", "GENESIS", "AnswerScore", "KEY_PREFIX", "MIGRATIONS", "REQUEST_FIELDS", "ROLES", "VERSION_TABLE", "ApiKey",
    "AuditEntry", "AuditVerification", "Base", "DatasetRecord", "LockHolder", "LoopRun", "PipelineRun", "RequestRecord", "Rollout",
    "StepRun", "Store", "alembic_config", "audit_hash", "default_actor", "request_row", "utcnow",
]


class Store:
    def __init__(self, engine):
        """Use Store.open or Store.for_workspace: they bring the schema up to date first."""
        self.engine = engine
        sessions = sessionmaker(engine, expire_on_commit=False)
        self.datasets = Datasets(sessions)
        self.pipeline = PipelineRuns(sessions)
        self.audit = AuditLog(engine, sessions)
        self.keys = ApiKeys(sessions, self.audit)
        self.requests = RequestLog(sessions)
        self.endpoints = Endpoints(sessions, self.audit)
        self.scores = AnswerScores(sessions)
        self.rollouts = Rollouts(sessions)
        self.monitor = MonitorResults(sessions)
        self.alerts = Alerts(sessions)
        self.feedback = FeedbackLog(sessions)
        self.loop = LoopRuns(sessions)

    @classmethod
    def open(cls, url: str) -> Store:
        try:
            parsed = make_url(url)
        except exc.ArgumentError:
            raise LmopsError(
                "store.database_url is not a database URL; expected e.g. postgresql+psycopg://user@host:5432/lmops"
            ) from None
        if parsed.drivername == "postgresql":  # SQLAlchemy's default driver, psycopg2, is not a dependency
            parsed = parsed.set(drivername="postgresql+psycopg")
        shown = mask_url(parsed)
        if parsed.get_backend_name() not in ("sqlite", "postgresql"):
            raise LmopsError(f"store.database_url {shown}: only sqlite and postgresql databases are supported")
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        try:
            engine = create(parsed)
        except (ImportError, exc.NoSuchModuleError):
            raise LmopsError(
                f"no database driver for {shown}; install it with `pip install 'lmops[postgres]'`"
            ) from None
        try:
            migrate(engine)
        except exc.DBAPIError as err:
            engine.dispose()
            raise LmopsError(
                f"cannot open the metadata store at {shown} ({first_line(err.orig)}); check store.database_url "
                "in lmops.yaml"
            ) from None
        except CommandError as err:
            engine.dispose()
            raise LmopsError(
                f"the metadata store at {shown} has a schema this lmops does not know ({first_line(err)}); "
                "upgrade lmops"
            ) from None
        return cls(engine)

    @classmethod
    def for_workspace(cls, ws: Workspace, cfg: Config | None = None) -> Store:
        """The workspace's store: store.database_url, else .lmops/lmops.db. Relative SQLite paths are
        relative to the workspace, like every other path in lmops.yaml."""
        url = (cfg or ws.config()).store.database_url
        if url is None:
            return cls.open(URL.create("sqlite", database=str(ws.state / DB_FILE)).render_as_string())
        try:
            parsed = make_url(url)
        except exc.ArgumentError:
            return cls.open(url)  # open() words the error
        if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
            url = parsed.set(database=str(ws.resolve(parsed.database))).render_as_string(hide_password=False)
        return cls.open(url)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The database URL with its password masked: safe to print."""
        return mask_url(self.engine.url)
