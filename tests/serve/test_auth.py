"""API keys over HTTP: a tiny FastAPI app guarded by lmops.serve.auth, on a real store (SQLite, and the
PostgreSQL at 127.0.0.1:5432 when it runs), through fastapi.testclient (real HTTP semantics, in-process)."""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from lmops.config import AuthConfig
from lmops.serve.auth import Auth, Authenticator, TokenBucket, allows, install, require
from lmops.store import ApiKey, Store

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        with Store.open(f"sqlite:///{tmp_path / 'lmops.db'}") as s:
            yield s
        return
    psycopg = pytest.importorskip("psycopg", reason="psycopg not installed (pip install -e '.[dev]')")
    try:
        admin = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=2,
                                autocommit=True)
    except psycopg.Error as err:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432 as postgres/test ({str(err).splitlines()[0]})")
    schema = f"lmops_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        with Store.open(f"{PG}?options=-csearch_path%3D{schema}") as s:
            yield s
    finally:
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        admin.close()


def make_app(store: Store, **cfg) -> TestClient:
    app = FastAPI()
    install(app, store, AuthConfig(**cfg))

    @app.get("/v1/models")
    def models(key: ApiKey | None = Depends(require("inference"))) -> dict:
        return {"key": key.name if key else None}

    @app.post("/deployments")
    def deploy(key: ApiKey | None = Depends(require("deployer"))) -> dict:
        return {"key": key.name if key else None}

    @app.get("/admin")
    def admin(key: ApiKey | None = Depends(require("admin"))) -> dict:
        return {"key": key.name if key else None}

    return TestClient(app)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_roles_are_ordered():
    assert allows("admin", "inference") and allows("deployer", "deployer") and not allows("inference", "deployer")
    with pytest.raises(ValueError, match="unknown role 'root'"):
        require("root")


def test_keys_and_roles_over_http(store):
    client = make_app(store)
    _, infer = store.keys.create("app", "inference", "alice")
    _, deployer = store.keys.create("ci", "deployer", "alice")
    _, admin = store.keys.create("ops", "admin", "alice")

    r = client.get("/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json() == {"error": {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                  "param": None, "code": "invalid_api_key"}}
    assert "Authorization: Bearer" in r.json()["error"]["message"]
    for headers in ({"Authorization": "Basic dXNlcjpwdw=="}, bearer("lmk_" + "x" * 43), bearer(infer[:-2])):
        r = client.get("/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] in ("invalid_request_error", "authentication_error")
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers=bearer("lmk_" + "x" * 43)).json()["error"]["type"] == \
        "authentication_error"

    assert client.get("/v1/models", headers=bearer(infer)).json() == {"key": "app"}
    assert client.get("/v1/models", headers={"authorization": f"bearer {admin}"}).json() == {"key": "ops"}
    assert client.post("/deployments", headers=bearer(deployer)).json() == {"key": "ci"}
    r = client.post("/deployments", headers=bearer(infer))
    assert r.status_code == 403
    assert r.json()["error"]["type"] == "permission_error" and r.json()["error"]["code"] == "insufficient_role"
    assert "has role 'inference'" in r.json()["error"]["message"]
    assert client.get("/admin", headers=bearer(deployer)).status_code == 403
    assert client.get("/admin", headers=bearer(admin)).json() == {"key": "ops"}


def test_a_revoked_key_stops_working_within_the_cache_ttl(store):
    key, secret = store.keys.create("app", "inference", "alice")
    clock = Clock()
    authn = Authenticator(store, cache_ttl_s=5, clock=clock)
    assert authn.verify(secret) == key
    store.keys.revoke(key.id, by="bob")
    clock.now += 4.9
    assert authn.verify(secret) == key  # still cached
    clock.now += 0.2
    assert authn.verify(secret) is None  # asked the store again
    assert authn.cached(secret) == (True, None)

    other, other_secret = store.keys.create("app2", "inference", "alice")
    assert authn.verify(other_secret) == other
    store.keys.revoke(other.id, by="bob")
    authn.forget()  # revoked by this process: no need to wait
    assert authn.verify(other_secret) is None


def test_revocation_over_http_with_no_cache(store):
    client = make_app(store, key_cache_ttl_s=0)
    key, secret = store.keys.create("app", "inference", "alice")
    assert client.get("/v1/models", headers=bearer(secret)).status_code == 200
    store.keys.revoke(key.prefix, by="bob")
    r = client.get("/v1/models", headers=bearer(secret))
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_rate_limit_per_key_with_retry_after(store):
    client = make_app(store, rate_limit_per_s=0.1, burst=2)
    _, a = store.keys.create("a", "inference", "alice")
    _, b = store.keys.create("b", "inference", "alice")
    assert [client.get("/v1/models", headers=bearer(a)).status_code for _ in range(2)] == [200, 200]
    r = client.get("/v1/models", headers=bearer(a))
    assert r.status_code == 429 and r.headers["retry-after"] == "10"  # ceil(1 token / 0.1 per s - time taken)
    assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert client.get("/v1/models", headers=bearer(b)).status_code == 200  # each key has its own bucket


def test_auth_disabled_admits_everyone(store):
    client = make_app(store, enabled=False)
    assert client.get("/admin").json() == {"key": None}


def test_require_without_install_is_a_programming_error(store):
    app = FastAPI()

    @app.get("/")
    def root(key: ApiKey | None = Depends(require("inference"))) -> dict:
        return {}

    with pytest.raises(RuntimeError, match="install"):
        TestClient(app).get("/")


def test_token_bucket_refills_and_never_sleeps():
    clock = Clock()
    bucket = TokenBucket(rate_per_s=2, burst=3, clock=clock)
    assert [bucket.try_acquire()[0] for _ in range(4)] == [True, True, True, False]
    assert bucket.try_acquire() == (False, 0.5)
    clock.now += 0.5
    assert bucket.try_acquire() == (True, 0.0) and bucket.try_acquire() == (False, 0.5)
    clock.now += 100
    assert [bucket.try_acquire()[0] for _ in range(4)] == [True, True, True, False]  # capped at burst
    with pytest.raises(ValueError):
        TokenBucket(0, 1)


def test_token_bucket_is_thread_safe_and_usable_from_asyncio():
    clock = Clock()  # frozen: exactly `burst` acquisitions succeed, however many try at once
    bucket = TokenBucket(rate_per_s=1, burst=100, clock=clock)
    wins = []

    def grab() -> None:
        wins.extend(ok for ok, _ in (bucket.try_acquire() for _ in range(50)) if ok)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 100

    async def many() -> list[bool]:
        return [bucket.try_acquire()[0] for _ in range(3)]

    assert asyncio.run(many()) == [False, False, False]


def test_auth_buckets_are_per_key(store):
    auth = Auth(store, AuthConfig(rate_limit_per_s=1, burst=1), clock=Clock())
    assert auth.bucket(1) is auth.bucket(1) and auth.bucket(1) is not auth.bucket(2)
    assert auth.bucket(1).try_acquire()[0] and not auth.bucket(1).try_acquire()[0] and auth.bucket(2).try_acquire()[0]
