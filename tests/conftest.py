"""Shared fixtures: a tiny workspace on a slice of the demo corpus (no download, seconds to train)."""

import os
import uuid

import pytest

from lmops.config import override
from lmops.data.demo import demo_corpus
from lmops.store import Store
from lmops.workspace import init_workspace

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def pytest_configure(config):
    """Under xdist each worker gets its share of the cores, for itself and the processes it starts (set
    before PyTorch starts its pool): two workers of a thread per core each would oversubscribe the cores,
    and PyTorch's spinning threads then slow everything down many times over."""
    # Rich sizes lmops's consoles when lmops.cli is first imported, which any test may do first: tables
    # as wide as the cli fixture's COLUMNS whatever the order the tests run in
    os.environ.setdefault("COLUMNS", "200")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = max(1, (os.cpu_count() or 1) // workers)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(share))

TINY = [
    "tokenizer.kind=char", "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.block_size=32",
    "train.batch_size=4", "train.max_steps=12", "train.warmup_steps=2", "train.eval_interval=6",
    "train.eval_batches=2", "train.checkpoint_interval=100", "train.dtype=float32", "train.lr=3e-3",
]


@pytest.fixture
def workspace(tmp_path):
    ws = init_workspace(tmp_path / "ws")
    (ws.root / "corpus" / "docs.txt").write_text(demo_corpus()[:60_000], encoding="utf-8")
    return ws


@pytest.fixture
def tiny_sets():
    """TINY as `lmops --set` items, for tests that run the CLI."""
    return list(TINY)


@pytest.fixture
def tiny_config(workspace):
    return override(workspace.config(), TINY)


def tokenized(ws, cfg) -> dict:
    """The workspace corpus as a dataset version, validated and tokenized (what `lmops train` trains on):
    the tokenize step's outputs (dataset, tokens_dir, tokenizer_dir)."""
    from lmops.pipeline import prepare_data

    return prepare_data(ws, cfg, log=lambda m: None)


def run_killed_after(args: list[str], cwd, delay: float | None) -> float:
    """Run args (a Python script that prints 'ready' once its imports are done) and SIGKILL it `delay`
    seconds after that (None: let it finish, and it must succeed); return the seconds it ran after
    'ready'. For crash tests that spread kills over what the script does."""
    import subprocess
    import time

    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=cwd)
    try:
        assert proc.stdout.readline().strip() == "ready"
        start = time.perf_counter()
        if delay is not None:
            time.sleep(delay)  # not synchronisation: the moment of the kill
            proc.kill()
        code = proc.wait(timeout=120)
        assert delay is not None or code == 0
        return time.perf_counter() - start
    finally:
        proc.stdout.close()


# ----------------------------------------------------------------------------- a store on each database

def _pg_admin():
    psycopg = pytest.importorskip("psycopg", reason="psycopg not installed (pip install -e '.[dev]')")
    try:
        return psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=2, autocommit=True)
    except psycopg.Error as err:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432 as postgres/test ({str(err).splitlines()[0]})")


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'lmops.db'}"
        return
    admin = _pg_admin()
    schema = f"lmops_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{PG}?options=-csearch_path%3D{schema}"
    finally:
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        admin.close()


@pytest.fixture
def store(url):
    with Store.open(url) as s:
        yield s


@pytest.fixture
def cli(workspace, monkeypatch):
    """The CLI in this process on `workspace`, as user carol: cli(*args, code=0) -> its output, asserting
    the exit code."""
    from typer.testing import CliRunner

    from lmops.cli import app

    monkeypatch.setenv("LMOPS_USER", "carol")
    monkeypatch.setenv("LMOPS_WORKSPACE", str(workspace.root))
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()

    def run(*args, code=0):
        result = runner.invoke(app, list(args))
        assert result.exit_code == code, result.output
        return result.output
    return run
