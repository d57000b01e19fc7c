"""`lmops azure export`: every file loaded with the azure-ai-ml SDK's offline loaders (no workspace, no
network), and the loaded objects' fields checked against the lmops endpoint and config they came from."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lmops.config import parse_config
from lmops.deploy.endpoints import Deployment
from lmops.store import Store

ml = pytest.importorskip("azure.ai.ml")  # the dev extra installs it
# the SDK's own marshmallow 3 usage warns on every load; nothing lmops can change
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
from azure.ai.ml import PyTorchDistribution  # noqa: E402
from marshmallow.exceptions import ValidationError  # noqa: E402  (what the loaders raise on a bad file)


@pytest.fixture
def chat(workspace):
    """Endpoint chat: blue (v1) 90%, green (v2) 10%, shadow (v3, max_batch 4) mirrored at 20%."""
    with Store.for_workspace(workspace) as store:
        store.endpoints.create("chat", "alice", "the chat bot")
        for name, version, extra in (("blue", "1", {}), ("green", "2", {"runtime": "torch"}),
                                     ("shadow", "3", {"max_batch": 4})):
            store.endpoints.deploy(Deployment("chat", name, f"m@{version}", "lmops-model", version,
                                              f"models:/lmops-model/{version}", **extra), "alice", traffic=0)
        store.endpoints.set_traffic("chat", "alice", {"blue": 90, "green": 10}, {"shadow": 20})
    return workspace


@pytest.fixture
def exported(cli, chat, tmp_path):
    out = tmp_path / "az"
    text = cli("azure", "export", "--endpoint", "chat", str(out), "--image", "example.azurecr.io/lmops:1",
               "--processes", "4", "--nodes", "2", "--instance-count", "3")
    return out, text


def test_endpoint_has_the_traffic_and_mirror_of_lmops(exported):
    out, _ = exported
    ep = ml.load_online_endpoint(out / "endpoint.yml")
    assert ep.name == "chat" and ep.auth_mode == "key" and ep.description == "the chat bot"
    assert ep.traffic == {"blue": 90, "green": 10, "shadow": 0}
    assert ep.mirror_traffic == {"shadow": 20}


def test_a_deployment_per_lmops_deployment_with_probes_and_request_settings(exported, chat):
    out, _ = exported
    cfg = chat.config()
    deps = {p.stem: ml.load_online_deployment(p) for p in (out / "deployments").glob("*.yml")}
    assert set(deps) == {"blue", "green", "shadow"}
    for name, d in deps.items():
        assert d.endpoint_name == "chat" and d.instance_count == 3
        assert d.environment == "lmops-serve:1"  # as the SDK keeps an azureml:NAME:VERSION reference
        assert d.liveness_probe.failure_threshold * d.liveness_probe.period >= 300  # model loading
        assert d.readiness_probe.period == 5
        assert d.request_settings.request_timeout_ms <= 180_000  # Azure ML's limit
    assert deps["blue"].model == "lmops-model:1" and deps["green"].model == "lmops-model:2"
    assert deps["green"].environment_variables == {"LMOPS_SERVE_ARGS": "--set serve.runtime=torch"}
    assert deps["shadow"].request_settings.max_concurrent_requests_per_instance == 4 + cfg.serve.max_waiting
    assert deps["blue"].request_settings.max_concurrent_requests_per_instance == cfg.serve.max_batch + cfg.serve.max_waiting


def test_serving_environment_is_the_image_with_lmops_routes(exported):
    out, _ = exported
    env = ml.load_environment(out / "environments" / "serve.yml")
    routes = env.inference_config
    assert routes["livenessRoute"] == {"port": 8000, "path": "/healthz"}
    assert routes["readinessRoute"] == {"port": 8000, "path": "/readyz"}
    assert routes["scoringRoute"]["port"] == 8000
    context = out / "environments" / env.build.path
    dockerfile = (context / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM example.azurecr.io/lmops:1" in dockerfile
    assert '--bundle \\"$AZUREML_MODEL_DIR/bundle\\"' in dockerfile
    served = parse_config(yaml.safe_load((context / "lmops.yaml").read_text()))
    assert served.auth.enabled is False and served.serve.host == "0.0.0.0"  # Azure ML's key auth is in front
    train_env = ml.load_environment(out / "environments" / "train.yml")
    train_docker = (out / "environments" / train_env.build.path / "Dockerfile").read_text()
    assert "FROM example.azurecr.io/lmops:1\nENTRYPOINT []" in train_docker  # jobs run their own command


def test_models_are_custom_model_folders(exported):
    out, text = exported
    models = {(m.name, m.version): m for m in map(ml.load_model, (out / "models").glob("*/model.yml"))}
    assert set(models) == {("lmops-model", "1"), ("lmops-model", "2"), ("lmops-model", "3")}
    for m in models.values():
        assert m.type == "custom_model" and Path(m.path).name == "bundle" and Path(m.path).is_dir()
        assert m.tags["lmops_model_uri"] == f"models:/lmops-model/{m.version}"
    assert "lmops package" in text


def test_training_job_is_distributed_pytorch(exported):
    out, _ = exported
    job = ml.load_job(out / "jobs" / "train.yml")
    assert isinstance(job.distribution, PyTorchDistribution)
    assert job.distribution.process_count_per_instance == 4 and job.resources.instance_count == 2
    assert "lmops train" in job.command and "${{inputs.corpus}}" in job.command
    assert job.outputs["workspace"].mode == "upload"
    assert job.compute == "cpu-cluster"


def test_pipeline_job_chains_a_command_component_per_step(exported, chat):
    out, text = exported
    steps = [s for s in chat.config().pipeline.steps if s != "validate"]
    job = ml.load_job(out / "jobs" / "pipeline.yml")
    assert list(job.jobs) == steps
    job.dump(out / "dumped.yml")  # the SDK's own YAML of what it loaded
    nodes = yaml.safe_load((out / "dumped.yml").read_text())["jobs"]
    for previous, step in zip(steps, steps[1:]):
        assert job.jobs[step].type == "command"
        assert nodes[step]["inputs"]["workspace"]["path"] == f"${{{{parent.jobs.{previous}.outputs.workspace}}}}"
    assert isinstance(job.jobs["train"].distribution, PyTorchDistribution)
    commands = {s: ml.load_component(out / "components" / f"{s}.yml").command for s in steps}
    assert commands["ingest"].startswith("cp lmops.yaml") and "lmops data ingest" in commands["ingest"]
    assert "lmops tokenizer train" in commands["tokenize"] and "lmops promote" in commands["promote"]
    assert "validate runs inside ingest" in text
    # every lmops command named is a real command of the CLI
    from lmops.cli import app as cli_app
    from typer.main import get_command

    root = get_command(cli_app)
    for command in commands.values():
        words = re.search(r"&& (lmops [a-z ]+?) --", command).group(1).split()[1:]
        group = root
        for w in words:
            group = group.commands[w] if hasattr(group, "commands") else group
        assert not hasattr(group, "commands"), f"{words}: not a command"


def test_job_tracking_sends_runs_to_the_azure_ml_workspace(cli, chat, tmp_path):
    cli("azure", "export", "-e", "chat", str(tmp_path / "t"), "--job-tracking")
    job = ml.load_job(tmp_path / "t" / "jobs" / "train.yml")
    assert "--set tracking.tracking_uri=$MLFLOW_TRACKING_URI" in job.command


def test_the_loaders_refuse_a_broken_file(exported):
    """The checks can fail: a wrong type, a bad distribution and a missing code folder are refused."""
    out, _ = exported
    broken = out / "broken.yml"
    cases = [
        ("deployments/blue.yml", lambda d: d.update(instance_count="three"), ml.load_online_deployment),
        ("endpoint.yml", lambda d: d.update(auth_mode="sometimes"), ml.load_online_endpoint),
        ("jobs/train.yml", lambda d: d["distribution"].update(type="horovodd"), ml.load_job),
        ("jobs/train.yml", lambda d: d.update(code="../nowhere"), ml.load_job),
        ("environments/serve.yml", lambda d: d["inference_config"]["liveness_route"].update(port="http"),
         ml.load_environment),
    ]
    for rel, change, loader in cases:
        data = yaml.safe_load((out / rel).read_text())
        change(data)
        target = (out / rel).with_name("broken.yml")
        target.write_text(yaml.safe_dump(data))
        with pytest.raises(ValidationError):
            loader(target)
        target.unlink()
    assert not broken.exists()


def test_refusals(cli, chat, tmp_path):
    out = tmp_path / "full"
    out.mkdir()
    (out / "x").write_text("x")
    assert "not empty; pass --force" in cli("azure", "export", "-e", "chat", str(out), code=1)
    assert "no endpoint 'nope'" in cli("azure", "export", "-e", "nope", str(tmp_path / "n"), code=1)
    with Store.for_workspace(chat) as store:
        store.endpoints.create("ab", "alice")
        store.endpoints.deploy(Deployment("ab", "b", "m@1", "m", "1", "models:/m/1"), "alice")
    assert "Azure ML names have 3 to 32 characters" in cli("azure", "export", "-e", "ab", str(tmp_path / "s"), code=1)
    assert "managed online endpoint" in cli("azure", "export", "--help")
