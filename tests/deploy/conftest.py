"""Fixtures for the deployment tests: `store` on SQLite and on PostgreSQL (tests/conftest.py), an
endpoint with a stable deployment `blue` and a new one `green`, and request-log / score rows made up
for a window of time."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from lmops.config import Config
from lmops.deploy.endpoints import Deployment
from lmops.store import Store

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def sqlite_store(tmp_path):
    """For the policy tests, which need no second database to say something."""
    with Store.open(f"sqlite:///{tmp_path / 'lmops.db'}") as s:
        yield s


def deployment(name: str, endpoint: str = "chat", version: str = "1") -> Deployment:
    return Deployment(endpoint, name, f"m@{version}", "m", version, f"models:/m/{version}")


def blue_green_endpoint(store: Store, endpoint: str = "chat"):
    """blue (v1) takes all traffic, green (v2) is deployed at 0%."""
    store.endpoints.create(endpoint, "alice")
    store.endpoints.deploy(deployment("blue", endpoint, "1"), "alice")
    return store.endpoints.deploy(deployment("green", endpoint, "2"), "alice", traffic=0)


def config(**rollout) -> Config:
    base = Config().rollout.model_dump()
    return Config.model_validate({"rollout": base | rollout})


def traffic(store: Store, deployment_: str, since: datetime, until: datetime, n: int, endpoint: str = "chat",
            status: int = 200, latency: float = 0.2, ttft: float = 0.05, prompt_nll: float | None = 2.0,
            answer_nll: float | None = 2.5, moderated: int = 0) -> None:
    """n requests served by deployment_, spread over [since, until), each with a live answer score."""
    step = (until - since) / n
    rows, scores = [], []
    for i in range(n):
        ts, rid = since + step * i, uuid.uuid4().hex
        rows.append(dict(ts=ts, request_id=rid, route="/v1/completions", endpoint=endpoint, deployment=deployment_,
                         status_code=status, latency_s=latency, ttft_s=ttft if status < 500 else None,
                         moderation={"action": "flag"} if i < moderated else None))
        if status < 500:
            scores.append(dict(ts=ts, request_id=rid, endpoint=endpoint, deployment=deployment_, role="live",
                               prompt_nll=prompt_nll, answer_nll=answer_nll, latency_s=latency))
    store.requests.log(rows)
    store.scores.add(scores)


def minutes(m: float) -> timedelta:
    return timedelta(minutes=m)
