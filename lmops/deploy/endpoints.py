"""Endpoints and their deployments, as Azure ML's online endpoints: the entities and the rules their
traffic obeys. No I/O: lmops/store/endpoints.py keeps them, the server (lmops/serve/router.py) routes by
them, the rollout controller (rollout.py) changes them.

An endpoint is a stable name served at one URL. It holds named deployments (blue, green, ...), each a
model reference resolved to one registry version when it is deployed, with its own serve settings.
`traffic` maps deployment -> weight: integers summing to 100, or all 0 while nothing takes traffic
(before the first deployment). `mirror` maps deployment -> percent of live requests copied to it as
shadow traffic (total at most 50, as Azure ML's mirror_traffic, and never a deployment that takes live
traffic: its answers would be counted twice).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from lmops.errors import LmopsError

# Azure ML's rule for endpoint and deployment names (3-32 characters there; lmops allows short ones such
# as `a` in tests): letters, digits and dashes, starting with a letter. Also safe in URLs, headers,
# Kubernetes object names (lowercase) and Prometheus label values.
NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")
MAX_MIRROR = 50  # percent of live traffic: Azure ML's cap, so a shadow cannot cost more than half again
RUNTIMES = ("torch", "onnxruntime")


def check_name(name: str, what: str) -> str:
    if not NAME.fullmatch(name):
        raise LmopsError(f"{what} name '{name}': use 1-32 lowercase letters, digits and dashes, starting with a "
                         "letter (e.g. blue, green, chat-prod)")
    return name


@dataclass(frozen=True)
class Deployment:
    """One model version behind an endpoint, with the serve settings it runs with."""

    endpoint: str
    name: str
    model_ref: str  # as the user gave it (champion, lmops-model@3, a path)
    model_name: str  # what it resolved to when deployed: the registered model (or the folder's name)
    model_version: str  # the registry version (or a local file's hash)
    model_uri: str  # what the server loads: models:/NAME/VERSION, or the local path
    runtime: str | None = None  # None: serve.runtime
    max_batch: int | None = None  # None: serve.max_batch
    created_at: datetime | None = None
    created_by: str | None = None

    @property
    def label(self) -> str:
        """What a response and the request log name: the deployment and the version it serves."""
        return f"{self.name} ({self.model_name} v{self.model_version})"


@dataclass(frozen=True)
class Endpoint:
    name: str
    description: str = ""
    traffic: dict[str, int] = field(default_factory=dict)
    mirror: dict[str, int] = field(default_factory=dict)
    deployments: dict[str, Deployment] = field(default_factory=dict)
    revision: int = 0  # every change adds one: a server polls this to learn that something changed
    created_at: datetime | None = None
    created_by: str | None = None
    updated_at: datetime | None = None

    @property
    def live(self) -> dict[str, int]:
        """Deployments that take live traffic, with their weights."""
        return {d: w for d, w in self.traffic.items() if w > 0}

    @property
    def stable(self) -> str | None:
        """The deployment taking the most traffic (the first such by name): the reference model of shadow
        scoring and the 'stable' side of a canary analysis."""
        live = self.live
        return min(live, key=lambda d: (-live[d], d)) if live else None


def check_traffic(deployments: Iterable[str], traffic: Mapping[str, int], mirror: Mapping[str, int]) -> None:
    """Refuse, with the reason, traffic or mirror settings an endpoint cannot have."""
    names = set(deployments)
    for what, weights in (("traffic", traffic), ("mirror", mirror)):
        if unknown := sorted(set(weights) - names):
            have = ", ".join(sorted(names)) or "none yet"
            raise LmopsError(f"{what}: no deployment {', '.join(unknown)} on this endpoint (deployments: {have})")
        if bad := sorted(d for d, w in weights.items() if not isinstance(w, int) or isinstance(w, bool)
                         or not 0 <= w <= 100):
            raise LmopsError(f"{what}: {', '.join(f'{d}={weights[d]}' for d in bad)}: a weight is a whole number "
                             "from 0 to 100")
    total = sum(traffic.values())
    if total not in (0, 100):
        shown = " ".join(f"{d}={w}" for d, w in sorted(traffic.items()))
        raise LmopsError(f"traffic {shown} sums to {total}; live traffic weights sum to 100 (or are all 0 before "
                         "anything takes traffic)")
    mirrored = {d: w for d, w in mirror.items() if w > 0}
    if both := sorted(d for d in mirrored if traffic.get(d, 0) > 0):
        raise LmopsError(f"mirror: {', '.join(both)} takes live traffic; mirror only a deployment at 0% (its "
                         "answers would otherwise be counted twice)")
    if (m := sum(mirrored.values())) > MAX_MIRROR:
        raise LmopsError(f"mirror: {m}% in total; at most {MAX_MIRROR}% of live traffic can be mirrored")


def parse_weights(items: Iterable[str], what: str = "traffic") -> dict[str, int]:
    """['blue=90', 'green=10'] -> {'blue': 90, 'green': 10}; a clear error for anything else."""
    out: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip().rstrip("%")
        if not sep or not name or not value.isdigit():
            raise LmopsError(f"{what} '{item}': write DEPLOYMENT=PERCENT, e.g. blue=90 green=10")
        if name in out:
            raise LmopsError(f"{what}: {name} given twice")
        out[name] = int(value)
    return out


def with_share(traffic: Mapping[str, int], name: str, share: int) -> dict[str, int]:
    """Traffic with `name` at `share` percent and the others scaled to fill the rest in proportion to
    their weights (largest remainder, so the result sums to 100 exactly). With no other live deployment
    the new one must take everything."""
    if not 0 <= share <= 100:
        raise LmopsError(f"--traffic {share}: a share is a whole number from 0 to 100")
    others = {d: w for d, w in traffic.items() if d != name and w > 0}
    if not others:
        if share not in (0, 100):
            raise LmopsError(f"--traffic {share}: no other deployment takes traffic, so {name} takes all of it "
                             "(100) or none (0)")
        return {**{d: 0 for d in traffic}, name: share}
    rest, total = 100 - share, sum(others.values())
    exact = {d: w * rest / total for d, w in others.items()}
    out = {d: int(v) for d, v in exact.items()}
    for d in sorted(exact, key=lambda d: (out[d] - exact[d], d))[:rest - sum(out.values())]:
        out[d] += 1
    return {**{d: 0 for d in traffic}, **out, name: share}
