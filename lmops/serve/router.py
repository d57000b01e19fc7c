"""Which deployment answers a request: the backends of an endpoint (one loaded model and engine each),
chosen by traffic weight or by the x-lmops-deployment header, and kept in step with the store.

`lmops serve --model REF` is an implicit endpoint of one deployment, `default`, that follows REF when it
is an alias. `lmops serve --endpoint E` loads every deployment of E; every serve.endpoint_poll_s it reads
E's revision (one indexed query) and, when it changed, the endpoint: a new or changed deployment is
loaded in a worker thread and joins only once its engine runs; traffic then points at it. A removed one
leaves the table at once and its engine drains (streams in flight finish on it) before it stops. Until a
deployment with traffic is loaded, its share goes to the loaded ones, so a change never fails requests.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from dataclasses import dataclass, field

from lmops.config import Config
from lmops.deploy.endpoints import Deployment, Endpoint
from lmops.errors import LmopsError
from lmops.serve.engine import Engine
from lmops.serve.protocol import APIError
from lmops.serve.source import ModelSource, ServedModel
from lmops.util import first_line

log = logging.getLogger("lmops.serve")

HEADER = "x-lmops-deployment"  # as Azure ML's azureml-model-deployment: pick a deployment, even one at 0%
VERSION_HEADER = "x-lmops-model-version"
DEFAULT = "default"  # the deployment of `lmops serve --model`


@dataclass
class Backend:
    """One deployment as this server runs it."""

    name: str
    source: ModelSource
    deployment: Deployment | None = None
    served: ServedModel | None = None
    engine: Engine | None = None
    load_error: str | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)


def identity(d: Deployment) -> tuple:
    """What makes a deployment another backend when it changes: its model and its settings."""
    return d.model_uri, d.runtime, d.max_batch


class Router:
    """The backends and the traffic table; `pick` chooses one per request. `start` loads the backends and
    keeps them in step with the alias or the endpoint they serve; `stop` drains their engines.

    source: what `serve --model` serves (endpoint None); store, ws: where an endpoint's deployments are
    read and their models found; metrics: counts alias reloads (set by the server once it has them)."""

    def __init__(self, cfg: Config, endpoint: str | None = None, *, source: ModelSource | None = None, store=None,
                 ws=None):
        self.cfg, self.sc, self.endpoint, self.store, self.ws = cfg, cfg.serve, endpoint, store, ws
        self.backends: dict[str, Backend] = {}
        if endpoint is None and source is not None:
            self.backends[DEFAULT] = Backend(DEFAULT, source)
        self.traffic: dict[str, int] = {}
        self.mirror: dict[str, int] = {}
        self.revision: int | None = None
        self.metrics = None
        self._random = random.Random()
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start(): wake() reaches it from threads
        self._wake: asyncio.Event | None = None

    def loaded(self) -> dict[str, Backend]:
        return {n: b for n, b in self.backends.items() if b.served is not None}

    def weights(self) -> dict[str, int]:
        """Traffic over the loaded backends; a share whose backend is still loading goes to the others."""
        loaded = self.loaded()
        live = {d: w for d, w in self.traffic.items() if w > 0 and d in loaded}
        if not live and self.endpoint is None and loaded:
            live = {n: 100 for n in loaded}
        return live

    @property
    def primary(self) -> Backend | None:
        """The loaded backend taking the most traffic: what /readyz and /v1/models describe."""
        weights = self.weights()
        if weights:
            return self.backends[min(weights, key=lambda d: (-weights[d], d))]
        return next(iter(self.loaded().values()), None)

    @property
    def ready(self) -> bool:
        """Something can answer: a backend is loaded and, for an endpoint, its traffic table is read."""
        return bool(self.loaded()) and (self.endpoint is None or self.revision is not None)

    def pick(self, wanted: str | None) -> Backend:
        if not self.ready:
            raise APIError(503, "the model is still loading; retry shortly", "service_unavailable",
                           code="model_not_ready", headers={"Retry-After": "1"})
        if wanted:
            b = self.backends.get(wanted)
            if b is None:
                have = ", ".join(sorted(self.backends)) or "none"
                raise APIError(404, f"{HEADER}: no deployment '{wanted}' here (deployments: {have})",
                               "not_found_error", param=HEADER, code="deployment_not_found")
            if b.served is None:
                raise _not_ready(b)
            return b
        weights = self.weights()
        if not weights:
            loading = [b for b in self.backends.values() if b.served is None]
            if loading:
                raise _not_ready(loading[0])
            raise APIError(503, f"endpoint '{self.endpoint}' has no deployment taking traffic; `lmops traffic set` "
                           "gives one some", "service_unavailable", code="no_live_deployment",
                           headers={"Retry-After": "1"})
        names = sorted(weights)
        return self.backends[self._random.choices(names, [weights[n] for n in names])[0]]

    def mirror_targets(self, live: str) -> tuple[Backend, ...]:
        """The loaded deployments this request is copied to, each drawn with its mirror percent."""
        out = []
        for d, pct in sorted(self.mirror.items()):
            b = self.backends.get(d)
            if d != live and b is not None and b.served is not None and self._random.random() * 100 < pct:
                out.append(b)
        return tuple(out)

    def apply(self, ep: Endpoint) -> None:
        self.traffic, self.mirror, self.revision = dict(ep.traffic), dict(ep.mirror), ep.revision

    def stats(self) -> tuple[int, int]:
        """Requests running and waiting over the loaded engines."""
        stats = [b.engine.stats() for b in self.loaded().values()]
        return sum(s.running for s in stats), sum(s.waiting for s in stats)

    # ------------------------------------------------------------------------- loading and following

    def preload(self) -> None:
        """Load the models and build their engines now, in the caller's thread: `serve` does, so that a model
        that cannot be served fails the command (LmopsError) before the port is bound, not a probe later."""
        if self.endpoint is not None:
            ep = self.store.endpoints.get(self.endpoint)
            for d in ep.deployments.values():
                self.backends[d.name] = Backend(d.name, self._source(d), d)
            self.apply(ep)
        for b in self.backends.values():
            try:
                served = b.source.load()
                b.engine = self._engine_for(served, b.deployment)
                b.served = served
            except Exception as err:
                raise LmopsError(f"cannot serve {b.source.ref}: {first_line(err)}") from err

    async def start(self) -> None:
        """Load the models in the background and follow what they come from."""
        for b in list(self.backends.values()):
            b.tasks.append(asyncio.create_task(self._load(b)))
        if self.endpoint is not None:
            self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
            self._tasks.append(asyncio.create_task(self._follow_endpoint()))

    async def stop(self, drain_s: float) -> None:
        for task in self._tasks + [t for b in self.backends.values() for t in b.tasks]:
            task.cancel()
        engines = [b.engine for b in self.backends.values() if b.engine is not None]
        await asyncio.gather(*(asyncio.to_thread(e.stop, drain_s) for e in engines))

    def wake(self) -> None:
        """Read the endpoint now rather than at the next poll (from any thread: the rollout driver's)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    def _source(self, d: Deployment) -> ModelSource:
        return ModelSource(self.ws, self.cfg, d.model_uri)

    def _engine_for(self, served: ServedModel, d: Deployment | None = None) -> Engine:
        max_batch = d.max_batch if d is not None and d.max_batch else self.sc.max_batch
        runtime = d.runtime if d is not None and d.runtime else self.sc.runtime
        return Engine(served.model, max_batch=max_batch, max_waiting=self.sc.max_waiting, runtime=runtime,
                      weights=self._weights_for(served, runtime))

    def _weights_for(self, served: ServedModel, runtime: str) -> str:
        return choose_weights(self.sc, served, runtime)

    async def _load(self, b: Backend) -> None:
        """Start b's engine (preloaded) or load b's model and engine off the loop, then start serving it."""
        if b.engine is None:
            try:
                served = await asyncio.to_thread(b.source.load)
                # building the runtime's session takes a moment: off the event loop too
                engine = await asyncio.to_thread(self._engine_for, served, b.deployment)
            except Exception as err:  # also serve.runtime onnxruntime for a model it cannot run
                b.load_error = first_line(err)
                log.error("could not load %s: %s", b.source.ref, err)
                return
            b.engine, served_now = engine, served
        else:
            served_now, b.served = b.served, None
        b.engine.start()
        b.served = served_now
        log.info("serving %s v%s from %s on %s as deployment %s", b.served.name, b.served.version, b.source.ref,
                 b.engine.runtime, b.name)
        if b.deployment is None and b.source.movable:
            b.tasks.append(asyncio.create_task(self._follow_alias(b)))

    async def _follow_alias(self, b: Backend) -> None:
        """Every serve.reload_interval_s, ask where the alias points; when it moved, load that version
        and swap it in (engine.swap_model lets running requests finish on the old model)."""
        while True:
            await asyncio.sleep(self.sc.reload_interval_s)
            try:
                version = await asyncio.to_thread(b.source.version)
                if version == b.served.version:
                    continue
                served = await asyncio.to_thread(b.source.load, version)
                runtime = b.deployment.runtime if b.deployment is not None and b.deployment.runtime else self.sc.runtime
                weights = await asyncio.to_thread(self._weights_for, served, runtime)
                loaded = await asyncio.to_thread(b.engine.load_model, served.model, weights)  # the slow part
                # swap and relabel in one go on the loop, so a request's fingerprint is the model it runs on
                b.engine.swap_model(loaded)
                b.served = served
                if self.metrics is not None:
                    self.metrics.reloads.labels("ok").inc()
                log.info("%s moved: now serving %s v%s", b.source.ref, served.name, version)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # keep serving what we have, try again next time
                if self.metrics is not None:
                    self.metrics.reloads.labels("failed").inc()
                log.warning("could not follow %s: %s", b.source.ref, err)

    async def _follow_endpoint(self) -> None:
        """Every serve.endpoint_poll_s (or when woken), the endpoint's revision; when it changed, its
        deployments and traffic."""
        name = self.endpoint
        while True:
            if self.revision is not None:  # not preloaded: read it at once
                try:
                    await asyncio.wait_for(self._wake.wait(), self.sc.endpoint_poll_s)
                except TimeoutError:
                    pass
                self._wake.clear()
            try:
                revision = await asyncio.to_thread(self.store.endpoints.revision, name)
                if revision is None or revision == self.revision:
                    continue
                ep = await asyncio.to_thread(self.store.endpoints.get, name)
                await self._sync(ep)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # keep serving what we have, try again next time
                log.warning("could not read endpoint %s: %s", name, err)
                await asyncio.sleep(self.sc.endpoint_poll_s)

    async def _sync(self, ep) -> None:
        """Load what is new or changed (it joins once its engine runs), then take the new traffic, then
        let what was removed or replaced drain and stop."""
        leaving = []
        for d in ep.deployments.values():
            b = self.backends.get(d.name)
            if b is not None and identity(b.deployment) == identity(d):
                continue
            fresh = Backend(d.name, self._source(d), d)
            await self._load(fresh)
            if fresh.served is None:  # could not load: keep what runs, try again at the next change
                continue
            if b is not None:
                leaving.append(b)
            self.backends[d.name] = fresh
            log.info("endpoint %s: deployment %s is %s", ep.name, d.name, d.label)
        for gone in set(self.backends) - set(ep.deployments):
            leaving.append(self.backends.pop(gone))
            log.info("endpoint %s: deployment %s removed", ep.name, gone)
        self.apply(ep)
        for b in leaving:  # requests already on it finish there; none new arrive
            for task in b.tasks:
                task.cancel()
            if b.engine is not None:
                self._tasks.append(asyncio.create_task(asyncio.to_thread(b.engine.stop, self.sc.shutdown_timeout_s)))


def _not_ready(b: Backend) -> APIError:
    why = "is still loading; retry shortly" if b.load_error is None else f"could not be loaded: {b.load_error}"
    return APIError(503, f"deployment '{b.name}' {why}", "service_unavailable", code="model_not_ready",
                    headers={"Retry-After": "1"})


def choose_weights(sc, served: ServedModel, runtime: str) -> str:
    """serve.weights; under auto, the precision that decodes this model fastest here (lmops.serve.ort.fastest)
    of fp32 and the quantized ones whose measured perplexity cost (the version's evaluation:
    int8_ppl_ratio, int4_ppl_ratio) is within serve.auto_max_ppl_ratio. A model with no measured cost
    (a local checkpoint, a version evaluated without them) keeps fp32."""
    if sc.weights != "auto":
        return sc.weights
    from lmops.serve import ort

    bound = sc.auto_max_ppl_ratio
    allowed = ["fp32"] + [w for w in ort.WEIGHTS[1:] if served.evaluation.get(f"{w}_ppl_ratio", math.inf) <= bound]
    if len(allowed) == 1 or runtime == "torch" or ort.unsupported(served.model) is not None:
        return "fp32"
    best, speed = ort.fastest(served.model, allowed)
    log.info("serve.weights auto: %s for %s v%s (decode tok/s %s; perplexity cost %s, bound %g)", best,
             served.name, served.version, ", ".join(f"{w} {v:,.0f}" for w, v in speed.items()),
             ", ".join(f"{w} {served.evaluation.get(f'{w}_ppl_ratio', float('nan')):.4f}x" for w in ort.WEIGHTS[1:]),
             bound)
    return best
