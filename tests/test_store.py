"""The metadata store on SQLite and on the PostgreSQL at 127.0.0.1:5432 (skipped when not running).

Each PostgreSQL test gets a schema of its own (search_path in the URL), dropped afterwards. Locking
and concurrent audit appends are tested with real second processes.
"""

import subprocess
import sys
import time

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import exc, text

from lmops.config import parse_config
from lmops.errors import LmopsError
from lmops.store import GENESIS, MIGRATIONS, VERSION_TABLE, Base, Store, alembic_config, audit_hash, default_actor
from lmops.workspace import init_workspace

HOLD_LOCK = """
import sys
from lmops.store import Store
store = Store.open(sys.argv[1])
with store.pipeline.lock():
    print("locked", flush=True)
    sys.stdin.readline()
store.close()
"""

APPEND = """
import sys
from lmops.store import Store
store = Store.open(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
for i in range(20):
    store.audit.append(sys.argv[2], "test.append", f"item-{i}", {"i": i, "writer": sys.argv[2]})
store.close()
"""


def _python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)


def test_migrated_schema_is_the_orm_schema(store, url):
    with store.engine.connect() as conn:
        opts = {"compare_type": True, "compare_server_default": True, "version_table": VERSION_TABLE}
        ctx = MigrationContext.configure(conn, opts=opts)
        assert compare_metadata(ctx, Base.metadata) == []
        head = ScriptDirectory.from_config(alembic_config(conn)).get_current_head()
        assert ctx.get_current_revision() == head == "0006"
    with Store.open(url) as again:  # opening a store at head changes nothing
        assert again.audit.verify().ok
    assert (MIGRATIONS / "env.py").is_file()


def test_datasets(store):
    a = store.datasets.add("ab12" + "0" * 60, "ab12", "/data/a", None, 3, "alice", {"chars": 100})
    assert store.datasets.add(a.id, "other", "/elsewhere", None, 9, "bob", {}) == a  # idempotent on id
    b = store.datasets.add("ab34" + "1" * 60, "ab34", "/data/b", a.id, 2, "bob", {"dropped": {"pii": 1}})
    assert b.parent == a.id and b.summary == {"dropped": {"pii": 1}} and b.created_at.tzinfo is not None
    assert store.datasets.get(a.id) == a
    assert store.datasets.get("ab34") == b  # short id
    assert store.datasets.get("ab120") == a  # unique prefix of the id
    with pytest.raises(LmopsError, match=r"dataset 'ab' is ambiguous \(ab12, ab34\); give more characters"):
        store.datasets.get("ab")
    with pytest.raises(LmopsError, match="no dataset matches 'zz'"):
        store.datasets.get("zz")
    with pytest.raises(LmopsError, match="no dataset matches 'a%'"):  # LIKE wildcards are literal
        store.datasets.get("a%")
    with pytest.raises(LmopsError, match="its parent nope is not in the metadata store"):
        store.datasets.add("cd" * 32, "cdcd", "/data/c", "nope", 1, "bob", {})
    assert [d.id for d in store.datasets.list()] == [a.id, b.id]


def test_pipeline_runs_steps_and_cache(store):
    run = store.pipeline.start_run("cfg1", "alice")
    assert run.status == "running" and run.steps == ()
    ingest = store.pipeline.start_step(run.id, "ingest", "key-a")
    assert store.pipeline.find_cached_step("ingest", "key-a") is None  # still running
    done = store.pipeline.finish_step(ingest.id, "succeeded", {"dataset": "ab12"})
    assert done.duration_s is not None and done.duration_s >= 0 and done.finished_at >= done.started_at
    train = store.pipeline.start_step(run.id, "train", "key-b")
    store.pipeline.finish_step(train.id, "failed", {}, error="out of memory")
    finished = store.pipeline.finish_run(run.id, "failed", error="train failed")
    assert (finished.status, finished.error) == ("failed", "train failed") and finished.duration_s >= 0
    assert [(s.name, s.status) for s in finished.steps] == [("ingest", "succeeded"), ("train", "failed")]

    run2 = store.pipeline.start_run("cfg1", "bob")
    hit = store.pipeline.find_cached_step("ingest", "key-a")
    assert hit is not None and hit.outputs == {"dataset": "ab12"} and hit.run_id == run.id
    step = store.pipeline.start_step(run2.id, "ingest", "key-a")
    store.pipeline.finish_step(step.id, "succeeded", hit.outputs, cached=True)
    assert store.pipeline.find_cached_step("train", "key-b") is None  # only succeeded steps are reused
    assert store.pipeline.find_cached_step("ingest", "key-a").id == step.id  # the latest
    store.pipeline.finish_run(run2.id, "succeeded")
    runs = store.pipeline.list_runs(limit=10)
    assert [r.id for r in runs] == [run2.id, run.id] and runs[0].steps[0].cached
    assert store.pipeline.get_run(run2.id).started_by == "bob"
    with pytest.raises(LmopsError, match="no pipeline run 999"):
        store.pipeline.get_run(999)
    with pytest.raises(ValueError, match="status 'done'"):
        store.pipeline.finish_run(run2.id, "done")


def test_lock_excludes_a_second_process(store, url):
    holder = _python(HOLD_LOCK, url)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LmopsError, match=rf"another pipeline run \(pid {holder.pid} on host .+ since .+\) holds "
                                             r"the workspace lock; wait for it"):
            with store.pipeline.lock():
                pass
        assert store.pipeline.lock_holder().pid == holder.pid
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=20) == 0
    finally:
        holder.kill()
    assert store.pipeline.lock_holder() is None  # released on exit
    with store.pipeline.lock() as me:
        assert store.pipeline.lock_holder() == me
        with pytest.raises(LmopsError, match="holds the workspace lock"):  # not re-entrant
            with store.pipeline.lock():
                pass
    assert store.pipeline.lock_holder() is None


def test_lock_of_a_killed_process_is_taken_over(store, url):
    holder = _python(HOLD_LOCK, url)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()  # SIGKILL: no chance to release
    holder.wait(timeout=20)
    assert store.pipeline.lock_holder().pid == holder.pid
    with store.pipeline.lock() as me:
        assert me.pid != holder.pid
    with store.engine.begin() as conn:  # a dead pid on another host cannot be checked: kept
        conn.execute(text("INSERT INTO locks (name, holder, pid, host, acquired_at) VALUES "
                          "('pipeline', 'carol', :pid, 'elsewhere', CURRENT_TIMESTAMP)"), {"pid": holder.pid})
    with pytest.raises(LmopsError, match=f"pid {holder.pid} on host elsewhere .*by carol"):
        with store.pipeline.lock():
            pass
    assert store.pipeline.break_lock().host == "elsewhere"
    with store.pipeline.lock():
        pass


def test_audit_chain(store):
    first = store.audit.append("alice", "dataset.add", "ab12", {"b": 2, "a": 1}, reason="new corpus")
    assert (first.seq, first.prev_hash) == (1, GENESIS)
    assert first.hash == audit_hash(1, first.timestamp, "alice", "dataset.add", "ab12", {"a": 1, "b": 2},
                                    "new corpus", GENESIS)
    second = store.audit.append("bob", "model.promote", "m1", {"to": "production"})
    assert (second.seq, second.prev_hash, second.reason) == (2, first.hash, None)
    store.audit.append("bob", "dataset.add", "cd34", {})
    assert [e.seq for e in store.audit.list()] == [3, 2, 1]
    assert [e.seq for e in store.audit.list(action="dataset.add")] == [3, 1]
    assert store.audit.list(subject="m1") == [second]
    assert [e.seq for e in store.audit.list(limit=1)] == [3]
    assert store.audit.verify().ok and store.audit.verify().entries == 3


def test_audit_log_refuses_update_and_delete(store):
    store.audit.append("alice", "x", "y", {})
    for statement in ("UPDATE audit_log SET actor = 'mallory'", "DELETE FROM audit_log"):
        with pytest.raises(exc.DBAPIError, match="append-only"):
            with store.engine.begin() as conn:
                conn.execute(text(statement))
    assert store.audit.list()[0].actor == "alice"


def _drop_append_only_guard(store):
    """What someone with the database owner's rights can do; the hash chain must still tell."""
    with store.engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.execute(text("DROP TRIGGER audit_log_no_update"))
            conn.execute(text("DROP TRIGGER audit_log_no_delete"))
        else:
            conn.execute(text("DROP TRIGGER audit_log_no_update ON audit_log"))


def _rehash(store, seq):
    """Tamper cleverly: fix the edited entry's own hash (but its successor still points at the old one)."""
    e = next(e for e in store.audit.list(limit=100) if e.seq == seq)
    digest = audit_hash(e.seq, e.timestamp, e.actor, e.action, e.subject, e.details, e.reason, e.prev_hash)
    return f"UPDATE audit_log SET hash = '{digest}' WHERE seq = {seq}"


TAMPERING = {
    "edit": (["UPDATE audit_log SET details = '{\"i\":99}' WHERE seq = 3"], 3, "does not match its hash"),
    "edit-and-rehash": (["UPDATE audit_log SET details = '{\"i\":99}' WHERE seq = 3", "REHASH 3"], 4,
                        "does not follow entry 3"),
    "delete": (["DELETE FROM audit_log WHERE seq = 3"], 3, "entry 3 is missing"),
    "delete-first": (["DELETE FROM audit_log WHERE seq = 1"], 1, "entry 1 is missing"),
    "swap": (["UPDATE audit_log SET seq = -seq WHERE seq IN (2, 4)", "UPDATE audit_log SET seq = 4 WHERE seq = -2",
              "UPDATE audit_log SET seq = 2 WHERE seq = -4"], 2, "entry 2 does not match its hash"),
}


@pytest.mark.parametrize("how", TAMPERING)
def test_audit_tampering_is_detected(store, how):
    for i in range(5):
        store.audit.append("alice", "step", f"s{i}", {"i": i})
    _drop_append_only_guard(store)
    statements, bad_seq, reason = TAMPERING[how]
    for statement in statements:
        if statement.startswith("REHASH"):
            statement = _rehash(store, int(statement.split()[1]))
        with store.engine.begin() as conn:
            conn.exec_driver_sql(statement)
    result = store.audit.verify()
    assert not result.ok and result.first_bad_seq == bad_seq and reason in result.reason
    assert result.entries == bad_seq - 1  # the entries before it are still good


def test_concurrent_audit_appends_keep_one_chain(store, url):
    writers = [_python(APPEND, url, name) for name in ("w1", "w2")]
    try:
        for w in writers:
            assert w.stdout.readline().strip() == "ready"
        for w in writers:  # go together
            w.stdin.write("\n")
            w.stdin.flush()
        assert [w.wait(timeout=60) for w in writers] == [0, 0]
    finally:
        for w in writers:
            w.kill()
    assert store.audit.verify() == store.audit.verify().__class__(True, 40)
    entries = store.audit.list(limit=100)
    assert sorted(e.seq for e in entries) == list(range(1, 41))
    assert sorted(e.actor for e in entries) == ["w1"] * 20 + ["w2"] * 20


def test_unreachable_database_fails_fast_with_the_password_masked():
    pytest.importorskip("psycopg", reason="psycopg not installed (pip install -e '.[dev]')")
    start = time.monotonic()
    with pytest.raises(LmopsError) as err:
        Store.open("postgresql://lmops:s3cret@127.0.0.1:1/lmops")
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "postgresql+psycopg://lmops:***@127.0.0.1:1/lmops" in message and "s3cret" not in message
    assert "check store.database_url" in message and "\n" not in message


def test_bad_urls_are_named():
    with pytest.raises(LmopsError, match="store.database_url is not a database URL"):
        Store.open("not a url")
    with pytest.raises(LmopsError, match=r"mysql://u:\*\*\*@h/db: only sqlite and postgresql"):
        Store.open("mysql://u:pw@h/db")


def test_workspace_store(tmp_path, monkeypatch):
    ws = init_workspace(tmp_path / "ws")
    with Store.for_workspace(ws) as store:  # default: a SQLite file in .lmops/
        store.audit.append(default_actor(), "workspace.init", str(ws.root), {})
    assert (ws.state / "lmops.db").is_file()
    cfg = parse_config({"store": {"database_url": "sqlite:///meta/store.db"}})
    monkeypatch.chdir(tmp_path)
    with Store.for_workspace(ws, cfg) as store:  # relative to the workspace, not the current folder
        assert store.audit.verify().entries == 0
    assert (ws.root / "meta" / "store.db").is_file()


def test_default_actor(monkeypatch):
    monkeypatch.setenv("LMOPS_USER", "ci-bot")
    assert default_actor() == "ci-bot"
    monkeypatch.delenv("LMOPS_USER")
    assert default_actor()


def test_a_schema_from_a_newer_lmops_is_named(tmp_path):
    url = f"sqlite:///{tmp_path / 'lmops.db'}"
    with Store.open(url) as store, store.engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    with pytest.raises(LmopsError, match=r"has a schema this lmops does not know .*; upgrade lmops"):
        Store.open(url)


# ---------------------------------------------------------------------------------------------- serving: 0002


def test_migration_0002_upgrades_a_0001_store_and_downgrades(url):
    from alembic import command
    from sqlalchemy import create_engine, inspect

    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0001")
        with Store.open(url) as store:  # opening upgrades to head, keeping what was there
            assert store.audit.verify().entries == 0
            key, _ = store.keys.create("ci", "inference", "alice")
            store.requests.log([{"request_id": "r1", "route": "/v1/completions", "status_code": 200,
                                 "key_id": key.id}])
        with engine.begin() as conn:
            assert {"api_keys", "request_log"} <= set(inspect(conn).get_table_names())
            command.downgrade(alembic_config(conn), "0001")
        with engine.connect() as conn:
            assert not {"api_keys", "request_log"} & set(inspect(conn).get_table_names())
            assert MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision() \
                == "0001"
    finally:
        engine.dispose()


def test_api_keys(store):
    import hashlib

    key, secret = store.keys.create("ci-bot", "inference", "alice")
    assert secret.startswith("lmk_") and len(secret) == 4 + 43 and secret[:12] == key.prefix
    assert (key.name, key.role, key.created_by, key.revoked_at, key.revoked) == ("ci-bot", "inference", "alice",
                                                                                 None, False)
    with store.engine.connect() as conn:  # only the hash of the secret is stored
        stored = conn.execute(text("SELECT * FROM api_keys")).mappings().one()
    assert stored["hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in " ".join(map(str, stored.values()))

    assert store.keys.verify(secret) == key
    for wrong in (secret[:-1] + ("A" if secret[-1] != "A" else "B"), secret[:12], "", "Bearer " + secret,
                  "sk-" + secret[4:], key.prefix + "x" * 35):
        assert store.keys.verify(wrong) is None

    admin, admin_secret = store.keys.create("ops", "admin", "alice")
    assert [k.id for k in store.keys.list()] == [key.id, admin.id]
    with pytest.raises(LmopsError, match="unknown role 'root'; use one of inference, deployer, admin"):
        store.keys.create("x", "root", "alice")
    with pytest.raises(LmopsError, match="needs a name"):
        store.keys.create(" ", "admin", "alice")

    revoked = store.keys.revoke(key.prefix[:9], by="bob")  # a unique start of the prefix
    assert revoked.revoked and revoked.id == key.id
    assert store.keys.verify(secret) is None and store.keys.verify(admin_secret) == admin
    assert store.keys.revoke(str(key.id), by="carol") == revoked  # again: unchanged, no new audit entry
    assert store.keys.revoke(admin.id, by="bob").revoked
    with pytest.raises(LmopsError, match="no API key matches 'lmk_zzzz'"):
        store.keys.revoke("lmk_zzzz", by="bob")
    with pytest.raises(LmopsError, match="no API key matches '999'"):
        store.keys.revoke("999", by="bob")
    with pytest.raises(LmopsError, match=r"API key 'lmk_' is ambiguous \(lmk_.*, lmk_.*\); give more characters"):
        store.keys.revoke("lmk_", by="bob")

    entries = store.audit.list()
    assert [(e.action, e.actor, e.subject) for e in entries] == [
        ("api_key.revoked", "bob", f"api_key:{admin.prefix}"), ("api_key.revoked", "bob", f"api_key:{key.prefix}"),
        ("api_key.created", "alice", f"api_key:{admin.prefix}"), ("api_key.created", "alice", f"api_key:{key.prefix}"),
    ]
    assert entries[-1].details == {"id": key.id, "name": "ci-bot", "role": "inference"}
    assert not any(s in repr(entries) for s in (secret, admin_secret, secret[12:], admin_secret[12:]))
    assert store.audit.verify().ok


def test_api_key_roles_are_checked_by_the_database(store):
    with pytest.raises(exc.IntegrityError):
        with store.engine.begin() as conn:
            conn.execute(text("INSERT INTO api_keys (name, role, prefix, hash, created_at, created_by) "
                              "VALUES ('x', 'root', 'lmk_x', 'h', CURRENT_TIMESTAMP, 'me')"))


def test_request_log(store):
    from datetime import UTC, datetime, timedelta

    key, _ = store.keys.create("ci", "inference", "alice")
    t0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    rows = [{"ts": t0 + timedelta(seconds=i), "request_id": f"r{i}", "key_id": key.id, "model": "lmops-model",
             "model_version": "3", "route": "/v1/chat/completions", "status_code": 200, "prompt": f"p{i}",
             "completion": "c", "prompt_tokens": 5, "completion_tokens": 7, "queue_s": 0.01, "ttft_s": 0.05,
             "latency_s": 0.2, "moderation": {"action": "redact", "hits": {"pii": ["email"]}}} for i in range(5)]
    rows.append({"request_id": "bad", "route": "/v1/completions", "status_code": 401,
                 "error": "invalid key", "prompt": "nul\x00byte"})  # ts defaults to now; other columns to NULL
    assert store.requests.log(rows) == 6
    assert store.requests.log([]) == 0

    listed = store.requests.list(limit=10)
    assert [r.request_id for r in listed] == ["bad", "r4", "r3", "r2", "r1", "r0"]  # newest first
    assert (listed[0].key_id, listed[0].model, listed[0].prompt) == (None, None, "nul\ufffdbyte")
    assert listed[0].ts > t0 and listed[0].ts.tzinfo is not None
    r4 = listed[1]
    assert (r4.ts, r4.key_id, r4.model_version, r4.completion_tokens, r4.ttft_s, r4.moderation) == (
        t0 + timedelta(seconds=4), key.id, "3", 7, 0.05, {"action": "redact", "hits": {"pii": ["email"]}})
    assert [r.request_id for r in store.requests.list(limit=2)] == ["bad", "r4"]
    assert [r.request_id for r in store.requests.list(since=t0 + timedelta(seconds=3))] == ["bad", "r4", "r3"]

    with pytest.raises(ValueError, match="request_log has no column prompt_text"):
        store.requests.log([{"request_id": "x", "route": "/", "status_code": 200, "prompt_text": "hi"}])
    with pytest.raises(ValueError, match="request_log row without status_code"):
        store.requests.log([{"request_id": "x", "route": "/"}])
    with pytest.raises(exc.IntegrityError):  # one transaction: a row the database refuses takes the batch with it
        store.requests.log([{"request_id": "ok", "route": "/", "status_code": 200},
                            {"request_id": "no-such-key", "route": "/", "status_code": 200, "key_id": 999}])
    assert len(store.requests.list(limit=100)) == 6
