"""The blue-green smoke suite against a fake server (httpx.MockTransport): what passes and what not."""

from __future__ import annotations

import httpx

from lmops.serve.smoke import run_smoke


def server(status=200, finish="length", tokens=4, served=None, seen=None):
    def handle(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append((request.url.path, request.headers.get("x-lmops-deployment"),
                         request.headers.get("authorization"), request.read()))
        body = {"choices": [{"text": "", "finish_reason": finish}], "usage": {"completion_tokens": tokens}}
        headers = {"x-lmops-deployment": served} if served else {}
        return httpx.Response(status, json=body if status == 200 else {"error": "boom"}, headers=headers)
    return httpx.MockTransport(handle)


def test_a_healthy_deployment_passes_even_with_empty_text():
    seen = []
    result = run_smoke("http://x/v1", "green", ["a", "b"], {"authorization": "Bearer k"},
                       transport=server(served="green", seen=seen))
    assert result.ok, result.message
    assert [s[:3] for s in seen] == [("/v1/completions", "green", "Bearer k")] * 2
    assert b'"temperature":0' in seen[0][3].replace(b" ", b"")


def test_each_problem_fails_the_suite():
    assert "status 500" in run_smoke("http://x", "green", ["a"], transport=server(status=500)).message
    assert "no finish_reason" in run_smoke("http://x", "green", ["a"], transport=server(finish=None)).message
    assert "no token generated" in run_smoke("http://x", "green", ["a"], transport=server(tokens=0)).message
    assert "served by blue" in run_smoke("http://x", "green", ["a"], transport=server(served="blue")).message
    slow = run_smoke("http://x", "green", ["a"], max_latency_s=-1.0, transport=server())
    assert not slow.ok and "over the -1 s bound" in slow.message
    assert not run_smoke("http://x", "green", [], transport=server()).ok


def test_an_unreachable_server_is_a_failed_check_not_an_exception():
    def refuse(request):
        raise httpx.ConnectError("connection refused")
    result = run_smoke("http://x", "green", ["a"], transport=httpx.MockTransport(refuse))
    assert not result.ok and "no response (ConnectError" in result.message
