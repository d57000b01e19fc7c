"""Serving an endpoint for real: a live uvicorn server, real HTTP clients, the store the CLI writes.

Two deployments of the tiny table model (different seeds, so their logits differ) behind one endpoint;
traffic moves through the store as `lmops traffic set` moves it, and the server follows within
serve.endpoint_poll_s. The rollout tests run the real Driver in the test process against the live
server's request log.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lmops.deploy.models import resolve_deployment
from lmops.serve.app import create_app
from lmops.serve.router import HEADER, VERSION_HEADER
from .conftest import LiveServer, save_model, table_model

POLL = "serve.endpoint_poll_s=0.2"
LIMITS = ("auth.rate_limit_per_s=10000", "auth.burst=10000")  # these tests send fast on purpose


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tok):
    out = {}
    for name, seed in (("blue", 0), ("green", 1)):
        folder = tmp_path_factory.mktemp(name) / name
        save_model(folder, table_model(tok, seed=seed), tok)
        out[name] = folder
    return out


@pytest.fixture()
def endpoint(env, folders, request):
    """A fresh endpoint with blue (all traffic) and green (0%), and a server of it."""
    name = f"ep-{request.node.name[5:25].replace('_', '-').rstrip('-')}"
    store = env.store
    store.endpoints.create(name, "tests")
    for d in ("blue", "green"):
        store.endpoints.deploy(resolve_deployment(env.ws, env.config(), name, d, str(folders[d])), "tests")
    return name


def serve_endpoint(env, name: str, *sets: str) -> LiveServer:
    cfg = env.config(POLL, *LIMITS, *sets)
    live = LiveServer(create_app(cfg, None, env.store, endpoint=name, ws=env.ws))
    env.servers.append(live)
    return live


def complete(live, key, model, headers=None, **body):
    r = httpx.post(f"{live.url}/v1/completions", headers={**bearer(key), **(headers or {})},
                   json={"model": model, "prompt": "the quick", "max_tokens": 2, **body}, timeout=60)
    return r


def wait_for(predicate, timeout=10.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_routing_follows_the_weights_and_the_header_reaches_a_deployment_at_zero(env, endpoint):
    from scipy.stats import binomtest

    env.store.endpoints.set_traffic(endpoint, "tests", {"blue": 70, "green": 30})
    live = serve_endpoint(env, endpoint)
    key = env.keys["inference"]
    served = [complete(live, key, endpoint) for _ in range(200)]
    assert [r.status_code for r in served] == [200] * 200, [r.text for r in served if r.status_code != 200][:2]
    green = sum(r.headers[HEADER] == "green" for r in served)
    assert {r.headers[HEADER] for r in served} == {"blue", "green"}
    assert binomtest(green, 200, 0.30).pvalue > 1e-3, green  # fails about once in a thousand runs of a fair router
    by_version = {r.headers[HEADER]: r.headers[VERSION_HEADER] for r in served}
    ep = env.store.endpoints.get(endpoint)
    assert by_version == {d: ep.deployments[d].model_version for d in ("blue", "green")}
    body = served[0].json()
    assert body["model"] == endpoint and body["system_fingerprint"].endswith(by_version[served[0].headers[HEADER]])

    env.store.endpoints.set_traffic(endpoint, "tests", {"blue": 100})
    time.sleep(0.6)  # three polls
    assert {complete(live, key, endpoint).headers[HEADER] for _ in range(20)} == {"blue"}
    smoke = complete(live, key, endpoint, headers={HEADER: "green"})
    assert smoke.status_code == 200 and smoke.headers[HEADER] == "green"
    missing = complete(live, key, endpoint, headers={HEADER: "red"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "deployment_not_found"
    assert "blue, green" in missing.json()["error"]["message"]
    wrong = complete(live, key, "other-model")
    assert wrong.status_code == 404 and wrong.json()["error"]["code"] == "model_not_found"

    live.app.state.request_logger.flush(10)
    wait_for(lambda: len(env.store.requests.list(1000, endpoint=endpoint)) >= 223, what="the request log rows")
    rows = env.store.requests.list(1000, endpoint=endpoint)
    assert {(r.deployment, r.model_version) for r in rows if r.status_code == 200} == set(by_version.items())
    assert all(r.route == "/v1/completions" for r in rows)


def test_a_swap_under_32_streaming_clients_fails_nothing_and_each_stream_has_one_deployment(env, endpoint):
    live = serve_endpoint(env, endpoint)
    key = env.keys["inference"]
    for b in live.server.router.backends.values():  # long enough streams that the swap lands inside them
        fast = b.engine._forward
        b.engine._forward = (lambda f: lambda idx, cache: (time.sleep(0.003), f(idx, cache))[1])(fast)

    def stream(i: int) -> tuple[str, set[str], int, float]:
        with httpx.stream("POST", f"{live.url}/v1/completions", headers=bearer(key), timeout=120,
                          json={"model": endpoint, "prompt": "the quick", "max_tokens": 48, "stream": True,
                                "temperature": 0}) as r:
            assert r.status_code == 200, r.read()
            fingerprints, chunks = set(), 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    import json

                    fingerprints.add(json.loads(line[6:])["system_fingerprint"])
                    chunks += 1
            return r.headers[HEADER], fingerprints, chunks, time.monotonic()

    with ThreadPoolExecutor(32) as pool:
        first = [pool.submit(stream, i) for i in range(32)]
        time.sleep(0.3)
        env.store.endpoints.set_traffic(endpoint, "tests", {"green": 100}, reason="swap under load")
        wait_for(lambda: live.server.router.traffic.get("green") == 100, what="the swap to reach the server")
        swapped_at = time.monotonic()
        second = [pool.submit(stream, i) for i in range(32)]
        results = [f.result() for f in first + second]
    for deployment, fingerprints, chunks, _ in results:
        version = env.store.endpoints.get(endpoint).deployments[deployment].model_version
        assert fingerprints == {f"{deployment}-v{version}"}, (deployment, fingerprints)
        assert chunks >= 2
    assert any(d == "blue" and ended > swapped_at for d, _, _, ended in results[:32])  # in flight at the swap
    assert {d for d, _, _, _ in results[32:]} == {"green"}


def test_a_deployment_removed_lets_its_stream_finish_and_one_added_joins(env, endpoint, folders):
    live = serve_endpoint(env, endpoint)
    key = env.keys["inference"]
    green = live.server.router.backends["green"].engine
    fast = green._forward
    green._forward = lambda idx, cache: (time.sleep(0.01), fast(idx, cache))[1]
    out = {}

    def stream():
        with httpx.stream("POST", f"{live.url}/v1/completions", headers={**bearer(key), HEADER: "green"},
                          json={"model": endpoint, "prompt": "the quick", "max_tokens": 60, "stream": True, "temperature": 0,
                                "stream_options": {"include_usage": True}}, timeout=120) as r:
            out["lines"] = [line for line in r.iter_lines() if line.startswith("data:")]

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.2)
    env.store.endpoints.undeploy(endpoint, "green", "tests")
    red = resolve_deployment(env.ws, env.config(), endpoint, "red", str(folders["green"]))
    env.store.endpoints.deploy(red, "tests")
    t.join(60)
    import json

    assert out["lines"][-1] == "data: [DONE]"
    closing = [json.loads(line[6:]) for line in out["lines"][:-1]][-2]
    # the whole answer, from the deployment being removed: it ended at its length, not cancelled
    assert closing["choices"][0]["finish_reason"] == "length", closing
    assert json.loads(out["lines"][-2][6:])["usage"]["completion_tokens"] >= 50
    wait_for(lambda: "red" in live.server.router.loaded(), what="red to load")
    assert "green" not in live.server.router.backends
    r = complete(live, key, endpoint, headers={HEADER: "red"})
    assert r.status_code == 200 and r.headers[VERSION_HEADER] == red.model_version


def _canary_cfg(env):
    return env.config(POLL, *LIMITS, "rollout.window_s=1.5", "rollout.tick_interval_s=0.2", "rollout.lease_s=2",
                      "rollout.min_requests=8")


def _traffic(live, key, endpoint, stop: threading.Event):
    codes = []
    while not stop.is_set():
        codes.append(complete(live, key, endpoint).status_code)
    return codes


def test_a_broken_canary_is_rolled_back_by_itself_and_the_audit_names_the_metric(env, endpoint):
    from lmops.deploy import rollout

    cfg = _canary_cfg(env)
    live = serve_endpoint(env, endpoint, "rollout.window_s=1.5")
    green = live.server.router.backends["green"].engine

    def broken(idx, cache):
        raise RuntimeError("a broken model")

    green._forward = broken
    key = env.keys["inference"]
    driver = rollout.Driver(env.store, cfg, endpoint=endpoint).start()
    stop = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        sent = [pool.submit(_traffic, live, key, endpoint, stop) for _ in range(2)]
        try:
            started = time.monotonic()
            r = rollout.start(env.store, cfg, endpoint, "green", "tests", strategy="canary", steps=[50, 100])
            wait_for(lambda: env.store.rollouts.get(r.id).status == "aborted", timeout=30, what="the rollback")
            took = time.monotonic() - started
        finally:
            stop.set()
            driver.stop(timeout=10)
        codes = [c for f in sent for c in f.result()]
    assert 500 in codes  # the canary did fail requests...
    ep = env.store.endpoints.get(endpoint)
    assert ep.traffic == {"blue": 100, "green": 0}  # ...and the traffic is back on stable
    aborted = env.store.audit.list(20, subject=f"endpoint:{endpoint}", action="rollout.aborted")
    assert aborted and "error_rate" in str(aborted[0].details), aborted
    # one analysis window after the canary got traffic, plus the ticks around it
    assert took < 1.5 + 2 * 0.2 + 3.0, took
    time.sleep(0.6)
    assert {complete(live, key, endpoint).headers[HEADER] for _ in range(10)} == {"blue"}


def test_a_good_canary_is_promoted_step_by_step(env, endpoint):
    from lmops.deploy import rollout

    cfg = _canary_cfg(env)
    live = serve_endpoint(env, endpoint)
    key = env.keys["inference"]
    driver = rollout.Driver(env.store, cfg, endpoint=endpoint).start()
    stop = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        sent = [pool.submit(_traffic, live, key, endpoint, stop) for _ in range(2)]
        try:
            r = rollout.start(env.store, cfg, endpoint, "green", "tests", strategy="canary", steps=[50, 100])
            wait_for(lambda: env.store.rollouts.get(r.id).status in ("succeeded", "aborted", "paused"), timeout=60,
                     what="the rollout to end")
        finally:
            stop.set()
            driver.stop(timeout=10)
        codes = [c for f in sent for c in f.result()]
    done = env.store.rollouts.get(r.id)
    assert done.status == "succeeded", (done.message, done.analyses[-1] if getattr(done, "analyses", None) else done)
    assert set(codes) == {200}
    assert env.store.endpoints.get(endpoint).traffic == {"blue": 0, "green": 100}


def test_mirrored_requests_are_scored_in_pairs_and_never_change_the_answer(env, endpoint):
    live = serve_endpoint(env, endpoint)
    key = env.keys["inference"]
    greedy = {"temperature": 0, "max_tokens": 8}
    before = [complete(live, key, endpoint, **greedy).json()["choices"][0]["text"] for _ in range(5)]
    env.store.endpoints.set_traffic(endpoint, "tests", mirror={"green": 50}, reason="shadow green")
    wait_for(lambda: live.server.router.mirror == {"green": 50}, what="the mirror to reach the server")
    answers = [complete(live, key, endpoint, **greedy) for _ in range(40)]
    assert {r.headers[HEADER] for r in answers} == {"blue"}  # the shadow never answers a client
    assert {r.json()["choices"][0]["text"] for r in answers} == set(before)  # nor changes what it gets
    wait_for(lambda: live.server.shadow.queue.empty() and live.server.shadow.counts["scored"] >= 45, timeout=30,
             what="the shadow worker")
    rows = env.store.scores.list(endpoint)
    live_rows = [r for r in rows if r.role == "live"]
    shadow_rows = [r for r in rows if r.role == "shadow"]
    # every answer is scored once the endpoint has two deployments: the 5 before the mirror too
    assert len(live_rows) == 45 and {r.deployment for r in live_rows} == {"blue"}
    assert 5 <= len(shadow_rows) <= 35, len(shadow_rows)  # about half of 40 (binomial: outside is < 1e-4)
    assert {r.deployment for r in shadow_rows} == {"green"}
    assert {r.request_id for r in shadow_rows} <= {r.request_id for r in live_rows}  # pairs share the request id
    for r in rows:
        assert r.prompt_nll is not None and r.prompt_nll > 0 and r.answer_nll is not None and r.reference == "blue"
        assert r.completion_tokens == 8 and r.finish_reason == "length"
    # greedy: the shadow's tokens are compared with the live ones; seeds 0 and 1 weigh the table alike
    assert all(r.agree is not None for r in shadow_rows) and all(r.agree is None for r in live_rows)
    pairs = {r.request_id: r for r in live_rows}
    assert any(abs(pairs[r.request_id].prompt_nll - r.prompt_nll) > 1e-6 for r in shadow_rows)  # two models


def test_a_shadow_that_falls_behind_is_dropped_and_counted_never_waited_for(env, endpoint):
    live = serve_endpoint(env, endpoint, "serve.shadow_queue=1")
    key = env.keys["inference"]
    green = live.server.router.backends["green"].engine
    fast = green._forward
    green._forward = lambda idx, cache: (time.sleep(0.2), fast(idx, cache))[1]  # a shadow far slower than live
    env.store.endpoints.set_traffic(endpoint, "tests", mirror={"green": 50})
    wait_for(lambda: live.server.router.mirror == {"green": 50}, what="the mirror to reach the server")
    started = time.monotonic()
    answers = [complete(live, key, endpoint, max_tokens=8) for _ in range(20)]
    took = time.monotonic() - started
    assert all(r.status_code == 200 for r in answers)
    assert live.server.shadow.counts["dropped"] >= 5, live.server.shadow.counts
    # each mirrored job would hold 8 x 0.2 s of the shadow's time: waiting for them would take > 8 s
    assert took < 8, took
    metrics = httpx.get(f"{live.url}/metrics", headers=bearer(env.keys["deployer"])).text
    assert 'lmops:shadow_jobs_total{outcome="dropped"}' in metrics


def test_shadow_work_waits_while_live_requests_run_when_its_share_is_zero(env, endpoint):
    """serve.shadow_busy_share=0: no shadow job starts while a live request runs; they run in the idle time
    after (the budget's other side, a share of the busy time, is measured in benchmarks/endpoint_overhead.py)."""
    live = serve_endpoint(env, endpoint, "serve.shadow_busy_share=0", "serve.shadow_queue=64")
    shadow, key = live.server.shadow, env.keys["inference"]
    starts: list[bool] = []
    score = shadow._score

    async def recorded(job):
        starts.append(shadow.live_busy())
        await score(job)

    shadow._score = recorded
    env.store.endpoints.set_traffic(endpoint, "tests", mirror={"green": 50})
    wait_for(lambda: live.server.router.mirror == {"green": 50}, what="the mirror to reach the server")
    stop = threading.Event()

    def busy_client():
        codes = []
        while not stop.is_set():
            codes.append(complete(live, key, endpoint, max_tokens=48).status_code)
        return codes

    with ThreadPoolExecutor(4) as pool:
        sent = [pool.submit(busy_client) for _ in range(4)]
        time.sleep(3)
        stop.set()
        codes = [c for f in sent for c in f.result()]
    assert set(codes) == {200} and len(codes) >= 8
    wait_for(lambda: shadow.pending == 0 and len(starts) >= len(codes) - shadow.counts["dropped"], timeout=30,
             what="the shadow to catch up once idle")
    assert not any(starts), f"{sum(starts)} of {len(starts)} shadow jobs started while live requests ran"


def test_the_first_shadow_job_of_a_burst_waits_for_budget_earned_beside_live_requests():
    """The shadow's budget on its own clock: a job starts beside live requests only once the time it waited
    earned its expected cost (share / (1 - share) per second), so at every start the shadow's time stays
    within serve.shadow_busy_share of the burst so far; idle, a job starts at once; the next burst starts
    with an empty budget again. Deterministic: the clock moves only when the test moves it."""
    import asyncio

    from lmops.config import Config
    from lmops.serve.engine import SamplingParams
    from lmops.serve.shadow import FIRST_COST_S, Job, Shadow

    cfg, took = Config(), 0.2
    share = cfg.serve.shadow_busy_share
    assert 0 < share < 1

    async def run():
        now, busy, starts = [100.0], [True], []
        shadow = Shadow(None, None, cfg, clock=lambda: now[0])
        shadow.poll_s, shadow.live_busy = 0, lambda: busy[0]

        async def score(job):
            starts.append((now[0], busy[0]))
            now[0] += took  # each job takes 0.2 s of the budget's clock

        shadow._score = score

        async def settle():
            for _ in range(20):
                await asyncio.sleep(0)

        def job(i):
            return Job(None, f"r{i}", None, [1], [2], SamplingParams(), "length", False, None, None, ())

        shadow.start()
        try:
            burst = now[0]
            for i in range(4):
                shadow.offer(job(i))
            await settle()
            assert starts == []  # the first job of the burst: live requests run and nothing is earned yet
            while len(starts) < 4 and now[0] < burst + 60:
                now[0] += 0.05
                await settle()
            assert len(starts) == 4 and all(b for _, b in starts)
            # the first waited for its guessed cost, the others for the measured one
            first = FIRST_COST_S * (1 - share) / share
            assert burst + first - 1e-9 <= starts[0][0] <= burst + first + 0.05 + 1e-9
            for k, (t, _) in enumerate(starts, 1):  # k jobs' time within the share of [burst, end of job k]
                assert k * took <= share * (t + took - burst) + 1e-9, (k, t - burst)
            # idle: a job runs at once, and costs nothing
            busy[0], idle = False, now[0]
            shadow.offer(job(4))
            await settle()
            assert len(starts) == 5 and starts[-1] == (idle, False)
            # the next burst: whatever budget was left is not carried into it
            assert shadow.budget <= 0
            busy[0] = True
            shadow.offer(job(5))
            await settle()
            assert len(starts) == 5
            now[0] += 0.05
            await settle()
            assert len(starts) == 5
        finally:
            shadow.stop()

    asyncio.run(run())
