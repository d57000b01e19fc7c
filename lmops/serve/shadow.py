"""Scored shadow traffic: mirrored requests run on their shadow deployment off the live path, and live and
shadow answers are scored by the models themselves, into the store's answer_scores (lmops/store/scores.py).

A live answer, once sent, becomes a job when the endpoint has more than one deployment (there is something
to compare it with: a canary, a mirror, the old deployment kept for undo). Jobs wait in a bounded queue; when the worker
falls behind, a job is dropped and counted (lmops:shadow_jobs{outcome="dropped"}), never waited for, so
the live answer is never delayed by its shadow. Nor slowed beyond noise: the shadow's forwards share the
cores with the live ones, so while live requests run the worker takes at most serve.shadow_busy_share of
the time, on a budget it earns: each second a job waits beside live requests earns share / (1 - share)
seconds, a job starts beside them only once the budget covers its expected time (the mean of recent jobs
of its kind), and its measured time is then spent. So the first job of a burst waits too: the budget
starts empty, and whatever is left of it when the engines go idle is dropped (a debt is kept). In idle
time a job runs at once and costs nothing. The worker, per job:

- for each deployment the router mirrors this request to: the same prompt ids and sampling parameters on
  its engine (tokens only when both deployments share a tokenizer; else the job is not mirrored);
- scores with Engine.score (a forward pass run between engine steps): each answer's mean negative
  log-likelihood per token under one reference model (the endpoint's stable deployment, the same judge
  for both sides), each model's own NLL of the prompt (how well it predicts real traffic);
- writes one row per answer (role live / shadow, one request_id), with length, stop reason, moderation
  flag, latency and, for greedy requests, whether the shadow's tokens equal the live ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime

from lmops.safety import moderate
from lmops.serve.engine import SamplingParams
from lmops.serve.router import Backend, Router

log = logging.getLogger("lmops.serve")

FIRST_COST_S = 0.25  # a job's expected seconds before one of its kind has been timed


@dataclass(frozen=True)
class Job:
    ts: datetime
    request_id: str
    live: Backend
    prompt_ids: list[int]
    answer_ids: list[int]
    params: SamplingParams
    finish_reason: str | None
    flagged: bool
    ttft_s: float | None
    latency_s: float | None
    mirrors: tuple[Backend, ...]


def mean_nll(scored: list, start: int) -> float | None:
    """Mean negative log-probability of the tokens from `start` on (Engine.score's first token has none)."""
    lps = [lp for lp, _ in scored[max(start, 1):] if lp is not None]
    return -sum(lps) / len(lps) if lps else None


class Shadow:
    def __init__(self, router: Router, store, cfg, metrics=None, clock=time.monotonic):
        self.router, self.store, self.cfg, self.metrics = router, store, cfg, metrics
        self.clock, self.poll_s = clock, 0.01  # the budget's clock, and how often a waiting job looks
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=cfg.serve.shadow_queue)
        self.task: asyncio.Task | None = None
        self.counts = {"scored": 0, "dropped": 0, "failed": 0}
        self._vocabs: dict[int, str] = {}
        self._busy = 0  # the job being scored now
        self.budget = 0.0  # seconds of shadow work earned beside live requests (negative: owed)
        self._cost: dict[bool, float] = {}  # mean seconds of a job, by whether it mirrors (generates) or only scores
        if metrics is not None:
            metrics.shadow_pending.set_function(lambda: self.pending)

    @property
    def pending(self) -> int:
        """Jobs queued or being scored: the shadow work this server still has to do."""
        return self.queue.qsize() + self._busy

    def start(self) -> None:
        self.task = asyncio.create_task(self._work())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    @property
    def comparing(self) -> bool:
        """Whether live answers are worth scoring now: the endpoint has another deployment to compare with
        (a canary, a mirror, or the old deployment kept for undo after a rollout's last step)."""
        r = self.router
        return r.endpoint is not None and len(r.loaded()) > 1

    def _vocab(self, b: Backend) -> str:
        """The tokenizer's identity (its JSON, serialised once per loaded model)."""
        tok = b.served.tokenizer
        if id(tok) not in self._vocabs:
            self._vocabs[id(tok)] = tok.to_str()
        return self._vocabs[id(tok)]

    def offer(self, job: Job) -> bool:
        try:
            self.queue.put_nowait(job)
            return True
        except asyncio.QueueFull:
            self._count("dropped")
            return False

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        if self.metrics is not None:
            self.metrics.shadow.labels(outcome).inc()

    async def _work(self) -> None:
        while True:
            job = await self.queue.get()
            self._busy = 1
            try:
                beside = await self._turn(job)
                started = self.clock()
                await self._score(job)
                self._count("scored")
                spent, kind = self.clock() - started, bool(job.mirrors)
                self._cost[kind] = spent if kind not in self._cost else 0.7 * self._cost[kind] + 0.3 * spent
                if beside or self.live_busy():  # it ran beside live requests (or they came meanwhile): spent
                    self.budget -= spent
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - one bad job must not end the worker
                self._count("failed")
                log.warning("shadow: request %s: %s", job.request_id, err)
            finally:
                self._busy = 0

    def live_busy(self) -> bool:
        """Whether a live request is running or waiting on any engine (between jobs the worker has none)."""
        return any(s.running or s.waiting for s in (b.engine.stats() for b in self.router.loaded().values()))

    def expected_cost(self, job: Job) -> float:
        return self._cost.get(bool(job.mirrors), FIRST_COST_S)

    async def _turn(self, job: Job) -> bool:
        """Wait until `job` may run: no live request runs (False), or the budget earned while it waited beside
        them covers its expected time (True)."""
        share = self.cfg.serve.shadow_busy_share
        if share >= 1:
            return self.live_busy()
        last = self.clock()
        while self.live_busy():
            now = self.clock()
            self.budget += (now - last) * share / (1 - share)
            last = now
            if share > 0 and self.budget >= self.expected_cost(job):
                return True
            await asyncio.sleep(self.poll_s)
        self.budget = min(self.budget, 0.0)  # idle: what was earned beside one burst is not spent in the next
        return False

    async def _score(self, job: Job) -> None:
        stable = self.router.weights()
        ref_name = min(stable, key=lambda d: (-stable[d], d)) if stable else job.live.name
        ref = self.router.backends.get(ref_name) or job.live
        same_tok = lambda b: self._vocab(b) == self._vocab(job.live)
        prompt, answer = job.prompt_ids, job.answer_ids
        rows = [await self._row(job, job.live, "live", prompt, answer, ref, same_tok(ref), job.finish_reason,
                                job.flagged, job.ttft_s, job.latency_s, None)]
        for b in job.mirrors:
            if b.served is None or not same_tok(b):
                continue
            started = time.monotonic()
            handle = b.engine.submit(prompt, job.params)
            ids, first = [], None
            async for ev in handle:
                first = first or time.monotonic()
                ids.append(ev.token_id)
            text = b.served.tokenizer.decode(ids, skip_special_tokens=False)
            flagged = bool(moderate(text, self.cfg.safety, "output").hits)
            agree = ids == answer if job.params.temperature == 0 else None
            rows.append(await self._row(job, b, "shadow", prompt, ids, ref, same_tok(ref), handle.finish_reason,
                                        flagged, None if first is None else first - started,
                                        time.monotonic() - started, agree, handle.error))
        await asyncio.to_thread(self.store.scores.add, rows)

    async def _row(self, job: Job, b: Backend, role: str, prompt: list[int], answer: list[int], ref: Backend,
                   ref_ok: bool, finish_reason, flagged, ttft_s, latency_s, agree, error=None) -> dict:
        judged = await asyncio.to_thread(ref.engine.score, prompt + answer) if answer and ref_ok else None
        # a causal model's prompt log-probabilities are the same with the answer after it: one forward
        own = judged[:len(prompt)] if judged is not None and ref is b else \
            await asyncio.to_thread(b.engine.score, prompt)
        return {"ts": job.ts, "request_id": job.request_id, "endpoint": self.router.endpoint, "deployment": b.name,
                "role": role, "model_version": b.served.version, "reference": ref.name if judged else None,
                "prompt_tokens": len(prompt), "completion_tokens": len(answer), "prompt_nll": mean_nll(own, 1),
                "answer_nll": mean_nll(judged, len(prompt)) if judged else None, "finish_reason": finish_reason,
                "flagged": flagged, "ttft_s": ttft_s, "latency_s": latency_s, "agree": agree, "error": error}
