"""`lmops k8s export`, `lmops azure export`: an endpoint as Kubernetes / Azure ML definitions (lmops/ship/).

Registered on lmops.cli's app when it is imported; the objects are built in lmops/ship/k8s.py and
lmops/ship/azureml.py, this is only their command line and the writing of the folder: assembled beside
OUT and renamed into place (as `lmops export` does), so an export is whole or absent, and a non-empty OUT
is replaced only with --force.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmops.cli import SetOpt, WorkspaceOpt, _store, app, friendly, log
from lmops.errors import LmopsError
from lmops.util import replace_dir

k8s_app = typer.Typer(help="Kubernetes: an endpoint as a Deployment (lmops drives rollouts) or an Argo Rollout with its AnalysisTemplate, plus Service, HPA, PDB, ConfigMap and Secret.", no_args_is_help=True)
app.add_typer(k8s_app, name="k8s")
azure_app = typer.Typer(help="Azure ML v2: an endpoint as a managed online endpoint and deployments, with the environment, models, a training job and the pipeline as a pipeline job.", no_args_is_help=True)
app.add_typer(azure_app, name="azure")

OutArg = Annotated[Path, typer.Argument(help="Folder to write (must be new or empty, unless --force).")]
EndpointOpt = Annotated[str, typer.Option("--endpoint", "-e", help="The endpoint to export (lmops endpoint list).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace a non-empty OUT folder (its old files are removed).")]
ImageOpt = Annotated[str, typer.Option(help="Container image running lmops (the repository's Dockerfile builds one); named, not built.")]


def write_folder(out: Path, files: dict[str, str], force: bool) -> Path:
    """Write files (relative path -> text) as the folder out: assembled aside and renamed in."""
    out = out.expanduser()
    if out.exists() and not out.is_dir():
        raise LmopsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LmopsError(f"{out}: exists and is not empty; pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        for rel, text in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the folder from a CI runner's other user
        replace_dir(tmp, out)
    except OSError as err:
        raise LmopsError(f"cannot write {out}: {err.strerror or err}; choose a folder you can write to") from None
    return out


def _readme(title: str, notes: list[str], then: str) -> str:
    """README.md of an export: what the command printed, kept beside the files."""
    lines = [f"# {title}", "", "Written by `lmops` (lmops/cli_export.py); export again rather than edit.", ""]
    lines += [f"- {n}" for n in notes] + ["", "```", then, "```", ""]
    return "\n".join(lines)


def _report(out: Path, files: dict[str, str], notes: list[str], then: str) -> None:
    log(f"wrote {len(files)} files to {out}: {', '.join(sorted(files))}")
    from rich.markup import escape

    for note in notes:
        log(f"  [yellow]note:[/] {escape(note)}")
    log(then)


@k8s_app.command("export")
@friendly
def k8s_export(
    out: OutArg,
    endpoint: EndpointOpt,
    kind: Annotated[str, typer.Option(help="deployment: N replicas of `lmops serve --endpoint E`, lmops drives its rollouts (shared PostgreSQL store). rollout: an Argo Rollout serving one version, canary steps of rollout.steps judged by an AnalysisTemplate on Prometheus.")] = "deployment",
    image: ImageOpt = "lmops:latest",
    deployment: Annotated[Optional[str], typer.Option("--deployment", "-d", help="With --kind rollout: the deployment the pods serve; default the endpoint's stable one. Export again with the next one to roll it out.")] = None,
    replicas: Annotated[int, typer.Option(min=1, help="Pods (the HPA's minimum).")] = 2,
    max_replicas: Annotated[int, typer.Option(min=1, help="The HPA's maximum.")] = 6,
    cpu: Annotated[str, typer.Option(help="CPU request per pod.")] = "1",
    memory: Annotated[str, typer.Option(help="Memory request per pod (the limit is --memory-limit).")] = "1Gi",
    memory_limit: Annotated[str, typer.Option(help="Memory limit per pod.")] = "2Gi",
    namespace: Annotated[Optional[str], typer.Option(help="metadata.namespace of every object; default: none (kubectl's current namespace).")] = None,
    prometheus: Annotated[str, typer.Option(help="With --kind rollout: the Prometheus the AnalysisTemplate queries.")] = "http://prometheus-server.monitoring.svc:80",
    force: ForceOpt = False,
    workspace: WorkspaceOpt = None,
    set_: SetOpt = None,
):
    """Write an endpoint as Kubernetes YAML: kubectl apply -f OUT/.

    Deployment or Argo Rollout (+ AnalysisTemplate), Service (80 -> 8000), HorizontalPodAutoscaler on CPU,
    PodDisruptionBudget, readiness /readyz and liveness /healthz probes, a grace period longer than the
    drain (serve.shutdown_timeout_s), a ConfigMap with lmops.yaml and a Secret of placeholders.
    """
    from lmops.ship.k8s import K8sOptions, build

    _, cfg, store = _store(workspace, set_)
    with store:
        ep = store.endpoints.get(endpoint)
    export = build(ep, cfg, K8sOptions(kind=kind, image=image, namespace=namespace, replicas=replicas,
                                        max_replicas=max_replicas, cpu=cpu, memory=memory,
                                        memory_limit=memory_limit, deployment=deployment, prometheus=prometheus))
    then = "fill in secret.yaml, then: kubectl apply -f ."
    export.files["README.md"] = _readme(f"Kubernetes objects of lmops endpoint {endpoint} ({kind})", export.notes, then)
    path = write_folder(out, export.files, force)
    _report(path, export.files, export.notes, f"fill in {path / 'secret.yaml'}, then: kubectl apply -f {path}")


@azure_app.command("export")
@friendly
def azure_export(
    out: OutArg,
    endpoint: EndpointOpt,
    image: ImageOpt = "lmops:latest",
    instance_type: Annotated[str, typer.Option(help="VM size of each online deployment.")] = "Standard_DS3_v2",
    instance_count: Annotated[int, typer.Option(min=1, help="Instances per online deployment.")] = 1,
    compute: Annotated[str, typer.Option(help="Compute cluster of the training and pipeline jobs.")] = "cpu-cluster",
    processes: Annotated[int, typer.Option(min=1, help="Training processes per node (distribution: pytorch).")] = 2,
    nodes: Annotated[int, typer.Option(min=1, help="Training nodes.")] = 1,
    corpus: Annotated[str, typer.Option(help="The corpus: a uri_folder data asset or a path Azure ML can read.")] = "azureml:lmops-corpus@latest",
    job_tracking: Annotated[bool, typer.Option("--job-tracking", help="Jobs log to the Azure ML workspace's MLflow (needs azureml-mlflow in the image: lmops[azureml]).")] = False,
    force: ForceOpt = False,
    workspace: WorkspaceOpt = None,
    set_: SetOpt = None,
):
    """Write an endpoint as Azure ML v2 YAML: az ml ... create -f FILE.

    endpoint.yml (managed online endpoint, key auth, traffic and mirror_traffic), deployments/*.yml (one
    per lmops deployment, custom container with /healthz and /readyz probes), environments/, models/
    (custom_model assets of bundles), jobs/train.yml (distribution: pytorch) and jobs/pipeline.yml with
    components/ (pipeline.steps).
    """
    from lmops.ship.azureml import ORDER, AzureOptions, build

    _, cfg, store = _store(workspace, set_)
    with store:
        ep = store.endpoints.get(endpoint)
    export = build(ep, cfg, AzureOptions(image=image, instance_type=instance_type, instance_count=instance_count,
                                         compute=compute, processes=processes, nodes=nodes, corpus=corpus,
                                         job_tracking=job_tracking))
    order = ORDER.format(endpoint=endpoint)
    export.files["README.md"] = _readme(f"Azure ML definitions of lmops endpoint {endpoint}", export.notes, order)
    path = write_folder(out, export.files, force)
    _report(path, export.files, export.notes, f"then, in {path}:\n" + order)
