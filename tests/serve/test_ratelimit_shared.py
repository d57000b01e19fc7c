"""Rate limits shared by replicas through Redis (auth.rate_limit_url), for real: two server processes on
one store and the machine's Redis (127.0.0.1:6379; skipped with the reason when none answers), one key
sending to both. With Redis the key gets its burst once across both; without, each replica grants it the
whole burst, which is what the setting is for. And a Redis that is gone limits per process, never refuses."""

from __future__ import annotations

import subprocess

import httpx
import pytest

from .conftest import free_port, serve_command, wait_ready

REDIS = "redis://127.0.0.1:6379/15"  # a database of its own; bucket names carry the key's random prefix
LIMITS = ("auth.rate_limit_per_s=0.2", "auth.burst=6")  # 6 at once, one more every 5 s


def redis_up() -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(REDIS, socket_connect_timeout=1).ping())
    except Exception:  # noqa: BLE001 - not installed, not running: skip
        return False


def replicas(env, *sets):
    """Two server processes of the same model on the same workspace store."""
    procs, urls = [], []
    for _ in range(2):
        port = free_port()
        procs.append(subprocess.Popen(serve_command(env.ws.root, env.model_dir, port, *LIMITS, *sets),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        urls.append(f"http://127.0.0.1:{port}")
    for proc, url in zip(procs, urls):
        wait_ready(proc, url)
    return procs, urls


def send_alternating(urls, secret, n=12) -> list[int]:
    headers = {"Authorization": f"Bearer {secret}"}
    return [httpx.get(f"{urls[i % 2]}/v1/models", headers=headers, timeout=10).status_code for i in range(n)]


def stop(procs) -> str:
    errors = ""
    for p in procs:
        p.terminate()
        p.wait(30)
        errors += p.stderr.read()
    return errors


@pytest.mark.skipif(not redis_up(), reason=f"no Redis at {REDIS} (CI and this machine run one on 127.0.0.1:6379)")
def test_one_keys_limit_holds_across_two_replicas_with_redis_and_not_without(env):
    shared_key = env.store.keys.create("shared limit", "inference", "tests")[1]
    own_key = env.store.keys.create("per-process limit", "inference", "tests")[1]
    procs, urls = replicas(env, f"auth.rate_limit_url={REDIS}")
    try:
        shared = send_alternating(urls, shared_key)
    finally:
        stop(procs)
    procs, urls = replicas(env)
    try:
        separate = send_alternating(urls, own_key)
    finally:
        stop(procs)
    # 12 requests within well under 5 s: the burst of 6, once for both replicas, and each refused a request
    assert shared.count(200) == 6 and shared.count(429) == 6, shared
    assert {c for i, c in enumerate(shared) if i % 2 == 0} == {200, 429} == {c for i, c in enumerate(shared) if i % 2}
    # the same 12 without Redis: each replica has its own bucket of 6
    assert separate == [200] * 12, separate


@pytest.mark.skipif(not redis_up(), reason=f"no Redis at {REDIS}")
def test_an_unreachable_redis_falls_back_to_per_process_limits(env):
    secret = env.store.keys.create("redis down", "inference", "tests")[1]
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    procs, urls = replicas(env, f"auth.rate_limit_url={dead}")
    try:
        codes = send_alternating(urls, secret)
    finally:
        err = stop(procs)
    assert codes == [200] * 12, codes  # limited per process (6 each), not refused
    assert "unreachable" in err and "limiting per process" in err, err[-2000:]
