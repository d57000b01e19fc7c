"""An lmops endpoint, its models, training and the pipeline as Azure ML v2 YAML (`lmops azure export`):
built here as plain Python data and dumped with PyYAML; each file is what the `az ml` CLI and the
azure-ai-ml SDK load (`az ml online-endpoint create -f endpoint.yml`, `load_online_deployment(...)`).

lmops's endpoints are Azure ML's managed online endpoints on a laptop (lmops/deploy/endpoints.py), so
the mapping is one to one: the endpoint (auth_mode key) with the same `traffic` and `mirror_traffic`,
one managed online deployment per lmops deployment, each serving its model version.

The server is the lmops image (`--image`, the repository's Dockerfile) as a custom container. Azure ML
cannot pass a deployment arguments, only environment variables and the model mounted under
AZUREML_MODEL_DIR, so the environment is built from a two-line Dockerfile on top of the image: it adds
the workspace's lmops.yaml (with the server's own API keys off, because the endpoint's key auth is in
front of it and the container is reachable only through it) and starts `lmops serve --bundle
$AZUREML_MODEL_DIR/bundle`. Its inference_config routes liveness to /healthz, readiness to /readyz and
scoring to / on port 8000, so the OpenAI routes (/v1/completions, ...) are under the scoring URI.

Each model version is a `custom_model` asset whose folder is a bundle (`lmops package`): the export
writes models/NAME-VERSION/model.yml with path `bundle`, and says to fill that folder; deployments refer
to the registered assets (azureml:NAME:VERSION), so `az ml model create` comes first.

The jobs' environment is the same image with its entrypoint (`lmops serve`) cleared, so a job's command
runs as written. Training is a command job running `lmops train` with `distribution: pytorch` (Azure ML starts
process_count_per_instance processes per node with torchrun's environment, which lmops/train.py reads)
on a workspace folder that is the job's output. The pipeline (pipeline.steps) is a pipeline job of
command components, one per step, each taking the previous step's workspace folder and the corpus:
the same cache keys make each step do only its own work. `validate` is not a step of its own there:
`lmops data ingest` checks the data gates and fails the job.

MLflow: with tracking.tracking_uri unset, runs and the registry stay in the job's workspace folder.
`--job-tracking` makes every job log to the Azure ML workspace's MLflow (the URI Azure ML sets in
MLFLOW_TRACKING_URI), which needs the azureml-mlflow plugin in the image (lmops's `azureml` extra).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmops.config import Config, render_default_yaml
from lmops.deploy.endpoints import Deployment, Endpoint
from lmops.errors import LmopsError
from lmops.ship.k8s import PORT, Export, no_password, dump

SCHEMA = "https://azuremlschemas.azureedge.net/latest/{}.schema.json"
SERVE_ENV = "lmops-serve"
TRAIN_ENV = "lmops-train"
BUNDLE = "bundle"  # the folder of a model asset: mounted as $AZUREML_MODEL_DIR/bundle
STEP_COMMANDS = {  # pipeline step -> the lmops command that runs it alone (validate: inside ingest)
    "ingest": "lmops data ingest",
    "tokenize": "lmops tokenizer train",
    "train": "lmops train --run pipeline --no-progress",
    "evaluate": "lmops evaluate --run pipeline",
    "register": "lmops register --run pipeline",
    "promote": "lmops promote",
}


@dataclass(frozen=True)
class AzureOptions:
    """What `lmops azure export` takes besides the endpoint; each default says why."""

    image: str = "lmops:latest"  # the repository's Dockerfile; push it to a registry the workspace can pull
    instance_type: str = "Standard_DS3_v2"  # 4 cores, 14 GB: a small model with room for its KV caches
    instance_count: int = 1  # per deployment; Azure ML recommends 3 for production SLAs, 1 costs least to try
    compute: str = "cpu-cluster"  # the compute cluster of training and pipeline jobs (Azure ML's sample name)
    processes: int = 2  # training processes per node: one per core pair on the default CPU nodes
    nodes: int = 1  # training nodes
    corpus: str = "azureml:lmops-corpus@latest"  # a uri_folder data asset holding the corpus
    job_tracking: bool = False  # True: jobs log to the workspace's MLflow (needs azureml-mlflow in the image)


def _check_name(name: str, what: str) -> str:
    # Azure ML: 3-32 characters, letters, digits and dashes, starting with a letter (lmops allows 1)
    if not 3 <= len(name) <= 32:
        raise LmopsError(f"{what} '{name}': Azure ML names have 3 to 32 characters; rename it in lmops first")
    return name


def _schema(kind: str) -> str:
    return SCHEMA.format(kind)


def _model_key(dep: Deployment) -> tuple[str, str]:
    """The Azure ML model asset (name, version) of a deployment's model."""
    if dep.model_uri.startswith("models:/"):
        name, _, version = dep.model_uri.removeprefix("models:/").partition("/")
        return name, version
    return dep.model_name, dep.model_version


def serve_config(cfg: Config) -> str:
    """lmops.yaml for the serving container: the workspace's config, listening on all addresses, without
    lmops's own API keys (Azure ML's endpoint key auth is in front)."""
    c = cfg.model_copy(deep=True)
    c.serve.host, c.serve.port, c.auth.enabled = "0.0.0.0", PORT, False
    c.store.database_url = None
    c.tracking.tracking_uri = None
    return render_default_yaml(c)


def _deployment(ep: Endpoint, dep: Deployment, cfg: Config, opts: AzureOptions) -> dict:
    name, version = _model_key(dep)
    env_vars = {}
    if dep.runtime:
        env_vars["LMOPS_SERVE_ARGS"] = f"--set serve.runtime={dep.runtime}"
    if dep.max_batch:
        env_vars["LMOPS_SERVE_ARGS"] = (env_vars.get("LMOPS_SERVE_ARGS", "") + f" --set serve.max_batch={dep.max_batch}").strip()
    out = {
        "$schema": _schema("managedOnlineDeployment"),
        "name": _check_name(dep.name, "deployment"),
        "endpoint_name": ep.name,
        "description": f"{dep.model_name} v{dep.model_version} ({dep.model_ref})",
        "model": f"azureml:{name}:{version}",
        "environment": f"azureml:{SERVE_ENV}:1",
        "instance_type": opts.instance_type,
        "instance_count": opts.instance_count,
        "request_settings": {
            # a long completion on a CPU takes tens of seconds; Azure ML allows at most 180 s
            "request_timeout_ms": 90_000,
            # what lmops itself admits (running + waiting): past it the server answers 429 anyway
            "max_concurrent_requests_per_instance": (dep.max_batch or cfg.serve.max_batch) + cfg.serve.max_waiting,
        },
        # lmops serve loads the model before it binds the port: liveness waits for that
        "liveness_probe": {"initial_delay": 30, "period": 10, "timeout": 5, "failure_threshold": 30},
        "readiness_probe": {"initial_delay": 10, "period": 5, "timeout": 3, "failure_threshold": 3},
    }
    if env_vars:
        out["environment_variables"] = env_vars
    return out


def _model(dep: Deployment) -> dict:
    name, version = _model_key(dep)
    return {"$schema": _schema("model"), "name": name, "version": version, "type": "custom_model",
            "path": BUNDLE, "description": f"lmops bundle of {dep.model_name} v{dep.model_version}",
            "tags": {"lmops_model_uri": dep.model_uri, "lmops_model_ref": dep.model_ref}}


def _serve_dockerfile(image: str) -> str:
    return (f"# The lmops image with the workspace's config, serving the model Azure ML mounts.\n"
            f"FROM {image}\n"
            "COPY lmops.yaml /home/lmops/ws/lmops.yaml\n"
            'ENTRYPOINT ["sh", "-c", "exec lmops serve --host 0.0.0.0 --port 8000 --bundle '
            '\\"$AZUREML_MODEL_DIR/bundle\\" $LMOPS_SERVE_ARGS"]\n'
            "CMD []\n")


def _tracking(opts: AzureOptions) -> str:
    return " --set tracking.tracking_uri=$MLFLOW_TRACKING_URI" if opts.job_tracking else ""


def _train_job(cfg: Config, opts: AzureOptions) -> dict:
    return {
        "$schema": _schema("commandJob"),
        "type": "command",
        "display_name": "lmops train",
        "experiment_name": cfg.tracking.experiment,
        "description": "lmops train on the corpus, data-parallel: Azure ML starts the processes as torchrun "
                       "would (WORLD_SIZE, RANK, MASTER_ADDR); the workspace folder is the job's output.",
        "code": "../workspace",
        "command": ("cp lmops.yaml ${{outputs.workspace}}/ && lmops train --workspace ${{outputs.workspace}} "
                    "--no-progress --set 'data.corpus=[\"${{inputs.corpus}}\"]'" + _tracking(opts)),
        "environment": f"azureml:{TRAIN_ENV}:1",
        "compute": f"azureml:{opts.compute}",
        "inputs": {"corpus": {"type": "uri_folder", "path": opts.corpus, "mode": "download"}},
        # upload, not a mount: SQLite and the checkpoints' atomic renames want a local disk
        "outputs": {"workspace": {"type": "uri_folder", "mode": "upload"}},
        "distribution": {"type": "pytorch", "process_count_per_instance": opts.processes},
        "resources": {"instance_count": opts.nodes},
    }


def _component(step: str, first: bool, opts: AzureOptions) -> dict:
    take = "" if first else "cp -a ${{inputs.workspace}}/. ${{outputs.workspace}}/ && "
    inputs = {"corpus": {"type": "uri_folder", "mode": "download"}}
    if not first:
        inputs["workspace"] = {"type": "uri_folder", "mode": "download"}
    cmd = STEP_COMMANDS[step]
    return {
        "$schema": _schema("commandComponent"),
        "type": "command",
        "name": f"lmops_{step}",
        "version": "1",
        "display_name": f"lmops {step}",
        "description": f"The pipeline's {step} step: {cmd} on the previous step's workspace folder.",
        "code": "../workspace",
        "environment": f"azureml:{TRAIN_ENV}:1",
        "inputs": inputs,
        "outputs": {"workspace": {"type": "uri_folder", "mode": "upload"}},
        "command": (f"{take}cp lmops.yaml ${{{{outputs.workspace}}}}/ && {cmd} --workspace "
                    f"${{{{outputs.workspace}}}} --set 'data.corpus=[\"${{{{inputs.corpus}}}}\"]'" + _tracking(opts)),
    }


def _pipeline(cfg: Config, steps: list[str], opts: AzureOptions) -> dict:
    jobs: dict[str, dict] = {}
    previous = None
    for step in steps:
        node: dict = {"type": "command", "component": f"../components/{step}.yml",
                      "inputs": {"corpus": "${{parent.inputs.corpus}}"}}
        if previous is not None:
            node["inputs"]["workspace"] = f"${{{{parent.jobs.{previous}.outputs.workspace}}}}"
        if step == "train":
            node["distribution"] = {"type": "pytorch", "process_count_per_instance": opts.processes}
            node["resources"] = {"instance_count": opts.nodes}
        jobs[step] = node
        previous = step
    jobs[previous]["outputs"] = {"workspace": "${{parent.outputs.workspace}}"}
    return {
        "$schema": _schema("pipelineJob"),
        "type": "pipeline",
        "display_name": "lmops pipeline",
        "experiment_name": cfg.tracking.experiment,
        "description": "pipeline.steps of lmops.yaml, one command component each: " + " -> ".join(steps),
        "settings": {"default_compute": f"azureml:{opts.compute}", "continue_on_step_failure": False},
        "inputs": {"corpus": {"type": "uri_folder", "path": opts.corpus, "mode": "download"}},
        "outputs": {"workspace": {"type": "uri_folder", "mode": "upload"}},
        "jobs": jobs,
    }


def build(endpoint: Endpoint, cfg: Config, opts: AzureOptions) -> Export:
    """Every file of the export (relative path -> text), with notes for the person applying them."""
    if not endpoint.deployments:
        raise LmopsError(f"endpoint {endpoint.name} has no deployments; deploy one first "
                         f"(lmops deploy blue --endpoint {endpoint.name} --model @champion)")
    if opts.processes < 1 or opts.nodes < 1 or opts.instance_count < 1:
        raise LmopsError("--processes, --nodes and --instance-count are at least 1")
    _check_name(endpoint.name, "endpoint")
    out = Export()
    out.files["endpoint.yml"] = dump({
        "$schema": _schema("managedOnlineEndpoint"), "name": endpoint.name,
        "description": endpoint.description or f"lmops endpoint {endpoint.name}",
        "auth_mode": "key", "traffic": dict(endpoint.traffic),
        **({"mirror_traffic": {d: w for d, w in endpoint.mirror.items() if w}} if any(endpoint.mirror.values()) else {}),
    }, ["Apply after the deployments: traffic names them (az ml online-endpoint update -f endpoint.yml)."])
    out.files["environments/serve.yml"] = dump({
        "$schema": _schema("environment"), "name": SERVE_ENV, "version": "1",
        "description": f"{opts.image} serving the bundle Azure ML mounts, with the workspace's lmops.yaml",
        "build": {"path": "serve"},
        "inference_config": {"liveness_route": {"port": PORT, "path": "/healthz"},
                             "readiness_route": {"port": PORT, "path": "/readyz"},
                             "scoring_route": {"port": PORT, "path": "/"}},
    })
    out.files["environments/serve/Dockerfile"] = _serve_dockerfile(opts.image)
    out.files["environments/serve/lmops.yaml"] = serve_config(cfg)
    out.files["environments/train.yml"] = dump({
        "$schema": _schema("environment"), "name": TRAIN_ENV, "version": "1",
        "description": f"{opts.image} for lmops's training and pipeline jobs", "build": {"path": "train"}})
    # the image's ENTRYPOINT is `lmops serve ...`: a job runs its own command, so the entrypoint goes
    out.files["environments/train/Dockerfile"] = (
        f"# The lmops image for jobs: no entrypoint, the job's command runs as given.\nFROM {opts.image}\n"
        "ENTRYPOINT []\nCMD []\n")
    for dep in endpoint.deployments.values():
        name, version = _model_key(dep)
        out.files[f"models/{name}-{version}/model.yml"] = dump(_model(dep), [
            f"Put the bundle in {BUNDLE}/ first: lmops package {dep.model_uri} {BUNDLE}"])
        out.files[f"models/{name}-{version}/{BUNDLE}/README.md"] = (
            f"Replace this file with the bundle of {dep.model_name} v{dep.model_version}:\n\n"
            f"    lmops package {dep.model_uri} .\n")
        out.files[f"deployments/{dep.name}.yml"] = dump(_deployment(endpoint, dep, cfg, opts))
        if not dep.model_uri.startswith("models:/"):
            out.notes.append(f"{dep.name} serves a local file ({dep.model_uri}); its model asset is "
                             f"{name}:{version}")
    out.files["workspace/lmops.yaml"] = render_default_yaml(_job_config(cfg, out.notes))
    out.files["jobs/train.yml"] = dump(_train_job(cfg, opts))
    steps = [s for s in cfg.pipeline.steps if s in STEP_COMMANDS]
    if "validate" in cfg.pipeline.steps:
        out.notes.append("pipeline: validate runs inside ingest (lmops data ingest checks the data gates)")
    for i, step in enumerate(steps):
        out.files[f"components/{step}.yml"] = dump(_component(step, i == 0, opts))
    if steps:
        out.files["jobs/pipeline.yml"] = dump(_pipeline(cfg, steps, opts))
    if not opts.job_tracking and cfg.tracking.tracking_uri is None:
        out.notes.append("jobs track runs in their workspace folder (local MLflow); --job-tracking logs them to "
                         "the Azure ML workspace instead (azureml-mlflow in the image: pip install 'lmops[azureml]')")
    out.notes.append("models/*/bundle/: fill each with `lmops package` before `az ml model create`")
    return out


def _job_config(cfg: Config, notes: list[str]) -> Config:
    """The workspace's config for the jobs (uploaded with their code): no SQLite path of this machine, and
    never a URL with a password in it (notes says so)."""
    c = cfg.model_copy(deep=True)
    url = c.store.database_url
    if url and (url.startswith("sqlite") or no_password(url) is None):
        c.store.database_url = None
        if not url.startswith("sqlite"):
            notes.append("store.database_url holds a password, so the jobs' lmops.yaml leaves it out; give the "
                         "password as PGPASSWORD instead")
    if c.tracking.tracking_uri and no_password(c.tracking.tracking_uri) is None:
        c.tracking.tracking_uri = None
        notes.append("tracking.tracking_uri holds a password, so the jobs' lmops.yaml leaves it out")
    return c


ORDER = """az ml environment create -f environments/serve.yml
az ml environment create -f environments/train.yml
az ml model create -f models/NAME-VERSION/model.yml            (each; after lmops package ...)
az ml online-endpoint create --name {endpoint} --auth-mode key
az ml online-deployment create -f deployments/NAME.yml          (each)
az ml online-endpoint update -f endpoint.yml                    (traffic and mirror_traffic)
az ml job create -f jobs/train.yml | jobs/pipeline.yml"""
