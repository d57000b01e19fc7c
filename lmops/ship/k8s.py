"""An lmops endpoint as Kubernetes objects (`lmops k8s export`): built here as plain Python data, dumped as
YAML with PyYAML, one object per file, so `kubectl apply -f OUT/` applies them all.

Two shapes, because there are two ways to roll a new model out:

- `deployment`: a Deployment of N replicas of `lmops serve --endpoint E`. Every pod serves every deployment
  of the endpoint by its traffic weights and follows the store, and lmops itself drives the endpoint's
  rollouts (`lmops rollout start`; one driver per rollout by lease in the store, so any pod may die). The
  pods must share one PostgreSQL store: the Secret's LMOPS_DATABASE_URL.
- `rollout`: an Argo Rollouts `Rollout` whose pod template serves one model version (the endpoint's stable
  deployment, or `--deployment NAME`) with `lmops serve --model models:/NAME/VERSION` (a local model:
  `--bundle /model`, the bundle baked into the image). Rolling out is then Argo's: change the version (export again
  with `--deployment green` and apply) and Argo runs the canary steps of `rollout.steps`, each held for
  `rollout.window_s` and judged by an `AnalysisTemplate` that asks Prometheus the same questions
  lmops/deploy/analysis.py asks the store, canary pods against stable pods (Argo passes both
  pod-template hashes; Prometheus must keep the pods' `rollouts-pod-template-hash` label as
  `rollouts_pod_template_hash`, as the usual `labelmap: __meta_kubernetes_pod_label_(.+)` relabelling does).

Translating the analysis (`analysis_metrics`): each condition `canary OP a * stable + b` (any linear
arrangement of it) becomes the query `canary - a * stable` and the Argo condition `result[0] OP b`; when
a metric's success and failure conditions scale stable differently (p95 latency: 1.5x to pass, 3x to
fail), each gets its own query and Argo metric (`p95-latency-s` fails, `p95-latency-s-pass` passes). The
query also carries the sample guard of lmops (fewer than min_samples on a side: an empty result, so
neither condition holds: inconclusive). The metric is measured every window until it succeeds
(consecutiveSuccessLimit 1), fails more than rollout.failure_limit times, or is inconclusive
rollout.inconclusive_limit times (Argo then pauses the rollout, as lmops does). At the last step (100%)
the stable pods are gone, so a second template (NAME-final) measures the stable side one window earlier,
as lmops measures it from the rollout's earlier windows. A condition that is not
linear in that sense, and a metric Prometheus does not have (the NLL metrics live in the store's answer
scores, not in /metrics), is left out: said in the YAML and in the export's notes. Prometheus' numbers
are close to, not the same as, the store's: a p95 from histogram buckets, requests counted per prompt.

Both shapes share the rest: a Service (port 80 -> 8000), probes (readiness /readyz: loaded and not
draining; liveness /healthz; a startup probe, since `lmops serve` loads its models before it binds the
port), a preStop sleep so the Service stops sending before the drain starts, a grace period longer than
preStop + serve.shutdown_timeout_s + the request log's flush, resource requests, a CPU
HorizontalPodAutoscaler, a PodDisruptionBudget (minAvailable 1), a ConfigMap with the workspace's config
as lmops.yaml, and a Secret of placeholders (never a key or password of the store) for the database URL,
its password, the MLflow URI and the key Prometheus scrapes /metrics with.

The image is named, not built (`--image`; the repository's Dockerfile makes one): its command is set here
(`lmops serve ...`), so only lmops has to be on its PATH; it runs as the Dockerfile's user, UID 10001.
"""

from __future__ import annotations

import ast
import hashlib
import math
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import yaml

from lmops.config import Config, render_default_yaml
from lmops.deploy.endpoints import Deployment, Endpoint
from lmops.deploy.expr import parse_condition
from lmops.errors import LmopsError

KINDS = ("deployment", "rollout")
PORT = 8000  # the image's port (the Dockerfile's EXPOSE, serve.port's default)
UID = 10001  # the Dockerfile's non-root user (lmops)
PRESTOP_S = 5  # endpoints controllers and kube-proxy need a few seconds to stop routing to a pod
FLUSH_S = 15  # after the drain: the rollout driver stops (10 s at most) and the request log flushes
HASH_LABEL = "rollouts_pod_template_hash"  # Argo's pod label as Prometheus' labelmap names it
WORKSPACE = "/workspace"
# Error codes of the server's answers with status >= 500 (lmops/serve; tests/ship/test_k8s.py checks the
# list against the source): what error_rate counts in Prometheus, as the request log's status_code >= 500.
SERVER_ERROR_CODES = ("internal_error", "engine_error", "model_not_ready", "no_live_deployment", "shutting_down",
                      "server_error")


@dataclass(frozen=True)
class K8sOptions:
    """What `lmops k8s export` takes besides the endpoint; each default says why."""

    kind: str = "deployment"  # lmops drives its own rollouts: nothing to install in the cluster
    image: str = "lmops:latest"  # the repository's Dockerfile, built and tagged locally
    namespace: str | None = None  # None: kubectl's current namespace
    replicas: int = 2  # two, so one pod can go (a node drain, a rollout) while the other serves
    max_replicas: int = 6  # the HPA's ceiling: a small model's pods are cheap, a runaway scale-up is not
    cpu: str = "1"  # requests: a decode step wants one core
    memory: str = "1Gi"  # requests: a small model and its KV caches with room to spare
    memory_limit: str = "2Gi"  # a leak ends in a restart of one pod, not in a node out of memory
    cpu_target: int = 70  # HPA's average CPU utilisation: headroom for a burst while a new pod starts
    deployment: str | None = None  # rollout: the deployment the pod template serves; None: the stable one
    prometheus: str = "http://prometheus-server.monitoring.svc:80"  # the Prometheus helm chart's Service


@dataclass
class Export:
    """The files of an export (relative path -> text) and what a person should know about them."""

    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- YAML

class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # multi-line strings (lmops.yaml, PromQL) as literal blocks, readable in the file
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(obj: dict, comments: list[str] | None = None) -> str:
    head = "".join(f"# {line}\n" if line else "#\n" for line in comments or [])
    return head + yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


# ----------------------------------------------------------------------------- the analysis as PromQL

@dataclass(frozen=True)
class Linear:
    """A condition `canary OP a * stable + b`."""

    op: str
    a: float
    b: float


_OPS = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}
_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}


def _form(node: ast.AST) -> tuple[float, float, float] | None:
    """The expression as c * canary + s * stable + k, or None when it is not linear."""
    if isinstance(node, ast.Constant):
        return 0.0, 0.0, float(node.value)
    if isinstance(node, ast.Name):
        return (1.0, 0.0, 0.0) if node.id == "canary" else (0.0, 1.0, 0.0)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        f = _form(node.operand)
        return None if f is None else tuple(-x for x in f) if isinstance(node.op, ast.USub) else f
    if isinstance(node, ast.BinOp):
        left, right = _form(node.left), _form(node.right)
        if left is None or right is None:
            return None
        if isinstance(node.op, ast.Add):
            return tuple(x + y for x, y in zip(left, right))
        if isinstance(node.op, ast.Sub):
            return tuple(x - y for x, y in zip(left, right))
        if isinstance(node.op, ast.Mult):
            if left[:2] == (0.0, 0.0):
                return tuple(left[2] * y for y in right)
            if right[:2] == (0.0, 0.0):
                return tuple(right[2] * x for x in left)
            return None  # canary * stable
        if isinstance(node.op, ast.Div) and right[:2] == (0.0, 0.0) and right[2] != 0:
            return tuple(x / right[2] for x in left)
    return None


def linear(text: str) -> Linear | None:
    """`canary <= stable * 1.5 + 0.05` -> Linear('<=', 1.5, 0.05); None for anything that is not one
    comparison linear in canary and stable with canary in it (and/or, a chain, canary / stable)."""
    tree = parse_condition(text).tree.body
    if not isinstance(tree, ast.Compare) or len(tree.ops) != 1:
        return None
    left, right = _form(tree.left), _form(tree.comparators[0])
    if left is None or right is None:
        return None
    c, s, k = (x - y for x, y in zip(left, right))  # c*canary + s*stable + k OP 0
    if c == 0:
        return None
    op = _OPS[type(tree.ops[0])]
    if c < 0:
        op = _FLIP[op]
    return Linear(op, -s / c, -k / c)


def _num(x: float) -> str:
    """A number as PromQL and Argo's expressions both read it: positional, shortest (0.00001, not 1e-05)."""
    text = format(Decimal(repr(float(x))), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _sel(side: str, extra: str = "") -> str:
    return "{" + f'{HASH_LABEL}="{{{{args.{side}-hash}}}}"' + extra + "}"


def _requests(side: str, rng: str) -> str:
    return (f"((sum(increase(lmops:request_success_total{_sel(side)}{rng})) or vector(0))"
            f" + (sum(increase(lmops:request_errors_total{_sel(side)}{rng})) or vector(0)))")


def _value(metric: str, side: str, rng: str) -> str | None:
    """PromQL for one analysis metric of one side (canary or stable) over the range rng ('[120s]', maybe
    with an offset), or None if Prometheus does not have the metric."""
    if metric == "error_rate":
        errors = _sel(side, ', reason=~"' + "|".join(SERVER_ERROR_CODES) + '"')
        return f"((sum(increase(lmops:request_errors_total{errors}{rng})) or vector(0)) / {_requests(side, rng)})"
    if metric == "moderation_rate":
        return f"((sum(increase(lmops:moderation_total{_sel(side)}{rng})) or vector(0)) / {_requests(side, rng)})"
    hist = {"p95_ttft_s": "lmops:time_to_first_token_seconds", "p95_latency_s": "lmops:e2e_request_latency_seconds"}
    if metric in hist:
        return f"histogram_quantile(0.95, sum by (le) (rate({hist[metric]}_bucket{_sel(side)}{rng})))"
    return None


def _count(metric: str, side: str, rng: str) -> str:
    """How many values the metric has on a side: its histogram's count, else the requests."""
    hist = {"p95_ttft_s": "lmops:time_to_first_token_seconds", "p95_latency_s": "lmops:e2e_request_latency_seconds"}
    if metric in hist:
        return f"sum(increase({hist[metric]}_count{_sel(side)}{rng}))"
    return _requests(side, rng)


def _condition(lin: Linear) -> str:
    return f"len(result) > 0 && result[0] {lin.op} {_num(lin.b)}"


def _metric(metric_name: str, lin: Linear, success_if: str, failure_if: str, name: str, canary: str, stable: str,
            canary_rng: str, stable_rng: str, n: int, r, window: str, address: str) -> dict:
    """One Argo metric: the query canary - a * stable (guarded by n values a side) and its conditions,
    measured every window until it succeeds once, or fails or is inconclusive past rollout's limits."""
    scaled = "" if lin.a == 0 else f"\n  - {stable}" if lin.a == 1 else f"\n  - {_num(lin.a)} * {stable}"
    query = (f"(\n  {canary}{scaled}\n)\nand on() ({_count(name, 'canary', canary_rng)} >= {n})\n"
             f"and on() ({_count(name, 'stable', stable_rng)} >= {n})\n")
    return {
        "name": metric_name,
        "interval": window,
        "count": r.failure_limit + r.inconclusive_limit,
        "consecutiveSuccessLimit": 1,
        "failureLimit": r.failure_limit,
        "inconclusiveLimit": r.inconclusive_limit - 1,  # Argo: inconclusive once the count exceeds it
        "consecutiveErrorLimit": r.consecutive_error_limit,
        "successCondition": success_if,
        "failureCondition": failure_if,
        "provider": {"prometheus": {"address": address, "query": query}},
    }


def analysis_metrics(cfg: Config, address: str, final: bool = False) -> tuple[list[dict], list[str]]:
    """Argo metrics (Prometheus provider) for rollout.metrics, and a note per metric left out.

    final: for the last step (100%), where the stable pods are gone: the stable side is measured over the
    window before (offset by one window), as lmops measures it from the rollout's earlier windows."""
    r = cfg.rollout
    window = f"{math.ceil(r.window_s)}s"
    canary_rng = f"[{window}]"
    stable_rng = canary_rng + (f" offset {window}" if final else "")
    metrics, left_out = [], []
    for name, cond in r.metrics.items():
        canary, stable = _value(name, "canary", canary_rng), _value(name, "stable", stable_rng)
        if canary is None:
            left_out.append(f"{name}: not in Prometheus (answer scores are in the store); judge it with "
                            "`lmops endpoint compare` or the deployment shape")
            continue
        success, failure = linear(cond.success), linear(cond.failure)
        if success is None or failure is None:
            bad = cond.success if success is None else cond.failure
            left_out.append(f"{name}: condition {bad!r} is not of the form canary OP a * stable + b")
            continue
        n = cond.min_samples if cond.min_samples is not None else r.min_requests
        parts = (name, canary, stable, canary_rng, stable_rng, n, r, window, address)
        base = name.replace("_", "-")
        if success.a == failure.a:  # one query answers both conditions
            metrics.append(_metric(base, success, _condition(success), _condition(failure), *parts))
        else:  # a query per condition: the first fails (or passes when not failing), the second passes (or waits)
            not_failed = f"len(result) > 0 && !(result[0] {failure.op} {_num(failure.b)})"
            metrics.append(_metric(base, failure, not_failed, _condition(failure), *parts))
            metrics.append(_metric(f"{base}-pass", success, _condition(success), "false", *parts))
    return metrics, left_out


# ----------------------------------------------------------------------------- the objects

def _labels(endpoint: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "lmops", "app.kubernetes.io/instance": endpoint}


def _meta(name: str, endpoint: str, opts: K8sOptions, component: str = "server") -> dict:
    meta: dict[str, Any] = {"name": name}
    if opts.namespace:
        meta["namespace"] = opts.namespace
    meta["labels"] = {**_labels(endpoint), "app.kubernetes.io/component": component,
                      "app.kubernetes.io/managed-by": "lmops"}
    return meta


def workspace_config(cfg: Config) -> str:
    """lmops.yaml for the pods: the workspace's config with every default's reason, listening on all
    addresses, with the store and MLflow URIs left to the Secret (as LMOPS__ environment variables)."""
    pod_cfg = cfg.model_copy(deep=True)
    pod_cfg.store.database_url = None
    pod_cfg.tracking.tracking_uri = None
    pod_cfg.serve.host = "0.0.0.0"
    pod_cfg.serve.port = PORT
    return render_default_yaml(pod_cfg)


def no_password(url: str | None) -> str | None:
    """url if it holds no password (user:password@), else None: a ConfigMap or placeholder never shows one."""
    if not url:
        return None
    userinfo = url.partition("://")[2].partition("@")
    return None if userinfo[1] and ":" in userinfo[0] else url


def _secret(name: str, endpoint: str, cfg: Config, opts: K8sOptions) -> dict:
    db = no_password(cfg.store.database_url)
    db = db if db and not db.startswith("sqlite") else "postgresql+psycopg://REPLACE-USER@REPLACE-HOST:5432/lmops"
    return {
        "apiVersion": "v1", "kind": "Secret", "metadata": _meta(name, endpoint, opts), "type": "Opaque",
        "stringData": {
            "LMOPS_DATABASE_URL": db,
            "PGPASSWORD": "REPLACE-ME",
            "MLFLOW_TRACKING_URI": no_password(cfg.tracking.tracking_uri) or "http://REPLACE-MLFLOW-HOST:5000",
            "LMOPS_METRICS_KEY": "REPLACE-ME: lmops keys create prometheus --role deployer",
        },
    }


def _serve_args(endpoint: Endpoint, dep: Deployment | None, kind: str) -> list[str]:
    if kind == "deployment":
        args = ["serve", "--endpoint", endpoint.name]
    else:
        # a registry version is downloaded from MLflow; a local file is the bundle baked in at /model
        # (the Dockerfile's `baked` target; lmops package makes the bundle)
        args = ["serve", "--model", dep.model_uri] if dep.model_uri.startswith("models:/") else \
            ["serve", "--bundle", "/model"]
        for key, value in (("runtime", dep.runtime), ("max_batch", dep.max_batch)):
            if value is not None:
                args += ["--set", f"serve.{key}={value}"]
    # the URIs come from the Secret as LMOPS__SECTION__KEY variables (lmops/config.py), not the ConfigMap
    return args + ["--host", "0.0.0.0", "--port", str(PORT)]


def _pod_template(name: str, endpoint: Endpoint, dep: Deployment | None, cfg: Config, opts: K8sOptions,
                  config_text: str) -> dict:
    def probe(path: str, period: int, failures: int, timeout: int) -> dict:
        return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "timeoutSeconds": timeout,
                "failureThreshold": failures}

    def secret_env(key: str, as_name: str | None = None) -> dict:
        return {"name": as_name or key, "valueFrom": {"secretKeyRef": {"name": name, "key": key}}}

    grace = math.ceil(PRESTOP_S + cfg.serve.shutdown_timeout_s + FLUSH_S)
    container = {
        "name": "lmops",
        "image": opts.image,
        "command": ["lmops"],
        "args": _serve_args(endpoint, dep, opts.kind),
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": [secret_env("LMOPS_DATABASE_URL", "LMOPS__STORE__DATABASE_URL"), secret_env("PGPASSWORD"),
                secret_env("MLFLOW_TRACKING_URI", "LMOPS__TRACKING__TRACKING_URI"),
                {"name": "LMOPS_WORKSPACE", "value": WORKSPACE},
                # the audit log names the pod that drove a rollout step
                {"name": "LMOPS_USER", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "resources": {"requests": {"cpu": opts.cpu, "memory": opts.memory}, "limits": {"memory": opts.memory_limit}},
        # lmops serve loads its models before it binds the port: up to 5 minutes before liveness counts
        "startupProbe": probe("/healthz", 5, 60, 5),
        "readinessProbe": probe("/readyz", 5, 2, 3),
        "livenessProbe": probe("/healthz", 10, 3, 5),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_S)]}}},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "workspace", "mountPath": WORKSPACE},
                         {"name": "config", "mountPath": f"{WORKSPACE}/lmops.yaml", "subPath": "lmops.yaml",
                          "readOnly": True}],
    }
    checksum = hashlib.sha256(config_text.encode()).hexdigest()[:16]
    return {
        "metadata": {
            "labels": {**_labels(endpoint.name), "app.kubernetes.io/component": "server"},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(PORT),
                            "prometheus.io/path": "/metrics",
                            "lmops.dev/config-sha256": checksum},  # a new config rolls the pods
        },
        "spec": {
            "terminationGracePeriodSeconds": grace,
            "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID},
            "containers": [container],
            "volumes": [{"name": "workspace", "emptyDir": {}},
                        {"name": "config", "configMap": {"name": name}}],
        },
    }


def _steps(cfg: Config, template: str | None) -> list[dict]:
    """setWeight, pause for the window, analysis (when there is a template; TEMPLATE-final at 100%), per
    share of rollout.steps."""
    window = f"{math.ceil(cfg.rollout.window_s)}s"
    steps: list[dict] = []
    for share in cfg.rollout.steps:
        steps += [{"setWeight": share}, {"pause": {"duration": window}}]
        if template is not None:
            steps += [{"analysis": {
                "templates": [{"templateName": f"{template}-final" if share == 100 else template}],
                "args": [{"name": "canary-hash", "valueFrom": {"podTemplateHashValue": "Latest"}},
                         {"name": "stable-hash", "valueFrom": {"podTemplateHashValue": "Stable"}}]}}]
    return steps


def build(endpoint: Endpoint, cfg: Config, opts: K8sOptions) -> Export:
    """Every object of the export as YAML text, with notes for the person applying them."""
    if opts.kind not in KINDS:
        raise LmopsError(f"--kind {opts.kind}: one of {', '.join(KINDS)}")
    if opts.replicas < 1 or opts.max_replicas < opts.replicas:
        raise LmopsError(f"--replicas {opts.replicas}, --max-replicas {opts.max_replicas}: at least 1 replica, "
                         "and max-replicas at least replicas")
    if not endpoint.deployments:
        raise LmopsError(f"endpoint {endpoint.name} has no deployments; deploy one first "
                         f"(lmops deploy blue --endpoint {endpoint.name} --model @champion)")
    name = f"lmops-{endpoint.name}"
    out = Export()
    dep = None
    if opts.kind == "rollout":
        chosen = opts.deployment or endpoint.stable or min(endpoint.deployments)
        if chosen not in endpoint.deployments:
            raise LmopsError(f"--deployment {chosen}: endpoint {endpoint.name} has {', '.join(endpoint.deployments)}")
        dep = endpoint.deployments[chosen]
        if not dep.model_uri.startswith("models:/"):
            out.notes.append(f"{chosen} serves a local file ({dep.model_uri}): the pods serve the bundle at /model; "
                             f"make it (lmops package {dep.model_uri} bundle) and bake it into the image "
                             "(docker build --target baked)")
        others = sorted(set(endpoint.deployments) - {chosen})
        if others:
            out.notes.append(f"the Rollout serves {chosen} ({dep.model_name} v{dep.model_version}); to roll out "
                             f"{others[0]}: lmops k8s export --kind rollout --deployment {others[0]} --force, then "
                             "kubectl apply; Argo runs the canary steps")
    else:
        out.notes.append(f"lmops drives the rollouts of {endpoint.name} (lmops rollout start); the pods share "
                         "the PostgreSQL store of the Secret's LMOPS_DATABASE_URL")
    if cfg.store.database_url is None or cfg.store.database_url.startswith("sqlite"):
        out.notes.append("this workspace's store is SQLite: the pods need a shared PostgreSQL store, so set "
                         "LMOPS_DATABASE_URL (and PGPASSWORD) in secret.yaml")
    out.notes.append(f"secret.yaml holds placeholders (REPLACE-...): better create the Secret {name} in the cluster "
                     "yourself (kubectl create secret generic ...) and apply the rest without the file: filled in, "
                     "it holds a password on disk, and the next export with --force replaces it")

    config_text = workspace_config(cfg)
    out.files["configmap.yaml"] = dump(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(name, endpoint.name, opts),
         "data": {"lmops.yaml": config_text}},
        ["The workspace's lmops.yaml; the store and MLflow URIs come from the Secret (LMOPS__STORE__DATABASE_URL, "
         "LMOPS__TRACKING__TRACKING_URI)."])
    out.files["secret.yaml"] = dump(_secret(name, endpoint.name, cfg, opts), [
        "Placeholders, never real values: replace every REPLACE-... before applying.",
        "LMOPS_DATABASE_URL: the shared PostgreSQL store, without its password (PGPASSWORD holds it).",
        "LMOPS_METRICS_KEY: a deployer key for Prometheus to scrape /metrics (its scrape config's authorization).",
    ])
    template = _pod_template(name, endpoint, dep, cfg, opts, config_text)
    selector = {"matchLabels": _labels(endpoint.name)}
    if opts.kind == "deployment":
        target = {"apiVersion": "apps/v1", "kind": "Deployment"}
        out.files["deployment.yaml"] = dump({
            **target, "metadata": _meta(name, endpoint.name, opts),
            "spec": {"replicas": opts.replicas, "selector": selector,
                     # a new pod is ready before an old one goes
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                     "template": template}})
    else:
        target = {"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout"}
        metrics, left_out = analysis_metrics(cfg, opts.prometheus)
        out.notes += [f"analysis: {n}" for n in left_out]
        if not metrics:
            out.notes.append("analysis: no metric could be translated, so no AnalysisTemplate; the canary steps "
                             "only pause")
        out.files["rollout.yaml"] = dump({
            **target, "metadata": _meta(name, endpoint.name, opts),
            "spec": {"replicas": opts.replicas, "selector": selector, "template": template,
                     "revisionHistoryLimit": 3,
                     "strategy": {"canary": {"maxSurge": 1, "maxUnavailable": 0,
                                             "steps": _steps(cfg, name if metrics else None)}}}},
            [f"Canary steps of rollout.steps {cfg.rollout.steps}, each held {math.ceil(cfg.rollout.window_s)} s "
             "(rollout.window_s) and then analysed.",
             "Without a traffic router Argo approximates a weight by the share of canary pods; add",
             "strategy.canary.trafficRouting (nginx, Istio, SMI, ...) for exact percentages.",
             "Needs Argo Rollouts 1.8 or later (consecutiveSuccessLimit)."])
        if metrics:
            for final in (False, True):
                comments = [
                    "lmops's canary analysis (rollout.metrics) on Prometheus: each condition canary OP a * stable + b",
                    "as the query canary - a * stable and the condition result[0] OP b; an empty result (fewer than",
                    "min_samples requests on a side) is inconclusive, as in lmops."]
                if final:
                    comments += ["For the last step (100%): the stable pods are gone, so their side is the window "
                                 "before (offset)."]
                comments += [""] + ["Left out: " + n for n in left_out] if left_out else []
                out.files[f"analysistemplate{'-final' if final else ''}.yaml"] = dump({
                    "apiVersion": "argoproj.io/v1alpha1", "kind": "AnalysisTemplate",
                    "metadata": _meta(f"{name}-final" if final else name, endpoint.name, opts, "analysis"),
                    "spec": {"args": [{"name": "canary-hash"}, {"name": "stable-hash"}],
                             "metrics": analysis_metrics(cfg, opts.prometheus, final)[0]}}, comments)
    out.files["service.yaml"] = dump({
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(name, endpoint.name, opts),
        "spec": {"type": "ClusterIP", "selector": _labels(endpoint.name),
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}})
    out.files["hpa.yaml"] = dump({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _meta(name, endpoint.name, opts),
        "spec": {"scaleTargetRef": {**target, "name": name}, "minReplicas": opts.replicas,
                 "maxReplicas": opts.max_replicas,
                 "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                     "type": "Utilization", "averageUtilization": opts.cpu_target}}}]}})
    out.files["pdb.yaml"] = dump({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(name, endpoint.name, opts),
        "spec": {"minAvailable": 1, "selector": selector}})
    return out


def objects(export: Export) -> list[dict]:
    """The objects of an export's YAML files, parsed back (for checks and tests)."""
    return [yaml.safe_load(text) for path, text in sorted(export.files.items()) if path.endswith(".yaml")]
