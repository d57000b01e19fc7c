"""The tracking store survives a kill -9 during its first setup, and says what to do when it is corrupt."""

import subprocess
import sys

import pytest
from conftest import run_killed_after
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from lmops import tracking
from lmops.errors import LmopsError
from lmops.workspace import Workspace

# Configures the workspace's tracking (the first MLflow setup), after saying it is about to.
SETUP = """
import sys
from pathlib import Path
from lmops import tracking
from lmops.workspace import Workspace
ws = Workspace(Path(sys.argv[1]))
cfg = ws.config()
print("ready", flush=True)
tracking.configure(ws, cfg)
print("done", flush=True)
"""


def _setup_killed_after(root, delay: float | None) -> float:
    """Run SETUP on root and SIGKILL it `delay` seconds after its imports (None: let it finish);
    return the seconds from its imports to its end."""
    return run_killed_after([sys.executable, "-c", SETUP, str(root)], root, delay)


def test_a_kill_during_the_first_setup_never_breaks_the_store(workspace):
    """Killed at several moments of its first setup, the next configure works (it used to fail on a
    half-made database: `duplicate column name`, `table ... already exists`)."""
    # how long the setup takes here, to spread the kills over it
    took = _setup_killed_after(workspace.root, None)
    roots = []
    for i, fraction in enumerate((0.05, 0.2, 0.4, 0.6, 0.85)):
        ws = Workspace(workspace.root.parent / f"ws{i}")
        ws.root.mkdir()
        (ws.root / "lmops.yaml").write_bytes(workspace.config_path.read_bytes())
        _setup_killed_after(ws.root, took * fraction)
        roots.append(ws)
    for ws in roots:
        cfg = ws.config()
        uri = tracking.configure(ws, cfg)  # never raises
        exp = MlflowClient(uri).get_experiment_by_name(cfg.tracking.experiment)
        assert exp is not None and exp.artifact_location == (ws.state / "mlartifacts").as_uri()
        assert not list(ws.state.glob(".mlflow.db.tmp-*"))


def test_two_first_setups_at_once_both_succeed(workspace):
    """Two processes setting up the same new workspace at the same moment (a lock: one builds the
    database, the other waits and uses it)."""
    procs = [subprocess.Popen([sys.executable, "-c", SETUP, str(workspace.root)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=workspace.root) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-1000:] for _, err in outs]
    assert all(out.split() == ["ready", "done"] for out, _ in outs)
    cfg = workspace.config()
    assert len(MlflowClient(tracking.configure(workspace, cfg)).search_experiments()) == 2  # Default + lmops


def test_a_half_made_store_from_an_older_lmops_is_rebuilt(workspace):
    """A database whose schema creation stopped midway (as an older lmops left it) and that holds
    nothing is rebuilt instead of failing every later command."""
    import sqlite3

    workspace.state.mkdir(parents=True, exist_ok=True)
    db = workspace.state / "mlflow.db"
    con = sqlite3.connect(db)  # tables of MLflow's first migration, no schema version yet
    con.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name VARCHAR(256))")
    con.execute("CREATE TABLE runs (run_uuid VARCHAR(32) PRIMARY KEY, storage_location VARCHAR(256))")
    con.commit()
    con.close()
    cfg = workspace.config()
    uri = tracking.configure(workspace, cfg)
    assert MlflowClient(uri).get_experiment_by_name(cfg.tracking.experiment) is not None


@pytest.mark.parametrize("content", [b"this is not a database" * 100, b"SQLite format 3\x00" + b"\xff" * 2000])
def test_a_corrupt_store_is_one_clear_error(workspace, content):
    workspace.state.mkdir(parents=True, exist_ok=True)
    db = workspace.state / "mlflow.db"
    db.write_bytes(content)
    with pytest.raises(LmopsError) as err:
        tracking.configure(workspace, workspace.config())
    message = str(err.value)
    assert "\n" not in message and str(db) in message and "move it aside" in message
    assert db.read_bytes() == content  # never replaced: it may hold runs someone wants back


def test_a_store_mlflow_refuses_for_another_reason_is_not_called_corrupt(workspace, monkeypatch):
    """A readable database MLflow fails on (here: a lock held by another process) gets MLflow's
    reason, not the advice to move it aside."""
    cfg = workspace.config()
    tracking.configure(workspace, cfg)

    def locked(self, name):
        raise MlflowException("(sqlite3.OperationalError) database is locked")

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", locked)
    reason = r"mlflow.db: MLflow failed on the tracking database \(.*database is locked\)"
    with pytest.raises(LmopsError, match=reason) as err:
        tracking.configure(workspace, cfg)
    assert "move it aside" not in str(err.value)
