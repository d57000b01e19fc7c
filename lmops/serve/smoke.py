"""The smoke suite of a blue-green rollout: a few greedy completions sent to one deployment of a running
server through the `x-lmops-deployment` header (how a deployment at 0% traffic is reached), each checked:
status 200, a choice with a finish_reason, at least one generated token (its text may legitimately be
empty: the model may write only whitespace the tokenizer drops, or stop at once), the response served
by the deployment asked for, and within the latency bound.

A server gives the rollout Driver `lambda endpoint, deployment: run_smoke(url, deployment, ...)`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from lmops.deploy.rollout import SmokeResult

DEPLOYMENT_HEADER = "x-lmops-deployment"


def run_smoke(base_url: str, deployment: str, prompts: Sequence[str], headers: Mapping[str, str] | None = None,
              max_latency_s: float = 10.0, max_tokens: int = 16, model: str | None = None,
              transport=None) -> SmokeResult:
    """POST /v1/completions (temperature 0) for each prompt to `deployment`; ok when every check passes.

    base_url: the server's root (http://127.0.0.1:8000) or its /v1; headers: e.g. an Authorization
    bearer key of the server's own; a connection failure is a failed check, not an exception;
    transport: an httpx transport (tests)."""
    import httpx

    root = base_url.rstrip("/").removesuffix("/v1")
    send = {**(headers or {}), DEPLOYMENT_HEADER: deployment}
    checks: list[dict] = []
    with httpx.Client(base_url=root, timeout=max_latency_s + 5.0, transport=transport) as client:
        for prompt in prompts:
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
            if model is not None:
                body["model"] = model
            check: dict = {"prompt": prompt}
            start = time.perf_counter()
            try:
                resp = client.post("/v1/completions", json=body, headers=send)
            except httpx.HTTPError as err:
                checks.append(check | {"ok": False, "problem": f"no response ({type(err).__name__}: {err})"})
                continue
            check["latency_s"] = round(time.perf_counter() - start, 4)
            check["status"] = resp.status_code
            check["problem"] = _problem(resp, deployment, check["latency_s"], max_latency_s)
            check["ok"] = check["problem"] is None
            checks.append(check)
    bad = [c for c in checks if not c["ok"]]
    if not checks:
        return SmokeResult(False, "no smoke prompts configured (rollout.smoke.prompts)", checks)
    if bad:
        return SmokeResult(False, "; ".join(f"prompt {c['prompt']!r}: {c['problem']}" for c in bad[:3])
                           + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""), checks)
    slowest = max(c["latency_s"] for c in checks)
    return SmokeResult(True, f"{len(checks)} prompts answered by {deployment}, slowest {slowest:.2f} s", checks)


def _problem(resp, deployment: str, latency_s: float, max_latency_s: float) -> str | None:
    if resp.status_code != 200:
        return f"status {resp.status_code}: {resp.text[:200]}"
    served = resp.headers.get(DEPLOYMENT_HEADER)
    if served is not None and served != deployment:
        return f"served by {served}, not {deployment}"
    try:
        data = resp.json()
        choice = data["choices"][0]
        tokens = (data.get("usage") or {}).get("completion_tokens")
    except (ValueError, KeyError, IndexError, TypeError):
        return f"not a completion: {resp.text[:200]}"
    if not choice.get("finish_reason"):
        return "no finish_reason"
    if not isinstance(tokens, int) or tokens < 1:
        return f"no token generated (usage.completion_tokens {tokens})"
    if latency_s > max_latency_s:
        return f"took {latency_s:.2f} s, over the {max_latency_s:g} s bound (rollout.smoke.max_latency_s)"
    return None
