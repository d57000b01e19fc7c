"""POST /v1/feedback on a live server with auth on: stored with the request's endpoint, deployment and
version; thumbs; unknown ids; bad bodies; no key; comments redacted; the Prometheus counter."""

from __future__ import annotations

import httpx
import pytest

FAST = ["auth.key_cache_ttl_s=0", "auth.rate_limit_per_s=1000", "auth.burst=1000", "serve.metrics_public=true",
        "safety.pii_action=redact"]


@pytest.fixture(scope="module")
def live(env):
    return env.start(*FAST)


def _headers(env, role="inference"):
    return {"Authorization": f"Bearer {env.key(role)}"}


def _complete(live, env, chat=False) -> dict:
    if chat:
        r = httpx.post(f"{live.url}/v1/chat/completions", headers=_headers(env), timeout=30,
                       json={"model": "tiny", "messages": [{"role": "user", "content": "ab"}], "max_tokens": 3})
    else:
        r = httpx.post(f"{live.url}/v1/completions", headers=_headers(env), timeout=30,
                       json={"model": "tiny", "prompt": "abc", "max_tokens": 3})
    assert r.status_code == 200, r.text
    return r.json()


def _feedback(live, env, body, headers=None):
    return httpx.post(f"{live.url}/v1/feedback", json=body, timeout=30,
                      headers=_headers(env) if headers is None else headers)


def test_feedback_on_a_served_completion(live, env):
    done = _complete(live, env)
    assert done["id"].startswith("cmpl-")
    r = _feedback(live, env, {"id": done["id"], "score": 0.75})  # at once: the row may still be in the buffer
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["object"] == "feedback" and out["completion_id"] == done["id"] and out["score"] == 0.75
    request_id = done["id"].removeprefix("cmpl-")
    [fb] = env.store.feedback.list(request_id=request_id)
    req = env.store.requests.get(request_id)
    assert fb.id == out["id"] and fb.score == 0.75 and fb.comment is None
    assert (fb.endpoint, fb.deployment, fb.model_version) == (req.endpoint, req.deployment, req.model_version)
    assert fb.key_id == req.key_id is not None

    chat = _complete(live, env, chat=True)
    assert chat["id"].startswith("chatcmpl-")
    for thumbs, score in (("up", 1.0), ("down", 0.0)):
        r = _feedback(live, env, {"id": chat["id"], "thumbs": thumbs})
        assert r.status_code == 201, r.text
        assert r.json()["score"] == score
    bare = chat["id"].removeprefix("chatcmpl-")
    assert _feedback(live, env, {"id": bare, "score": 1}).status_code == 201  # the bare request id
    assert [f.score for f in env.store.feedback.list(request_id=bare)] == [1.0, 0.0, 1.0]

    metrics = httpx.get(f"{live.url}/metrics", timeout=10).text
    assert any(line.startswith("lmops:feedback_total{") and line.endswith(" 4.0") for line in metrics.splitlines())


def test_comment_is_redacted(live, env):
    done = _complete(live, env)
    r = _feedback(live, env, {"id": done["id"], "thumbs": "down", "comment": "wrong; write to me@example.com"})
    assert r.status_code == 201, r.text
    [fb] = env.store.feedback.list(request_id=done["id"].removeprefix("cmpl-"))
    assert "me@example.com" not in fb.comment and "[EMAIL]" in fb.comment


def test_unknown_id_bad_bodies_and_no_key(live, env):
    done = _complete(live, env)
    for unknown in ("cmpl-0123456789abcdef", "nothex!", "chatcmpl-"):
        r = _feedback(live, env, {"id": unknown, "score": 1})
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "completion_not_found" and r.json()["error"]["param"] == "id"
    for bad in ({"id": done["id"]}, {"id": done["id"], "score": 1, "thumbs": "up"}, {"id": done["id"], "score": 1.5},
                {"id": done["id"], "score": -0.1}, {"id": done["id"], "thumbs": "sideways"},
                {"id": done["id"], "score": 1, "extra": 1}, {"score": 1},
                {"id": done["id"], "score": 1, "comment": "x" * 2001}):
        r = _feedback(live, env, bad)
        assert r.status_code == 400, (bad, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = _feedback(live, env, {"id": done["id"], "score": 1}, headers={})
    assert r.status_code == 401 and "error" in r.json()
    assert env.store.feedback.list(request_id=done["id"].removeprefix("cmpl-")) == []
