"""`lmops k8s export`: every object validated offline against Kubernetes' schemas (the kubernetes-validate
package's copy of them, strict: an unknown field fails) and Argo Rollouts' (Argo's own CRDs when
LMOPS_ARGO_ROLLOUTS_CRDS names a folder holding them, else tests/ship/schemas/argo-rollouts-subset.yaml),
their fields checked against the config they came from, and each check shown to fail on a broken object."""

from __future__ import annotations

import copy
import os
import random
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from lmops.config import Config, override, parse_config
from lmops.deploy.endpoints import Deployment
from lmops.deploy.expr import parse_condition
from lmops.ship import k8s
from lmops.store import Store

K8S_VERSION = "1.30"  # the oldest Kubernetes still supported by its cloud vendors when written
SCHEMAS = Path(__file__).parent / "schemas"
SHARED_CRDS = Path(__file__).resolve().parents[3] / "shared" / "schemas" / "argo-rollouts"


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture
def chat(workspace):
    """Endpoint chat: blue (registry version 1) takes all traffic, green (version 2, torch) is at 0%."""
    with Store.for_workspace(workspace) as store:
        store.endpoints.create("chat", "alice")
        store.endpoints.deploy(Deployment("chat", "blue", "m@1", "m", "1", "models:/m/1"), "alice")
        store.endpoints.deploy(Deployment("chat", "green", "m@2", "m", "2", "models:/m/2", runtime="torch"),
                               "alice", traffic=0)
    return workspace


def load(folder: Path) -> dict[str, dict]:
    """file name without .yaml -> object, for every YAML file of an export."""
    return {path.stem: yaml.safe_load(path.read_text()) for path in sorted(folder.glob("*.yaml"))}


# ----------------------------------------------------------------------------- validators

def k8s_valid(obj: dict) -> None:
    """Kubernetes' own schema for the object's kind, strict (unknown fields fail)."""
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def pod_template_valid(template: dict) -> None:
    """A Rollout's pod template against Kubernetes' PodTemplateSpec, as for a Deployment's."""
    k8s_valid({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
               "spec": {"selector": {}, "template": template}})


def _strict(schema):
    """An OpenAPI v3 structural schema (a CRD's) as strict JSON Schema: objects with properties refuse
    fields they do not list, as `kubectl apply` (server-side field validation Strict) does."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _crd_schemas() -> dict[str, dict]:
    folder = os.environ.get("LMOPS_ARGO_ROLLOUTS_CRDS") or (SHARED_CRDS if SHARED_CRDS.is_dir() else None)
    if folder is None:
        subset = yaml.safe_load((SCHEMAS / "argo-rollouts-subset.yaml").read_text())
        return {kind: {**subset, "$ref": f"#/$defs/{kind}"} for kind in ("Rollout", "AnalysisTemplate")}
    schemas = {}
    for path in Path(folder).glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd.get("kind") == "CustomResourceDefinition" and crd["spec"]["group"] == "argoproj.io":
            version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
            schemas[crd["spec"]["names"]["kind"]] = _strict(version["schema"]["openAPIV3Schema"])
    assert {"Rollout", "AnalysisTemplate"} <= set(schemas), f"no Argo Rollouts CRDs in {folder}"
    return schemas


ARGO = _crd_schemas()


def argo_valid(obj: dict) -> None:
    jsonschema.validate(obj, ARGO[obj["kind"]])
    if obj["kind"] == "Rollout":
        pod_template_valid(obj["spec"]["template"])
    else:
        for m in obj["spec"]["metrics"]:
            argo_metric_rules(m)


def argo_metric_rules(m: dict) -> None:
    """What Argo's controller checks of a metric beyond its schema (utils/analysis ValidateMetric)."""
    count, failures = int(m.get("count", 0)), int(m.get("failureLimit", 0))
    successes, inconclusive = int(m.get("consecutiveSuccessLimit", 0)), int(m.get("inconclusiveLimit", 0))
    assert min(successes, inconclusive) >= 0 and failures >= -1
    assert not (successes == 0 and failures == -1)
    if count > 0:
        assert count >= failures + successes and count >= inconclusive, m["name"]
    assert count <= 1 or m.get("interval"), f"{m['name']}: count > 1 needs an interval"


def valid(obj: dict) -> None:
    (argo_valid if obj["apiVersion"].startswith("argoproj.io/") else k8s_valid)(obj)


# ----------------------------------------------------------------------------- the two shapes

def test_deployment_shape_is_valid_kubernetes_and_says_what_lmops_needs(cli, chat, tmp_path):
    out = cli("k8s", "export", "--endpoint", "chat", str(tmp_path / "k8s"), "--replicas", "3", "--namespace", "ml")
    objs = load(tmp_path / "k8s")
    assert {o["metadata"]["namespace"] for o in objs.values()} == {"ml"}
    assert set(objs) == {"configmap", "secret", "deployment", "service", "hpa", "pdb"}
    for obj in objs.values():
        valid(obj)
    cfg = chat.config()
    dep = objs["deployment"]
    assert dep["spec"]["replicas"] == 3
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["args"][:3] == ["serve", "--endpoint", "chat"]
    assert not any("database_url" in a for a in c["args"])  # no URL on the command line: from the Secret, as env
    env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef", {}).get("key") for e in c["env"]}
    assert env["LMOPS__STORE__DATABASE_URL"] == "LMOPS_DATABASE_URL" and env["PGPASSWORD"] == "PGPASSWORD"
    assert env["LMOPS__TRACKING__TRACKING_URI"] == "MLFLOW_TRACKING_URI"
    # lmops reads them as settings: the variable names are the config's keys
    from lmops.config import environment_settings

    assert {p for _, p, _ in environment_settings({"LMOPS__STORE__DATABASE_URL": "x", "LMOPS__TRACKING__TRACKING_URI": "y"})} \
        == {("store", "database_url"), ("tracking", "tracking_uri")}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["ports"][0]["containerPort"] == 8000
    prestop = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > prestop + cfg.serve.shutdown_timeout_s
    assert pod["securityContext"]["runAsNonRoot"] is True
    svc = objs["service"]["spec"]
    assert svc["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert svc["selector"] == dep["spec"]["selector"]["matchLabels"] == objs["pdb"]["spec"]["selector"]["matchLabels"]
    assert objs["pdb"]["spec"]["minAvailable"] == 1
    hpa = objs["hpa"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "lmops-chat"}
    assert hpa["minReplicas"] == 3 and hpa["metrics"][0]["resource"]["name"] == "cpu"
    # the ConfigMap is the workspace's config, listening on all addresses, no store URL in it
    pod_cfg = parse_config(yaml.safe_load(objs["configmap"]["data"]["lmops.yaml"]))
    assert pod_cfg.serve.host == "0.0.0.0" and pod_cfg.store.database_url is None
    assert pod_cfg.rollout == cfg.rollout and pod_cfg.safety == cfg.safety
    secret = objs["secret"]["stringData"]
    assert secret["PGPASSWORD"].startswith("REPLACE") and "REPLACE" in secret["LMOPS_DATABASE_URL"]
    assert "SQLite" in out and "lmops drives the rollouts" in out
    assert "lmops drives the rollouts" in (tmp_path / "k8s" / "README.md").read_text()  # the notes, kept


def test_a_password_in_the_workspace_config_never_reaches_the_export(chat):
    cfg = override(chat.config(), ["store.database_url=postgresql+psycopg://lm:s3cret@db:5432/lm"])
    with Store.for_workspace(chat) as store:
        ep = store.endpoints.get("chat")
    export = k8s.build(ep, cfg, k8s.K8sOptions())
    assert not any("s3cret" in text for text in export.files.values())
    cfg = override(chat.config(), ["store.database_url=postgresql+psycopg://lm@db:5432/lm"])
    secret = yaml.safe_load(k8s.build(ep, cfg, k8s.K8sOptions()).files["secret.yaml"])
    assert secret["stringData"]["LMOPS_DATABASE_URL"] == "postgresql+psycopg://lm@db:5432/lm"


def test_rollout_shape_is_valid_argo_with_lmops_steps_and_analysis(cli, chat, tmp_path):
    out = cli("k8s", "export", "-e", "chat", str(tmp_path / "argo"), "--kind", "rollout",
              "--set", "rollout.steps=[20,100]", "--set", "rollout.window_s=90")
    objs = load(tmp_path / "argo")
    assert set(objs) == {"configmap", "secret", "rollout", "analysistemplate", "analysistemplate-final",
                         "service", "hpa", "pdb"}
    for obj in objs.values():
        valid(obj)
    rollout = objs["rollout"]
    c = rollout["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][:3] == ["serve", "--model", "models:/m/1"]  # the stable deployment, blue
    steps = rollout["spec"]["strategy"]["canary"]["steps"]
    assert [s.get("setWeight") for s in steps if "setWeight" in s] == [20, 100]
    assert [s["pause"]["duration"] for s in steps if "pause" in s] == ["90s", "90s"]
    analyses = [s["analysis"] for s in steps if "analysis" in s]
    assert [a["templates"][0]["templateName"] for a in analyses] == ["lmops-chat", "lmops-chat-final"]
    assert {a["name"]: a["valueFrom"]["podTemplateHashValue"] for a in analyses[0]["args"]} == \
        {"canary-hash": "Latest", "stable-hash": "Stable"}
    assert objs["hpa"]["spec"]["scaleTargetRef"]["kind"] == "Rollout"

    cfg = Config()
    metrics = {m["name"]: m for m in objs["analysistemplate"]["spec"]["metrics"]}
    # error_rate: success canary <= stable + 0.01 and failure canary > stable + 0.05: one query
    err = metrics["error-rate"]
    assert err["successCondition"] == "len(result) > 0 && result[0] <= 0.01"
    assert err["failureCondition"] == "len(result) > 0 && result[0] > 0.05"
    assert err["failureLimit"] == cfg.rollout.failure_limit
    assert err["consecutiveErrorLimit"] == cfg.rollout.consecutive_error_limit
    assert err["inconclusiveLimit"] == cfg.rollout.inconclusive_limit - 1  # Argo: inconclusive when exceeded
    assert err["interval"] == "90s" and "[90s]" in err["provider"]["prometheus"]["query"]
    # p95_ttft_s: canary <= stable * 1.5 + 0.05 / canary > stable * 3 + 0.25: a query per condition
    assert "- 3 * histogram_quantile" in metrics["p95-ttft-s"]["provider"]["prometheus"]["query"]
    assert metrics["p95-ttft-s"]["failureCondition"] == "len(result) > 0 && result[0] > 0.25"
    assert "- 1.5 * histogram_quantile" in metrics["p95-ttft-s-pass"]["provider"]["prometheus"]["query"]
    assert metrics["p95-ttft-s-pass"]["successCondition"] == "len(result) > 0 && result[0] <= 0.05"
    # the NLLs are in the store, not in Prometheus: left out, in the YAML and in the summary
    assert not any("nll" in name for name in metrics)
    text = (tmp_path / "argo" / "analysistemplate.yaml").read_text()
    assert "# Left out: prompt_nll" in text and "# Left out: answer_nll" in text
    assert "analysis: prompt_nll: not in Prometheus" in out
    # the last step compares with stable's window before (its pods are gone at 100%)
    final = objs["analysistemplate-final"]["spec"]["metrics"][0]["provider"]["prometheus"]["query"]
    assert "[90s] offset 90s" in final and "offset" not in err["provider"]["prometheus"]["query"]


def test_rollout_of_another_deployment_and_of_a_local_bundle(cli, chat, tmp_path):
    cli("k8s", "export", "-e", "chat", str(tmp_path / "g"), "--kind", "rollout", "--deployment", "green")
    c = load(tmp_path / "g")["rollout"]["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][:3] == ["serve", "--model", "models:/m/2"] and "serve.runtime=torch" in c["args"]
    with Store.for_workspace(chat) as store:
        store.endpoints.deploy(Deployment("chat", "local", "/x/ckpt", "ckpt", "abc", "/x/ckpt"), "alice", traffic=0)
    out = cli("k8s", "export", "-e", "chat", str(tmp_path / "l"), "--kind", "rollout", "-d", "local")
    c = load(tmp_path / "l")["rollout"]["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][:3] == ["serve", "--bundle", "/model"] and "lmops package /x/ckpt" in out
    cli("k8s", "export", "-e", "chat", str(tmp_path / "n"), "--kind", "rollout", "-d", "nope", code=1)


# ----------------------------------------------------------------------------- the translation

@pytest.mark.parametrize("text, expected", [
    ("canary <= stable * 1.5 + 0.05", k8s.Linear("<=", 1.5, 0.05)),
    ("canary > stable + 0.05", k8s.Linear(">", 1.0, 0.05)),
    ("stable * 3 + 0.25 < canary", k8s.Linear(">", 3.0, 0.25)),
    ("2 * canary - stable <= 0.1", k8s.Linear("<=", 0.5, 0.05)),
    ("-canary >= -stable - 0.01", k8s.Linear("<=", 1.0, 0.01)),
    ("canary / 2 <= 1", k8s.Linear("<=", 0.0, 2.0)),
    ("canary / stable <= 1.2", None),  # not linear
    ("canary * stable <= 1", None),
    ("canary <= 1 and stable <= 1", None),
    ("0 <= canary <= 1", None),  # a chain
    ("stable <= 1", None),  # no canary in it
])
def test_linear_conditions(text, expected):
    assert k8s.linear(text) == expected


@pytest.mark.parametrize("text", ["canary <= stable * 1.5 + 0.05", "stable * 3 + 0.25 < canary",
                                  "2 * canary - stable <= 0.1", "-canary >= -stable - 0.01", "canary > stable / 4"])
def test_the_translated_condition_holds_exactly_when_lmops_condition_holds(text):
    lin, cond = k8s.linear(text), parse_condition(text)
    ops = {"<": float.__lt__, "<=": float.__le__, ">": float.__gt__, ">=": float.__ge__}
    rng = random.Random(0)
    for _ in range(2000):
        canary, stable = rng.uniform(0, 2), rng.uniform(0, 2)
        diff = canary - lin.a * stable
        if abs(diff - lin.b) < 1e-9:
            continue  # on the boundary float rounding may differ
        assert ops[lin.op](diff, lin.b) == cond.holds(canary, stable), (canary, stable)


def test_a_condition_prometheus_cannot_answer_is_left_out_and_said(cli, chat, tmp_path):
    out = cli("k8s", "export", "-e", "chat", str(tmp_path / "a"), "--kind", "rollout",
              "--set", 'rollout.metrics={"error_rate": {"success": "canary / stable <= 1.2", '
                       '"failure": "canary > stable + 0.05"}, "prompt_nll": {"success": "canary <= stable", '
                       '"failure": "canary > stable + 1"}}')
    assert "error_rate: condition 'canary / stable <= 1.2' is not of the form" in out
    assert not (tmp_path / "a" / "analysistemplate.yaml").exists()  # nothing left to analyse
    steps = load(tmp_path / "a")["rollout"]["spec"]["strategy"]["canary"]["steps"]
    assert not any("analysis" in s for s in steps)


def test_queries_use_the_servers_metric_names_and_error_codes():
    """Every lmops:* name in the queries is one /metrics exports, and SERVER_ERROR_CODES are exactly the
    codes the server answers with a status >= 500 (found in its source)."""
    from lmops.serve.metrics import Metrics

    registry = Metrics(lambda: (0, 0)).registry
    exported = {s.name for family in registry.collect() for s in family.samples}
    exported |= {f.name + "_total" for f in registry.collect() if f.type == "counter"}
    metrics, _ = k8s.analysis_metrics(Config(), "http://p")
    used = set()
    for m in metrics:
        used |= set(re.findall(r"lmops:[a-z0-9_:]+", m["provider"]["prometheus"]["query"]))
    assert used and used <= exported | {n for n in used if n.endswith(("_bucket", "_count"))
                                         and n.rsplit("_", 1)[0] in {f.name for f in registry.collect()}}
    source = "".join(p.read_text() for p in Path(k8s.__file__).parents[1].joinpath("serve").glob("*.py"))
    codes = set(re.findall(r'APIError\(5\d\d,.{0,300}?code="([a-z_]+)"', source, re.S))
    codes.add("server_error")  # what the error counter says of a 5xx without a code (its type)
    assert codes == set(k8s.SERVER_ERROR_CODES)


def test_queries_are_promql():
    promql_parser = pytest.importorskip("promql_parser")
    for final in (False, True):
        metrics, _ = k8s.analysis_metrics(Config(), "http://p", final)
        for m in metrics:
            q = m["provider"]["prometheus"]["query"]
            promql_parser.parse(q.replace("{{args.canary-hash}}", "a1").replace("{{args.stable-hash}}", "b2"))
    with pytest.raises(ValueError):  # the parser does refuse a broken query
        promql_parser.parse("sum(increase(lmops:request_errors_total[120s]")


# ----------------------------------------------------------------------------- the checks can fail

def test_broken_objects_fail_the_schemas(cli, chat, tmp_path):
    cli("k8s", "export", "-e", "chat", str(tmp_path / "d"))
    cli("k8s", "export", "-e", "chat", str(tmp_path / "r"), "--kind", "rollout")
    objs = {**load(tmp_path / "d"), **load(tmp_path / "r")}

    def broken(kind, change):
        obj = copy.deepcopy(objs[kind])
        change(obj)
        return obj

    cases = [
        broken("deployment", lambda o: o["spec"].update(replicas="two")),  # a wrong type
        broken("service", lambda o: o["spec"]["ports"][0].update(prot=80)),  # an unknown field
        broken("hpa", lambda o: o["spec"].pop("maxReplicas")),  # a required field
        broken("pdb", lambda o: o["spec"].update(minAvailable=[1])),
        broken("rollout", lambda o: o["spec"]["strategy"]["canary"]["steps"][0].update(setWeight="ten")),
        broken("rollout", lambda o: o["spec"]["strategy"]["canary"].update(stepz=[])),
        broken("rollout", lambda o: o["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
               ["httpGet"].update(path=1)),  # inside the pod template
        broken("analysistemplate", lambda o: o["spec"]["metrics"][0]["provider"]["prometheus"].update(query=5)),
        broken("analysistemplate", lambda o: o["spec"]["metrics"][0].update(count=1, interval=None)),
    ]
    for obj in cases:
        with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError, AssertionError)):
            valid(obj)
    with pytest.raises(AssertionError):  # Argo's controller rule: count >= failureLimit + consecutiveSuccessLimit
        argo_metric_rules({"name": "m", "count": 1, "interval": "1m", "failureLimit": 1, "consecutiveSuccessLimit": 1})


# ----------------------------------------------------------------------------- refusals

def test_out_must_be_empty_unless_forced_and_the_endpoint_must_exist(cli, chat, tmp_path):
    out = tmp_path / "k"
    out.mkdir()
    (out / "stale.yaml").write_text("kind: Old\n")
    assert "not empty; pass --force" in cli("k8s", "export", "-e", "chat", str(out), code=1)
    cli("k8s", "export", "-e", "chat", str(out), "--force")
    assert not (out / "stale.yaml").exists() and (out / "deployment.yaml").exists()
    assert "no endpoint 'nope' (endpoints: chat)" in cli("k8s", "export", "-e", "nope", str(tmp_path / "n"), code=1)
    assert "--kind sideways: one of deployment, rollout" in cli("k8s", "export", "-e", "chat", str(tmp_path / "s"),
                                                                 "--kind", "sideways", code=1)
    assert not (tmp_path / "n").exists() and not (tmp_path / "s").exists()
    assert "kubectl apply -f OUT/" in cli("k8s", "export", "--help")
