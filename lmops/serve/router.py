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
import random
from dataclasses import dataclass, field

from lmops.config import Config
from lmops.deploy.endpoints import Deployment, Endpoint
from lmops.serve.engine import Engine
from lmops.serve.protocol import APIError
from lmops.serve.source import ModelSource, ServedModel

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
    """The backends and the traffic table; `pick` chooses one per request."""

    def __init__(self, cfg: Config, endpoint: str | None = None):
        self.cfg, self.endpoint = cfg, endpoint
        self.backends: dict[str, Backend] = {}
        self.traffic: dict[str, int] = {}
        self.mirror: dict[str, int] = {}
        self.revision: int | None = None
        self._random = random.Random()

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


def _not_ready(b: Backend) -> APIError:
    why = "is still loading; retry shortly" if b.load_error is None else f"could not be loaded: {b.load_error}"
    return APIError(503, f"deployment '{b.name}' {why}", "service_unavailable", code="model_not_ready",
                    headers={"Retry-After": "1"})
