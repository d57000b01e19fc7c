"""Requests that once hurt the server or other clients: each must fail alone, quickly, with a 400 that says
why, and leave the server (and the client's connection) serving the next request."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
import time

import httpx
import openai
import pytest

from lmops.serve import prompts as prompts_module

from .conftest import free_port, save_model, serve_command, table_model

FAST = ["auth.key_cache_ttl_s=0", "auth.rate_limit_per_s=1000", "auth.burst=1000"]


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture(scope="module")
def main(env):
    return env.start(*FAST)


# ----------------------------------------------------------------------------- a slow prompt stalls nobody

def test_a_huge_worst_case_prompt_is_refused_by_its_length_and_healthz_answers_meanwhile(main, env):
    """900 KB of '=' took the old moderation (run first, on the event loop) hours; the length is checked
    first now, off the loop, and /healthz answers throughout."""
    done, result = threading.Event(), {}

    def big():
        body = {"model": "tiny", "prompt": "=" * 900_000, "max_tokens": 1}
        result["r"] = httpx.post(f"{main.url}/v1/completions", json=body, headers=bearer(env.keys["inference"]),
                                 timeout=120)
        done.set()

    worker = threading.Thread(target=big)
    worker.start()
    slowest = 0.0
    while not done.is_set():
        start = time.perf_counter()
        assert httpx.get(f"{main.url}/healthz", timeout=10).status_code == 200
        slowest = max(slowest, time.perf_counter() - start)
    worker.join()
    r = result["r"]
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert slowest < 2.0


def test_moderating_a_long_prompt_runs_off_the_event_loop(env, tmp_path, tok, monkeypatch):
    """A prompt long enough to moderate for a while (here: moderation held until /healthz answered)."""
    folder = tmp_path / "long"
    save_model(folder, table_model(tok, block_size=8192), tok)
    from lmops.serve.source import ModelSource

    sets = [*FAST, "serve.max_prompt_tokens=8192", "serve.max_batch=2"]
    live = env.start(*sets, source=ModelSource(None, env.config(*sets), str(folder)))
    entered, release = threading.Event(), threading.Event()
    real = prompts_module.moderate

    def held(text, cfg, direction):
        if len(text) > prompts_module.INLINE_CHARS:
            entered.set()
            assert release.wait(60)
        return real(text, cfg, direction)

    monkeypatch.setattr(prompts_module, "moderate", held)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("r", httpx.post(
        f"{live.url}/v1/completions", headers=bearer(env.keys["inference"]), timeout=120,
        json={"model": "long", "prompt": "= " * 3000, "max_tokens": 1})))
    worker.start()
    try:
        assert entered.wait(60)
        assert httpx.get(f"{live.url}/healthz", timeout=10).status_code == 200  # while moderation is held
    finally:
        release.set()
        worker.join()
    assert result["r"].status_code == 200, result["r"].text
    live.stop()


def test_the_length_is_checked_before_moderation(env, tok, monkeypatch):
    """An over-long prompt holding a blocklisted term is refused for its length, and moderation never reads
    it (text, token ids and chat alike); a short one with the term is refused by the content policy."""
    live = env.start(*FAST, "safety.blocklist=[forbidden]")
    read, real = [], prompts_module.moderate

    def recorded(text, cfg, direction):
        read.append((direction, len(text)))
        return real(text, cfg, direction)

    monkeypatch.setattr(prompts_module, "moderate", recorded)
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=env.keys["inference"], max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:  # the blocklist is on: a short prompt is blocked
        client.completions.create(model="tiny", prompt="say forbidden", max_tokens=1)
    assert err.value.code == "content_blocked" and read == [("input", len("say forbidden"))]
    read.clear()
    long_text = "quick frog " * 60 + "forbidden"  # 669 characters, each a token: over the context of 512
    for send in (lambda: client.completions.create(model="tiny", prompt=long_text, max_tokens=1),
                 lambda: client.completions.create(model="tiny", prompt=tok.encode(long_text).ids, max_tokens=1),
                 lambda: client.chat.completions.create(model="tiny", max_tokens=1,
                                                        messages=[{"role": "user", "content": long_text}])):
        with pytest.raises(openai.BadRequestError) as err:
            send()
        assert err.value.code == "context_length_exceeded", err.value.message
        assert read == [], "moderation read a prompt its length refuses"
    live.stop()


# ----------------------------------------------------------------------------- one bad row fails alone

def test_a_top_k_out_of_bounds_fails_that_request_alone(main, env):
    import asyncio

    async def run():
        async with httpx.AsyncClient(base_url=main.url, headers=bearer(env.keys["inference"]), timeout=60) as c:
            ok = {"model": "tiny", "prompt": "hello", "max_tokens": 20, "temperature": 0.8}
            bodies = [ok] * 12 + [{**ok, "top_k": 2**63}] + [{**ok, "top_k": 10**9}] + [ok] * 12
            return await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))

    rs = asyncio.run(run())
    assert rs[12].status_code == 400 and rs[12].json()["error"]["param"] == "top_k", rs[12].text
    assert [r.status_code for r in rs[:12] + rs[13:]] == [200] * 25  # top_k above the vocabulary keeps all


@pytest.mark.parametrize("field, value, param", [
    ("temperature", 2.5, "temperature"), ("temperature", -1, "temperature"), ("top_p", 0, "top_p"),
    ("top_p", 1.5, "top_p"), ("n", 2, "n"), ("n", 0, "n"), ("logprobs", 6, "logprobs"), ("seed", -1, "seed"),
    ("seed", 2**63, "seed"), ("stop", ["a"] * 5, "stop"), ("stop", "x" * 257, "stop"), ("top_k", -2, "top_k"),
    ("max_tokens", "5", "max_tokens"),
])
def test_every_sampling_field_is_checked_against_its_bounds(main, env, field, value, param):
    r = httpx.post(f"{main.url}/v1/completions", headers=bearer(env.keys["inference"]),
                   json={"model": "tiny", "prompt": "hi", "max_tokens": 2, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_a_500_says_no_internal_detail(main, env, monkeypatch):
    engine = main.server.engine

    def broken(idx, cache):
        raise RuntimeError("secret internals at 0xdeadbeef")

    monkeypatch.setattr(engine, "_forward", broken)
    r = httpx.post(f"{main.url}/v1/completions", headers=bearer(env.keys["inference"]),
                   json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
    monkeypatch.undo()
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert "0xdeadbeef" not in r.text and "RuntimeError" not in r.text and "request id" in error["message"]


# ----------------------------------------------------------------------------- text that is no text

@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", '{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
    ("/v1/completions", '{"model": "tiny", "prompt": ["ok", "\\udfff"], "max_tokens": 1}', "prompt"),
    ("/v1/completions", '{"model": "tiny", "prompt": "hi", "stop": ["\\ud800"], "max_tokens": 1}', "stop[0]"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages[0].content"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": '
     '[{"type": "text", "text": "\\ud800"}]}]}', "messages[0].content[0].text"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field_and_the_connection_serves_on(main, env, path, body, param):
    conn = http.client.HTTPConnection("127.0.0.1", main.port, timeout=30)
    headers = {**bearer(env.keys["inference"]), "Content-Type": "application/json"}
    conn.request("POST", path, body=body.encode(), headers=headers)
    r = conn.getresponse()
    error = json.loads(r.read())["error"]
    assert r.status == 400 and error["param"] == param and "surrogate" in error["message"], error
    sock = conn.sock
    assert sock is not None  # not closed by the server
    conn.request("POST", "/v1/completions", body=json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2}),
                 headers=headers)
    r = conn.getresponse()
    answer = json.loads(r.read())  # a sampled answer may be empty (end of text first): check it was generated
    assert r.status == 200 and answer["choices"][0]["finish_reason"] in ("length", "stop"), answer
    assert answer["usage"]["prompt_tokens"] > 0 and answer["usage"]["completion_tokens"] >= 1, answer
    assert conn.sock is sock  # the same keep-alive connection
    conn.close()


# ----------------------------------------------------------------------------- token ids are scored as sent

def test_token_id_prompts_are_scored_as_sent_never_rewritten(env, tok):
    ids = tok.encode("mail me@example.com").ids
    live = env.start(*FAST)
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=env.keys["inference"], max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:  # pii_action redact: would change them, so refused
        client.completions.create(model="tiny", prompt=ids, max_tokens=1)
    assert err.value.code == "content_blocked" and "pii" in err.value.message
    r = client.completions.create(model="tiny", prompt="mail me@example.com", max_tokens=1)  # text: redacted
    assert r.usage.prompt_tokens == len("mail [EMAIL]")
    assert client.models.list().data[0].max_model_len == 512
    live.stop()

    live = env.start(*FAST, "safety.pii_action=flag")
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=env.keys["inference"], max_retries=0)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert r.usage.prompt_tokens == len(ids) and r.choices[0].text == "mail me@example.com"
    assert len(r.choices[0].logprobs.tokens) == len(ids)
    live.stop()


# ----------------------------------------------------------------------------- start-up

def test_serve_refuses_a_port_outside_1_to_65535_and_turns_mlflow_progress_bars_off(env, monkeypatch):
    from lmops.errors import LmopsError
    from lmops.serve.app import serve

    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    for port in (99999, 0, -1):
        with pytest.raises(LmopsError, match=f"port {port}: .*1 and 65535"):
            serve(env.ws, env.config(), str(env.model_dir), "127.0.0.1", port)
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"


def test_a_model_that_cannot_load_fails_serve_before_the_port_is_bound(env, tmp_path):
    bad = tmp_path / "bad" / "ckpt.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"not a checkpoint")
    proc = subprocess.run(serve_command(env.ws.root, bad, free_port()), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "LmopsError: cannot serve" in proc.stderr, proc.stderr[-2000:]
    assert "Uvicorn running" not in proc.stderr and "Started server" not in proc.stderr


# ----------------------------------------------------------------------------- one key cannot fill the queue

def test_a_key_fanning_out_many_prompts_leaves_room_for_the_other_keys(env):
    """Each prompt counts against the queue: a key may hold the batch and half the waiting queue (16 + 32)."""
    import asyncio

    live = env.start(*FAST)
    engine, share = live.server.engine, live.server.key_share
    assert share == 48
    greedy = env.key("inference", "greedy")
    others = [env.key("inference", f"other{i}") for i in range(16)]
    long = {"model": "tiny", "max_tokens": 300, "temperature": 0, "stream": True}

    r = httpx.post(f"{live.url}/v1/completions", headers=bearer(greedy), json={**long, "prompt": ["hi"] * 80})
    error = r.json()["error"]  # never fits its share: the schema says so
    assert r.status_code == 400 and error["param"] == "prompt" and "at most 48" in error["message"], error

    async def run():
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as c:
            async with c.stream("POST", "/v1/completions", headers=bearer(greedy),
                                json={**long, "prompt": ["hi"] * share}) as fan_out:
                lines = fan_out.aiter_lines()
                await lines.__anext__()  # its prompts are in the engine
                assert engine.stats().running + engine.stats().waiting >= share - 1
                more = await c.post("/v1/completions", headers=bearer(greedy), json={**long, "prompt": "hi"})
                assert more.status_code == 429 and more.json()["error"]["code"] == "key_queue_full"
                rs = await asyncio.gather(*(c.post("/v1/completions", headers=bearer(k),
                                                   json={"model": "tiny", "prompt": "hi", "max_tokens": 5})
                                            for k in others))
                assert [r.status_code for r in rs] == [200] * 16, [r.text for r in rs if r.status_code != 200]

    with live.slow_model():
        asyncio.run(run())
    live.stop()


def test_each_prompt_counts_against_the_keys_rate_limit(env):
    live = env.start("auth.key_cache_ttl_s=0", "auth.rate_limit_per_s=0.01", "auth.burst=4")
    key, url = env.key("inference", "prompts"), f"{live.url}/v1/completions"
    body = {"model": "tiny", "max_tokens": 1}
    r = httpx.post(url, headers=bearer(key), json={**body, "prompt": ["a"] * 5})
    assert r.status_code == 400 and "burst" in r.json()["error"]["message"]
    assert httpx.post(url, headers=bearer(key), json={**body, "prompt": ["a"] * 3}).status_code == 200
    r = httpx.post(url, headers=bearer(key), json={**body, "prompt": ["a"] * 2})  # 4 of 4 taken, 1 + 1 more asked
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded" and r.headers["Retry-After"]
    live.stop()


# ----------------------------------------------------------------------------- the OpenAPI document

def test_the_openapi_document_describes_the_server(main):
    doc = httpx.get(f"{main.url}/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        assert "422" not in responses and {"200", "400", "401", "404", "429"} <= set(responses)
        assert "text/event-stream" in responses["200"]["content"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]


# What no JSON schema can say: a prompt's length in tokens (it depends on the tokenizer), a token id beyond
# the vocabulary of the model loaded, text the content policy refuses. Schema-valid data may get these 400s.
CONTENT_DEPENDENT = {"context_length_exceeded", "content_blocked"}


def test_schemathesis_finds_the_schema_and_the_server_agree(env):
    """Every check of schemathesis, positive and negative data: what the schema refuses is refused, every
    response is documented (status, content type, body), and what it allows is served, but for the 400s
    of CONTENT_DEPENDENT (schemathesis' own positive-data check is replaced by one that knows them)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import positive_data_acceptance

    live = env.start(*FAST, "serve.max_tokens_limit=8", "serve.max_prompt_tokens=64")
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    headers = bearer(env.keys["inference"])
    failures = []
    for op in [result.ok() for result in schema.get_all_operations()]:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                r = case.call_and_validate(base_url=live.url, headers=headers, timeout=30,
                                           excluded_checks=[positive_data_acceptance])
                if mode is GenerationMode.POSITIVE and r.status_code == 400:
                    error = r.json()["error"]
                    assert error["code"] in CONTENT_DEPENDENT or "vocabulary" in error["message"], (case.body, error)

            try:
                check()
            except Exception as err:  # noqa: BLE001 - collected, to report every operation's failure
                failures.append(f"{op.method.upper()} {op.path} {mode.value}: {str(err)[:1500]}")
    live.stop()
    assert not failures, "\n\n".join(failures)
