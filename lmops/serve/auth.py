"""Who may call the server: API keys, roles and per-key rate limits.

- A request carries `Authorization: Bearer lmk_...`, a key made by `store.keys.create`. The store
  checks it (`store.keys.verify`); the answer is cached for `auth.key_cache_ttl_s` (5 s), so a busy
  server asks the database once per key every few seconds rather than on every request, and a revoked
  key stops working within those seconds (sooner than anyone reacts to a leak).
- Roles are ordered inference < deployer < admin: a route requiring deployer admits deployer and admin.
- Each key has a token bucket: `auth.rate_limit_per_s` sustained, `auth.burst` at once. In the process by
  default; with `auth.rate_limit_url: redis://...` in Redis (RedisBuckets: one Lua script per request,
  atomic, on Redis's clock), so the limit of a key holds across all replicas of the server.
- Refusals are OpenAI-style error bodies, which OpenAI clients turn into their typed exceptions:
  401 (missing, invalid or revoked key), 403 (role too low), 429 (rate limited, with Retry-After).

Wiring: `install(app, store, cfg.auth)` once, then `key = Depends(require("inference"))` on a route.
With `auth.enabled: false`, `require` admits everyone and returns None instead of a key.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from lmops.errors import LmopsError
from lmops.store import ROLES, ApiKey, Store

log = logging.getLogger("lmops.serve")

if TYPE_CHECKING:
    from lmops.config import AuthConfig

ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}  # inference 0 < deployer 1 < admin 2
CACHE_MAX_ENTRIES = 10_000  # bounds memory when clients send many different wrong keys

_bearer = HTTPBearer(auto_error=False, description="An lmops API key: `lmops keys create` makes one.")


def allows(have: str, need: str) -> bool:
    """A key with role `have` may do what role `need` may."""
    return ROLE_RANK[have] >= ROLE_RANK[need]


class Authenticator:
    """Verifies secrets against the store, caching each answer (the key, or None) for cache_ttl_s.

    The cache is keyed by the secret's sha256, so no secret is kept in memory past the request.
    Negative answers are cached too: a client retrying a wrong key does not reach the database.
    """

    def __init__(self, store: Store, cache_ttl_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.cache_ttl_s = cache_ttl_s
        self._clock = clock
        self._cache: dict[bytes, tuple[ApiKey | None, float]] = {}  # sha256(secret) -> (answer, expires)
        self._lock = threading.Lock()

    def cached(self, secret: str) -> tuple[bool, ApiKey | None]:
        """(True, answer) when a fresh answer is cached; no I/O, safe on the event loop."""
        digest = hashlib.sha256(secret.encode("utf-8")).digest()
        with self._lock:
            entry = self._cache.get(digest)
        if entry is None or entry[1] <= self._clock():
            return False, None
        return True, entry[0]

    def verify(self, secret: str) -> ApiKey | None:
        """The key for this secret, or None (unknown or revoked): from the cache, else from the store."""
        hit, key = self.cached(secret)
        if hit:
            return key
        key = self.store.keys.verify(secret)
        if self.cache_ttl_s > 0:
            digest = hashlib.sha256(secret.encode("utf-8")).digest()
            now = self._clock()
            with self._lock:
                if len(self._cache) >= CACHE_MAX_ENTRIES:
                    self._cache = {d: e for d, e in self._cache.items() if e[1] > now}
                    if len(self._cache) >= CACHE_MAX_ENTRIES:
                        self._cache.clear()
                self._cache[digest] = (key, now + self.cache_ttl_s)
        return key

    def forget(self) -> None:
        """Drop every cached answer: a key revoked by this process stops working at once."""
        with self._lock:
            self._cache.clear()


class TokenBucket:
    """`burst` tokens, refilled at `rate_per_s`; a request takes one. Thread-safe, and never sleeps:
    try_acquire answers at once, so it is as usable from asyncio as from threads."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic):
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be positive and burst at least 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()
        self._lock = threading.Lock()

    def try_acquire(self, n: int = 1) -> tuple[bool, float]:
        """(True, 0.0) and n tokens taken, or (False, seconds until n tokens are there); all or none."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._updated) * self.rate_per_s)
            self._updated = now
            if self._tokens >= n:
                self._tokens -= n
                return True, 0.0
            return False, (n - self._tokens) / self.rate_per_s


class RedisBuckets:
    """TokenBucket's arithmetic in Redis, for every replica at once: one hash per key (tokens, updated),
    read, refilled and taken from by one Lua script (atomic: two replicas cannot both take the last
    token), on Redis's own clock (replicas' clocks need not agree). A bucket left alone expires once it
    would be full again anyway."""

    SCRIPT = """
local rate, burst, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens, updated = tonumber(state[1]) or burst, tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - updated) * rate)
local ok, wait = 0, 0
if tokens >= n then tokens = tokens - n; ok = 1 else wait = (n - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {ok, tostring(wait)}
"""

    def __init__(self, url: str, rate_per_s: float, burst: int):
        try:
            import redis.asyncio
        except ImportError:
            raise LmopsError("auth.rate_limit_url needs the redis package: pip install 'lmops[redis]'") from None
        self.url, self.rate_per_s, self.burst = url, rate_per_s, burst
        self.client = redis.asyncio.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._script = self.client.register_script(self.SCRIPT)

    async def try_acquire(self, key: ApiKey, n: int = 1) -> tuple[bool, float]:
        # the key's public prefix is random per key: two stores sharing one Redis never share a bucket
        ok, wait = await self._script(keys=[f"lmops:rate:{key.prefix}:{key.id}"], args=[self.rate_per_s, self.burst, n])
        return bool(ok), float(wait)


class Auth:
    """What `require` needs, kept on app.state.auth: the config, the authenticator, a bucket per key
    (here, or in Redis when auth.rate_limit_url says so)."""

    def __init__(self, store: Store, cfg: AuthConfig, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.authenticator = Authenticator(store, cfg.key_cache_ttl_s, clock)
        self._clock = clock
        self._buckets: dict[int, TokenBucket] = {}  # one per key id: keys are few, made by admins
        self._lock = threading.Lock()
        self.shared = RedisBuckets(cfg.rate_limit_url, cfg.rate_limit_per_s, cfg.burst) if cfg.rate_limit_url else None
        self._shared_down = False  # logged once per outage

    def bucket(self, key_id: int) -> TokenBucket:
        with self._lock:
            if (bucket := self._buckets.get(key_id)) is None:
                bucket = self._buckets[key_id] = TokenBucket(self.cfg.rate_limit_per_s, self.cfg.burst, self._clock)
            return bucket

    async def acquire(self, key: ApiKey, n: int = 1) -> tuple[bool, float]:
        """Take n tokens of key's bucket: the shared one when configured and reachable, else this process's."""
        if self.shared is not None:
            try:
                result = await self.shared.try_acquire(key, n)
                if self._shared_down:
                    log.warning("rate limits: Redis at %s is back; limits are shared again", self.shared.url)
                    self._shared_down = False
                return result
            except Exception as err:  # noqa: BLE001 - any Redis failure: limit here rather than refuse everyone
                if not self._shared_down:
                    log.error("rate limits: Redis at %s unreachable (%s); limiting per process until it is back",
                              self.shared.url, err)
                    self._shared_down = True
        return self.bucket(key.id).try_acquire(n)


class AuthError(HTTPException):
    """An HTTPException whose detail is an OpenAI-style error body; `install` sends it as the body."""

    def __init__(self, status_code: int, message: str, type: str, code: str, headers: dict[str, str] | None = None):
        body = {"error": {"message": message, "type": type, "param": None, "code": code}}
        super().__init__(status_code, body, headers)


async def _send_auth_error(_request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, AuthError)
    return JSONResponse(err.detail, status_code=err.status_code, headers=err.headers)


def install(app: FastAPI, store: Store, cfg: AuthConfig) -> Auth:
    """Make `require` work on this app: keep an Auth on app.state.auth and send AuthError bodies as they
    are (FastAPI would wrap them in {"detail": ...}). Only AuthError is handled: the app's other
    HTTPExceptions keep whatever handler it gives them."""
    auth = Auth(store, cfg)
    app.state.auth = auth
    app.add_exception_handler(AuthError, _send_auth_error)
    return auth


def require(role: str) -> Callable[..., Awaitable[ApiKey | None]]:
    """A FastAPI dependency admitting keys of `role` or higher: returns the caller's ApiKey (None when
    auth.enabled is false) or raises AuthError 401, 403 or 429."""
    if role not in ROLE_RANK:
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")

    async def dependency(request: Request,
                         credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> ApiKey | None:
        auth: Any = getattr(request.app.state, "auth", None)
        if not isinstance(auth, Auth):
            raise RuntimeError("lmops.serve.auth.install(app, store, cfg.auth) must be called before require()")
        if not auth.cfg.enabled:
            return None
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None:
            raise AuthError(401, "Missing API key: send it as 'Authorization: Bearer lmk_...'; an admin creates "
                            "keys with `lmops keys create`.", "invalid_request_error", "invalid_api_key", challenge)
        secret = credentials.credentials
        hit, key = auth.authenticator.cached(secret)
        if not hit:  # the store is a database call: off the event loop
            key = await run_in_threadpool(auth.authenticator.verify, secret)
        if key is None:
            raise AuthError(401, "Invalid or revoked API key; use a current key (`lmops keys list` shows them) or "
                            "ask an admin for a new one.", "authentication_error", "invalid_api_key", challenge)
        if not allows(key.role, role):
            raise AuthError(403, f"API key {key.prefix} ({key.name}) has role '{key.role}' and this endpoint needs "
                            f"'{role}'; use a key with that role.", "permission_error", "insufficient_role")
        ok, retry_after_s = await auth.acquire(key)
        if not ok:
            seconds = max(1, math.ceil(retry_after_s))
            raise AuthError(429, f"Rate limit reached for API key {key.prefix}: {auth.cfg.rate_limit_per_s:g} "
                            f"requests/s, bursts of {auth.cfg.burst}; retry after {seconds} s.", "rate_limit_error",
                            "rate_limit_exceeded", {"Retry-After": str(seconds)})
        return key

    return dependency
